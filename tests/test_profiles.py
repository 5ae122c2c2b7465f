"""Profiles as data: every shipped profile resolves; validation names the file, the key and the allowed values;
extends composes in order with deep merge, append lists and cycle detection; lookup order."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcconv import profiles as P
from hpcconv.errors import ProfileError

SHIPPED = sorted(p.stem for p in P.SHIPPED_DIR.glob("*.toml"))
SITES = ["supermuc-ng", "marenostrum5-gpp", "marenostrum5-acc", "perlmutter-cpu", "perlmutter-gpu",
         "alps-gh200", "lumi-c", "lumi-g", "juwels-booster"]
FRAGMENTS = ["x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4", "aarch64", "aarch64-sve", "fabric-none",
             "fabric-tcp", "fabric-omnipath", "fabric-infiniband", "fabric-slingshot", "gpu-nvidia", "gpu-amd",
             "mpich-abi-host", "openmpi-host"]


def write(d: Path, name: str, text: str) -> Path:
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


@pytest.fixture
def pdir(tmp_path, monkeypatch):
    """A private profile directory on $HPCCONV_PROFILE_PATH."""
    d = tmp_path / "profiles"
    d.mkdir()
    monkeypatch.setenv(P.ENV_PATH, str(d))
    return d


# shipped profiles ---------------------------------------------------------------------------------
def test_repo_top_level_arch_profiles_is_the_shipped_dir():
    top = Path(__file__).resolve().parent.parent / "arch-profiles"
    assert top.is_dir() and top.resolve() == P.SHIPPED_DIR.resolve()


def test_expected_profiles_are_shipped():
    for name in SITES + FRAGMENTS + ["generic-x86-64", "generic-aarch64"]:
        assert name in SHIPPED, name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_resolves(name):
    p = P.load_profile(name)
    assert p.name == name and p.chain[-1] == name
    if p.kind != "fragment":
        assert p.cpu.arch in P.ARCHES and p.confidence in P.CONFIDENCE
        assert p.platform.architecture == {"x86_64": "amd64", "aarch64": "arm64"}[p.cpu.arch]
    if p.kind == "site":
        assert p.sources and p.site.runtimes and p.site.name


@pytest.mark.parametrize("name", SITES)
def test_site_unknowns_are_explicit(name):
    """A site's host kernel/glibc and GPU driver are either a version or the explicit 'unknown'."""
    p = P.load_profile(name)
    for key in ("host.kernel", "host.glibc"):
        assert P._get(p.data, key) is not None, f"{name}: {key} neither set nor marked unknown"
    if p.gpu.vendor == "nvidia":
        assert p.gpu.driver or "gpu.driver" in p.unknowns
        assert "gpu.driver" in p.notes, "a site GPU driver needs a note on where it comes from"


def test_site_facts_follow_the_reference_notes():
    lumi = P.load_profile("lumi-g")
    assert (lumi.cpu.level, lumi.cpu.target, lumi.interconnect.type, lumi.gpu.vendor, lumi.gpu.arch) == \
        ("v3", "zen3", "slingshot", "amd", "gfx90a")
    assert lumi.mpi.mode == "host" and lumi.mpi.family == "mpich-abi" and lumi.gpu.rocm is None
    assert "/usr/share/libdrm" in lumi.site.binds and "/pfs" in lumi.site.binds   # appended to lumi-c's list
    alps = P.load_profile("alps-gh200")
    assert (alps.cpu.arch, alps.cpu.target, alps.cpu.sve_vector_bits) == ("aarch64", "neoverse_v2", 128)
    assert alps.cpu.features[0] == "sve" and "sve2" in alps.cpu.features
    assert alps.platform.architecture == "arm64" and alps.mpi.mode == "container"
    sng = P.load_profile("supermuc-ng")
    assert (sng.cpu.level, sng.interconnect.type, sng.confidence) == ("v4", "omnipath", "medium")
    assert P.load_profile("marenostrum5-acc").confidence == "low"
    pm = P.load_profile("perlmutter-gpu")
    assert pm.mpi.lib_dirs[0] == "/opt/udiImage/modules/mpich" and pm.gpu.gpu_class == "datacenter"
    assert pm.host.container_glibc_min == "2.26" and pm.host.glibc is None
    assert "shifter" in pm.site.runtimes and "podman-hpc" in pm.site.runtimes


# validation errors --------------------------------------------------------------------------------
def test_typo_in_key_names_file_and_key(pdir):
    write(pdir, "typo", 'kind = "generic"\nconfidence = "high"\n[cpu]\narch = "x86_64"\nlevel = "v3"\n[gpu]\nvendr = "nvidia"\n')
    with pytest.raises(ProfileError) as ei:
        P.load_profile("typo")
    msg = str(ei.value)
    assert "typo.toml" in msg and "gpu.vendr: unknown key" in msg and "vendor" in msg
    assert ei.value.hint == "did you mean 'gpu.vendor'?"
    assert ei.value.exit_code == 2


def test_typo_in_top_level_section(pdir):
    write(pdir, "typo2", '[interconect]\ntype = "tcp"\n')
    with pytest.raises(ProfileError, match=r"typo2\.toml: interconect: unknown key \(allowed: .*interconnect"):
        P.load_profile("typo2")


def test_bad_enum_value_lists_allowed_values(pdir):
    write(pdir, "lumi", 'kind = "fragment"\n[gpu]\nvendor = "amdd"\n')
    with pytest.raises(ProfileError) as ei:
        P.load_profile("lumi")
    assert str(ei.value).endswith("lumi.toml: gpu.vendor: 'amdd' is not one of none, nvidia, amd")
    assert ei.value.hint == "did you mean 'amd'?"


def test_error_in_a_parent_names_the_parent_file(pdir):
    write(pdir, "base", 'kind = "fragment"\n[interconnect]\ntype = "myrinet"\n')
    write(pdir, "child", 'extends = ["base"]\nconfidence = "low"\nsources = ["x"]\n[cpu]\narch = "aarch64"\n')
    with pytest.raises(ProfileError, match=r"base\.toml: interconnect\.type: 'myrinet' is not one of none, tcp, omnipath, infiniband, slingshot"):
        P.load_profile("child")


@pytest.mark.parametrize("body, expect", [
    ('[host]\nglibc = "2.31.1"', r"host\.glibc: '2\.31\.1' is not a glibc version like 2\.31 or 'unknown'"),
    ('[host]\nkernel = "five"', r"host\.kernel: 'five' is not a kernel version"),
    ('[gpu]\ndriver = "r550"', r"gpu\.driver: 'r550' is not an NVIDIA driver version"),
    ('[cpu]\nlevel = 3', r"cpu\.level: expected a string, got an integer 3"),
    ('[cpu]\nsve_vector_bits = 100', r"cpu\.sve_vector_bits: 100 is not one of 0, 128, 256"),
    ('[interconnect]\nnics = "4"', r"interconnect\.nics: expected an integer"),
    ('[site]\nruntimes = ["docker"]', r"site\.runtimes\[0\]: 'docker' is not one of charliecloud, singularity"),
    ('[site]\nbinds = ["scratch"]', r"site\.binds\[0\]: 'scratch' is not a bind"),
    ('[site.env]\n"1BAD" = "x"', r"site\.env: key '1BAD' is not an environment variable name"),
    ('[notes]\n"gpu.drivr" = "x"', r"notes: 'gpu\.drivr' is not a key path"),
    ('cpu = "x86_64"', r"cpu: expected a table \[cpu\]"),
    ('[cpu]\n"arch+" = ["x"]', r"cpu\.arch\+: the append form 'key\+' is only for lists"),
    ('[host]\nos = 1', r"host\.os: expected a string"),
])
def test_types_and_formats(pdir, body, expect):
    write(pdir, "bad", 'kind = "fragment"\n' + body + "\n")
    with pytest.raises(ProfileError, match=r"bad\.toml: " + expect):
        P.load_profile("bad")


def test_unknown_is_accepted_only_where_allowed(pdir):
    write(pdir, "u1", 'kind = "fragment"\n[host]\nglibc = "unknown"\n')
    assert P.load_profile("u1").unknowns == ("host.glibc",)
    write(pdir, "u2", 'kind = "fragment"\n[gpu]\nvendor = "unknown"\n')
    with pytest.raises(ProfileError, match="gpu.vendor: 'unknown' is not one of"):
        P.load_profile("u2")


def test_not_toml(pdir):
    write(pdir, "broken", "[cpu\narch = 1\n")
    with pytest.raises(ProfileError, match=r"broken\.toml: not valid TOML"):
        P.load_profile("broken")


@pytest.mark.parametrize("body, expect", [
    ('[cpu]\narch = "aarch64"\nlevel = "v3"', "cpu.level: only for x86_64, but cpu.arch is aarch64"),
    ('[cpu]\narch = "x86_64"', "cpu.level: missing for x86_64"),
    ('[cpu]\narch = "x86_64"\nlevel = "v2"\nsve_vector_bits = 128', "cpu.sve_vector_bits: only for aarch64"),
    ('[cpu]\narch = "aarch64"\n[gpu]\nvendor = "amd"\ndriver = "550"', "gpu.driver: only for gpu.vendor nvidia"),
    ('[cpu]\narch = "aarch64"\n[gpu]\nvendor = "nvidia"', "gpu.driver: missing for an nvidia GPU"),
    ('[cpu]\narch = "aarch64"\n[gpu]\nmodel = "A100"', "gpu.model: set, but gpu.vendor is none"),
    ('[cpu]\narch = "aarch64"\n[mpi]\nmode = "host"', "mpi.family: missing; mpi.mode = 'host'"),
    ('[cpu]\narch = "aarch64"\n[interconnect]\ntype = "tcp"\nproviders = ["cxi"]', "interconnect.providers: set, but"),
    ('[gpu]\nvendor = "none"', "cpu.arch: missing"),
])
def test_rules_across_keys_on_the_resolved_profile(pdir, body, expect):
    write(pdir, "x", 'kind = "generic"\nconfidence = "high"\n' + body + "\n")
    with pytest.raises(ProfileError) as ei:
        P.load_profile("x")
    assert "x.toml: " + expect in str(ei.value)


def test_site_needs_sources_and_confidence(pdir):
    write(pdir, "s1", 'sources = ["x"]\n[cpu]\narch = "aarch64"\n')
    with pytest.raises(ProfileError, match="confidence: missing"):
        P.load_profile("s1")
    write(pdir, "s2", 'confidence = "high"\n[cpu]\narch = "aarch64"\n')
    with pytest.raises(ProfileError, match="sources: a site profile needs at least one source"):
        P.load_profile("s2")


# composition --------------------------------------------------------------------------------------
def test_deep_merge_order_later_wins(pdir):
    write(pdir, "a", 'kind = "fragment"\n[site]\nruntimes = ["charliecloud"]\n[site.env]\nA = "a"\nX = "from-a"\n'
                     '[mpi.env]\nM = "a"\n')
    write(pdir, "b", 'kind = "fragment"\n[site]\nruntimes = ["apptainer"]\n[site.env]\nB = "b"\nX = "from-b"\n')
    write(pdir, "c", 'kind = "generic"\nextends = ["a", "b"]\nconfidence = "high"\n[cpu]\narch = "aarch64"\n'
                     '[site.env]\nX = "from-c"\n')
    p = P.load_profile("c")
    assert p.chain == ("a", "b", "c")
    assert p.site.env == {"A": "a", "B": "b", "X": "from-c"}     # tables merge deeply, the file itself wins
    assert p.site.runtimes == ("apptainer",)                     # lists replace: b after a
    assert p.mpi.env == {"M": "a"}
    write(pdir, "d", 'kind = "generic"\nextends = ["b", "a"]\nconfidence = "high"\n[cpu]\narch = "aarch64"\n')
    p = P.load_profile("d")
    assert p.site.runtimes == ("charliecloud",) and p.site.env["X"] == "from-a"


def test_append_syntax(pdir):
    write(pdir, "a", 'kind = "fragment"\n[site]\nbinds = ["/a", "/b"]\n')
    write(pdir, "b", 'kind = "generic"\nextends = ["a"]\nconfidence = "high"\n[cpu]\narch = "aarch64"\n'
                     '[site]\n"binds+" = ["/b", "/c"]\n"mountpoints+" = ["/m"]\n')
    p = P.load_profile("b")
    assert p.site.binds == ("/a", "/b", "/c") and p.site.mountpoints == ("/m",)
    assert "binds+" not in P.to_toml(p.data)


def test_kind_and_extends_are_not_inherited(pdir):
    write(pdir, "frag", 'kind = "fragment"\n[cpu]\narch = "aarch64"\n')
    write(pdir, "gen", 'kind = "generic"\nextends = ["frag"]\nconfidence = "low"\n')
    p = P.load_profile("gen")
    assert p.kind == "generic" and "extends" not in p.data and "kind" not in p.data


def test_extends_cycle_is_detected(pdir):
    write(pdir, "c1", 'kind = "fragment"\nextends = ["c2"]\n')
    write(pdir, "c2", 'kind = "fragment"\nextends = ["c3"]\n')
    write(pdir, "c3", 'kind = "fragment"\nextends = ["c1"]\n')
    with pytest.raises(ProfileError, match=r"extends cycle: c1 -> c2 -> c3 -> c1"):
        P.load_profile("c1")
    write(pdir, "self", 'kind = "fragment"\nextends = ["self"]\n')
    with pytest.raises(ProfileError, match=r"extends cycle: self -> self"):
        P.load_profile("self")


def test_diamond_is_not_a_cycle(pdir):
    write(pdir, "root", 'kind = "fragment"\n[cpu]\narch = "x86_64"\nlevel = "v1"\n')
    write(pdir, "l", 'kind = "fragment"\nextends = ["root"]\n[cpu]\nlevel = "v2"\n')
    write(pdir, "r", 'kind = "fragment"\nextends = ["root"]\n[cpu]\ntarget = "zen3"\n')
    write(pdir, "top", 'kind = "generic"\nextends = ["l", "r"]\nconfidence = "high"\n')
    p = P.load_profile("top")
    # r re-applies root's level v1 after l: later wins, as documented
    assert p.cpu.level == "v1" and p.cpu.target == "zen3" and p.chain == ("root", "l", "r", "top")


def test_extends_unknown_parent(pdir):
    write(pdir, "orphan", 'kind = "fragment"\nextends = ["x86-64-v9"]\n')
    with pytest.raises(ProfileError, match=r"orphan\.toml: extends: unknown profile 'x86-64-v9'") as ei:
        P.load_profile("orphan")
    assert ei.value.hint.startswith("did you mean x86-64-v")


# lookup -------------------------------------------------------------------------------------------
def test_profile_path_shadows_shipped_and_extends_shipped(pdir):
    write(pdir, "lumi-g", 'kind = "site"\nextends = ["x86-64-v2"]\nconfidence = "low"\nsources = ["mine"]\n')
    p = P.load_profile("lumi-g")
    assert p.path.parent == pdir and p.cpu.level == "v2"
    assert [q.name for q in P.list_profiles()].count("lumi-g") == 1


def test_explicit_file_path_and_relative_extends(tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    write(d, "local-frag", 'kind = "fragment"\n[site]\nmountpoints = ["/work"]\n')
    f = write(d, "mysite", 'extends = ["lumi-c", "./local-frag.toml"]\nconfidence = "low"\nsources = ["me"]\n')
    p = P.load_profile(str(f))
    assert p.site.mountpoints == ("/work",) and p.mpi.family == "mpich-abi"
    with pytest.raises(ProfileError, match="does not exist"):
        P.load_profile(str(d / "nope.toml"))


def test_extends_finds_siblings_first(tmp_path, monkeypatch):
    monkeypatch.delenv(P.ENV_PATH, raising=False)
    d = tmp_path / "s"
    d.mkdir()
    write(d, "x86-64-v3", 'kind = "fragment"\n[cpu]\narch = "x86_64"\nlevel = "v2"\n')  # shadows the shipped one
    f = write(d, "top", 'kind = "generic"\nextends = ["x86-64-v3"]\nconfidence = "low"\n')
    assert P.load_profile(str(f)).cpu.level == "v2"


def test_bad_profile_name():
    with pytest.raises(ProfileError, match="bad profile name"):
        P.load_profile("-rf")


# packaging ----------------------------------------------------------------------------------------
def test_build_carries_the_shipped_profiles(tmp_path):
    """setuptools' build_py (what a wheel is made of) copies every shipped TOML file as package data."""
    src = Path(__file__).resolve().parent.parent
    work = tmp_path / "src"
    work.mkdir()
    shutil.copytree(src / "hpcconv", work / "hpcconv", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(src / f, work / f)
    out = tmp_path / "lib"
    r = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                        "--build-lib", str(out)], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    built = sorted(p.stem for p in (out / "hpcconv" / "arch_profiles").glob("*.toml"))
    assert built == SHIPPED


def test_readme_documents_every_schema_key():
    text = (P.SHIPPED_DIR / "README.md").read_text()
    for key, spec in P.LEAVES.items():
        assert f"| `{key}` |" in text, f"arch-profiles/README.md lacks {key}"
        for v in spec.get("items", spec).get("enum", ()):
            assert str(v) in text
