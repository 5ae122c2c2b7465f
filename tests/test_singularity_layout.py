"""The Apptainer layout transform and the ELF probe on hand-made entry streams, and the generated
scripts run by real shells (dash, bash, busybox sh) on the host."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest

from dockertools import busybox_binary
from ocitools import T, build_image, make_tar

from hpcconv.emit import sif, singularity
from hpcconv.entries import DIR, FILE, SYMLINK, read_tar_entries
from hpcconv.harness.checks import Checks
from hpcconv.image import Image, ImageConfig, Manifest


def _image(config: dict, arch: str = "amd64") -> Image:
    img = build_image([make_tar([T("x")])], arch=arch, config=config)
    return Image("oci:/src:v1", Manifest.parse(img.manifest), ImageConfig.parse(img.config), [], source="oci")


def _run(entries, image):
    checks = Checks()
    fix = singularity.SingularityFixups(image, checks, 0)
    out = {}
    for e in fix.transform(entries):
        assert e.path not in out, f"duplicate entry {e.path}"
        data = e.reader.read() if e.type == FILE and e.reader else b""
        out[e.path] = (e, data)
    return out, fix, checks


def test_existing_items_follow_apptainer_rules():
    members = [T("etc", "dir"), T("etc/resolv.conf", "sym", link="../run/resolv.conf"),
               T("etc/hosts", data=b"127.0.0.1 old\n", mode=0o600),
               T(".singularity.d", "sym", link="elsewhere"),               # not a dir: replaced by one
               T("environment", data=b"user file\n"),                      # a non-symlink is left alone
               T("singularity", "sym", link="/old/runscript"),             # a stale link is replaced
               T("tmp", "sym", link="var/tmp"),                            # an existing path of any type wins
               T("root", "dir", mode=0o700), T("root/.ssh", "dir", mode=0o700),
               T("root/.ssh/id_rsa", data=b"key", mode=0o600), T("etc/shadow", data=b"x", mode=0o640)]
    got, fix, checks = _run(read_tar_entries(io.BytesIO(make_tar(members))), _image({"Cmd": ["sh"]}))
    assert got[".singularity.d"][0].type == DIR
    assert got["environment"][0].type == FILE and got["environment"][1] == b"user file\n"
    assert got["singularity"][0].linkname == ".singularity.d/runscript"
    assert got["tmp"][0].type == SYMLINK
    assert got["etc/hosts"][1] == b"" and got["etc/hosts"][0].mode == 0o644
    assert got["etc/resolv.conf"][0].type == SYMLINK
    assert got["root"][0].mode == 0o755 and got["root/.ssh"][0].mode == 0o700       # secrets stay private
    assert got["root/.ssh/id_rsa"][0].mode == 0o600 and got["etc/shadow"][0].mode == 0o640
    kinds = {c["kind"] for c in fix.changes.to_json()}
    assert {"replaced-by-dir", "replaced", "emptied", "dir-a+rx", "kept-private", "added-dir"} <= kinds
    layout = [c for c in checks.items if c.name == "apptainer layout"][0]
    assert layout.status == "warn" and "/environment" in layout.detail
    assert [c for c in checks.items if c.name == "/etc/resolv.conf"][0].status == "warn"
    # every directory before anything inside it
    seen = set()
    for p in got:
        parent = p.rpartition("/")[0]
        assert not parent or parent in seen or got.get(parent, (None,))[0] is None, p
        seen.add(p)


def test_env_names_apptainer_skips_are_reported():
    checks = Checks()
    img = _image({"Env": ["PATH=/bin", "1BAD=x", "MY-VAR=y", "OK=1", "NOVALUE", "OK=2"]})
    singularity.environment_checks(img.config, checks)
    assert checks.items[0].status == "warn" and "1BAD" in checks.items[0].detail
    text = singularity.env_script(img.config)
    assert text == '#!/bin/sh\nexport PATH="/bin"\nexport NOVALUE="${NOVALUE:-}"\nexport OK="${OK:-"2"}"\n'


SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]

HOSTILE = ["a b", "$HOME", "a\\b", "", "it's", 'q"t', "*", "-n", "`id`", "$(id)", "}", "${x}", "\n", "\\"]


@pytest.mark.parametrize("shell", SHELLS + ["busybox"])
@pytest.mark.parametrize("ep,cmd,args", [
    (["printf", "[%s]\\n"], ["$HOME", "x y", "", "\\"], []),
    (["printf", "[%s]\\n"], ["$HOME", "x y"], HOSTILE),
    ([], ["printf", "[%s]\\n", "it's", "`x`"], []),
    ([], ["printf", "[%s]\\n"], ["printf", "<%s>\\n", *HOSTILE]),
    (["printf", "[%s]\\n", "-"], [], HOSTILE),
])
def test_runscript_argv_in_real_shells(shell, ep, cmd, args, tmp_path, deb_cache):
    """The argv the runscript execs is exactly ENTRYPOINT + (ARGS or CMD), in every shell."""
    if shell == "busybox":
        bb = tmp_path / "busybox"
        bb.write_bytes(busybox_binary("amd64", deb_cache))
        bb.chmod(0o755)
        argv0 = [str(bb), "sh"]
    else:
        argv0 = [shutil.which(shell)]
    script = tmp_path / "runscript"
    script.write_text(singularity.runscript(_image({"Entrypoint": ep, "Cmd": cmd}).config))
    r = subprocess.run([*argv0, str(script), *args], capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": "/h"})
    assert r.returncode == 0, r.stderr
    full = ep + (args if args else cmd)
    want = subprocess.run(full, capture_output=True, env={"PATH": "/usr/bin:/bin", "HOME": "/h"}).stdout
    assert r.stdout == want


def test_runscript_without_command_fails_clearly(tmp_path):
    script = tmp_path / "runscript"
    script.write_text(singularity.runscript(_image({}).config))
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert r.returncode == 1 and "no ENTRYPOINT or CMD" in r.stderr
    assert 'eval "set ${SINGULARITY_OCI_RUN}"' in script.read_text().splitlines()


@pytest.mark.parametrize("shell", SHELLS)
def test_env_script_values_in_real_shells(shell, tmp_path):
    env = {"A": "with space", "B": "dollar $x `id` $(id)", "C": "back\\slash\\", "D": "", "E": 'q"t',
           "F": "brace}x{", "G": "it's", "H": "line\nbreak", "I": "${HOME}"}
    img = _image({"Env": ["PATH=/img/bin"] + [f"{k}={v}" for k, v in env.items()]})
    script = tmp_path / "env.sh"
    script.write_text(singularity.env_script(img.config))
    dump = "python3 -c 'import json,os; print(json.dumps(dict(os.environ)))'"
    r = subprocess.run([shutil.which(shell), "-c", f'. {script}; test \"$PATH\" = /img/bin || exit 3; PATH=/usr/bin:/bin; {dump}'],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "A": "host wins"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["A"] == "host wins"
    for k, v in env.items():
        if k != "A":
            assert got[k] == v, k


def _elf(arch: str, deb_cache) -> bytes:
    return busybox_binary(arch, deb_cache)


def test_arch_probe_follows_merged_usr_links(deb_cache):
    """/bin -> usr/bin, /usr/bin/sh -> dash: the arch of /bin/sh's target wins over the majority."""
    arm, amd = _elf("arm64", deb_cache), _elf("amd64", deb_cache)
    members = [T("usr", "dir"), T("usr/bin", "dir"), T("bin", "sym", link="usr/bin"),
               T("usr/bin/sh", "sym", link="dash"), T("usr/bin/dash", data=arm, mode=0o755),
               T("opt", "dir")] + [T(f"opt/tool{i}", data=amd, mode=0o755) for i in range(3)] + \
              [T("opt/notexec", data=amd, mode=0o644)]
    probe = sif.ArchProbe()
    for e in probe.transform(read_tar_entries(io.BytesIO(make_tar(members)))):
        if e.reader:
            e.reader.read()
    assert probe.resolve("bin/sh") == "usr/bin/dash"
    assert probe.arch()[0] == "arm64" and "/bin/sh" in probe.arch()[1]
    assert len(probe.elf) == 4                           # executables only


def test_arch_probe_without_sh_uses_the_executables(deb_cache):
    amd = _elf("amd64", deb_cache)
    members = [T("app", data=amd, mode=0o755), T("bin", "dir"), T("bin/sh", "sym", link="/missing")]
    probe = sif.ArchProbe()
    for e in probe.transform(read_tar_entries(io.BytesIO(make_tar(members)))):
        if e.reader:
            e.reader.read()
    assert probe.arch()[0] == "amd64"
    assert sif.elf_arch(b"\x7fELF" + bytes(16)) is None and sif.elf_arch(b"#!/bin/sh\n" * 3) is None
