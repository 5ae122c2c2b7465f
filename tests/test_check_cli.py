"""`hpcconv check SOURCE --profile P`: the verdict per check and the exit code for each case of issue 4,
on real images (OCI layouts of real Debian files and programs gcc builds here) through the real CLI.
Also `check --profile all` and `inspect` (what is inside)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import need
from dockertools import busybox_layer
from ocitools import build_image, build_index, image_layout, write_layout
from preptools import CLIBDIR, gcc, glibc_files, host_lib, layout_of, ldconfig, rootfs
from rewritetools import VECTOR_LOOP


def hpcconv(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def check(layout, profile, *extra):
    r = hpcconv("check", f"oci:{layout}", "--profile", str(profile), "--json", *extra)
    assert r.returncode in (0, 1), r.stderr
    data = json.loads(r.stdout)
    return r.returncode, data, {c["name"]: c for c in data["checks"]}


def write_profile(tmp_path, name, body):
    p = tmp_path / f"{name}.toml"
    p.write_text(body)
    return p


MPICH = {f"{CLIBDIR}/libmpich.so.12.2.2": "libmpich.so.12"}
MPICH_LINKS = {f"{CLIBDIR}/libmpi.so.12": "libmpich.so.12.2.2", f"{CLIBDIR}/libmpich.so.12": "libmpich.so.12.2.2"}


@pytest.fixture(scope="module")
def mpich_image(tmp_path_factory):
    """MPICH (MPICH ABI) from Debian, with glibc and a loader cache, no busybox (whose static glibc
    carries AVX-512 variants)."""
    d = tmp_path_factory.mktemp("mpich")
    files = {**glibc_files(), **{k: host_lib(v) for k, v in MPICH.items()}}
    root = rootfs(d / "root", files, MPICH_LINKS)
    ldconfig(root)
    return layout_of(d, root)


@pytest.fixture(scope="module")
def openmpi_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("ompi")
    files = {**glibc_files()}
    for so in ("libmpi.so.40", "libopen-pal.so.40", "libopen-rte.so.40"):
        real = host_lib(so)
        files[f"{CLIBDIR}/{real.rsplit('/', 1)[1]}"] = real
    root = rootfs(d / "root", files)
    ldconfig(root)
    return layout_of(d, root)


def test_amd64_image_on_arm64_profile_fails_before_reading_layers(tmp_path, deb_cache, store_dir):
    img = build_image([busybox_layer("amd64", deb_cache)])
    layout = image_layout(tmp_path / "bb", img)
    # corrupt the layer blob: reading it would be a CorruptInput (exit 4), not the platform verdict
    man = json.loads(img.manifest)
    blob = layout / "blobs" / "sha256" / man["layers"][0]["digest"].split(":")[1]
    blob.write_bytes(b"\0" * blob.stat().st_size)
    rc, data, c = check(layout, "alps-gh200")
    assert rc == 1 and data["verdict"] == "fail"
    assert c["platform"]["status"] == "fail"
    assert "linux/amd64" in c["platform"]["detail"] and "linux/arm64" in c["platform"]["detail"]
    assert list(c) == ["platform"]                       # nothing else was read
    r = hpcconv("check", f"oci:{layout}", "--profile", "alps-gh200")
    assert r.returncode == 1 and "FAIL  platform:" in r.stdout and "verdict for alps-gh200: FAIL" in r.stdout
    # and convert stops the same way, writing nothing
    out = tmp_path / "x.sqfs"
    r = hpcconv("convert", f"oci:{layout}", "--profile", "alps-gh200", "-o", str(out))
    assert r.returncode == 1 and not out.exists() and "not converted" in r.stdout


def test_multi_arch_index_is_picked_by_the_profile(tmp_path, deb_cache, store_dir):
    a = build_image([busybox_layer("amd64", deb_cache)])
    b = build_image([busybox_layer("arm64", deb_cache)], arch="arm64", variant="v8")
    idx, blobs = build_index([(a, {"os": "linux", "architecture": "amd64"}),
                              (b, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    layout = write_layout(tmp_path / "multi", idx, blobs)
    _, data, c = check(layout, "alps-gh200")
    assert data["platform"] == "linux/arm64" and c["platform"]["status"] == "pass"
    assert c["elf.machine"]["detail"].endswith("all aarch64")
    _, data, c = check(layout, "lumi-c")
    assert data["platform"] == "linux/amd64" and c["elf.machine"]["detail"].endswith("all x86_64")


def test_avx512_binary_on_a_v3_site_warns(tmp_path, store_dir):
    need("gcc")
    prog = gcc(tmp_path / "saxpy", VECTOR_LOOP, "-march=x86-64-v4")
    root = rootfs(tmp_path / "root", {**glibc_files(), "usr/local/bin/saxpy": prog})
    ldconfig(root)
    rc, data, c = check(layout_of(tmp_path, root), "perlmutter-cpu")
    assert rc == 0 and data["verdict"] == "warn"
    assert c["elf.isa-scan"]["status"] == "warn"
    assert "/usr/local/bin/saxpy" in c["elf.isa-scan"]["detail"] and "-march=x86-64-v3" in c["elf.isa-scan"]["detail"]
    assert not [x for x in data["checks"] if x["status"] == "fail"]
    # the same program built for the site's level passes
    prog3 = gcc(tmp_path / "saxpy3", VECTOR_LOOP, "-march=x86-64-v3")
    root3 = rootfs(tmp_path / "root3", {**glibc_files(), "usr/local/bin/saxpy": prog3})
    (tmp_path / "v3").mkdir()
    _, _, c3 = check(layout_of(tmp_path / "v3", root3), "perlmutter-cpu")
    assert c3["elf.isa-scan"]["status"] == "pass"


def test_glibc_too_new_for_the_site_kernel_fails(tmp_path, store_dir):
    root = rootfs(tmp_path / "root", glibc_files())
    layout = layout_of(tmp_path, root)
    # Debian 12's libc.so.6 carries an ABI note "Linux 3.2.0" (oracle: file(1)-independent readelf)
    note = subprocess.run(["readelf", "-n", host_lib("libc.so.6")], capture_output=True, text=True).stdout
    m = re.search(r"OS: Linux, ABI: (\d+\.\d+\.\d+)", note)
    assert m, note
    old = write_profile(tmp_path, "old-kernel", 'kind = "generic"\nextends = ["generic-x86-64"]\n'
                        'description = "a site on a RHEL 6 kernel"\n[host]\nkernel = "2.6.32"\n')
    rc, data, c = check(layout, old)
    assert rc == 1 and c["glibc.kernel"]["status"] == "fail"
    assert f"Linux >= {m.group(1)}" in c["glibc.kernel"]["detail"] and "2.6.32" in c["glibc.kernel"]["detail"]
    new = write_profile(tmp_path, "new-kernel", 'kind = "generic"\nextends = ["generic-x86-64"]\n'
                        'description = "a current site"\n[host]\nkernel = "5.14.21"\n')
    rc, data, c = check(layout, new)
    assert rc == 0 and c["glibc.kernel"]["status"] == "pass"


def test_openmpi_image_on_an_mpich_abi_host_fails_with_the_reason(openmpi_image, store_dir):
    rc, data, c = check(openmpi_image, "lumi-c")
    assert rc == 1 and data["verdict"] == "fail"
    assert c["mpi.detect"]["detail"].startswith("Open MPI")
    d = c["mpi.abi"]["detail"]
    assert c["mpi.abi"]["status"] == "fail" and "libmpi.so.40" in d and "libmpi.so.12" in d and "rebuild" in d
    r = hpcconv("check", f"oci:{openmpi_image}", "--profile", "lumi-c")
    assert r.returncode == 1 and "FAIL  mpi.abi:" in r.stdout


def test_mpich_abi_image_on_an_mpich_abi_host_passes_and_is_prepared(mpich_image, store_dir):
    rc, data, c = check(mpich_image, "lumi-c")
    assert rc == 0 and data["verdict"] == "pass", [x for x in data["checks"] if x["status"] != "pass"]
    assert c["mpi.abi"]["status"] == "pass"
    assert c["prepare.mpi"]["status"] == "pass" and "/opt/hpcconv/host-mpi/lib" in c["prepare.mpi"]["detail"]
    made = {e for ch in data["changes_on_convert"] for e in ch["examples"]}
    assert {"/opt/hpcconv/host-mpi/lib", "/etc/ld.so.conf.d/00-hpcconv-host-mpi.conf"} <= made
    assert any(x.startswith("LD_LIBRARY_PATH=/opt/hpcconv/host-mpi/lib:") for ch in data["changes_on_convert"]
               for x in ch["examples"])


@pytest.mark.parametrize("driver,rc,status", [("470.57.02", 1, "fail"), ("550.54.15", 0, "pass")])
def test_cuda_12_4_against_the_site_driver(tmp_path, store_dir, driver, rc, status):
    root = rootfs(tmp_path / "root", {"usr/local/cuda-12.4/targets/x86_64-linux/lib/libcudart.so.12.4.127":
                                      b"not a real CUDA runtime, only its name"})
    layout = layout_of(tmp_path, root, config={"Env": ["PATH=/usr/bin:/bin", "CUDA_VERSION=12.4.1"]})
    prof = write_profile(tmp_path, "gpu-site", 'kind = "generic"\nextends = ["generic-x86-64", "gpu-nvidia"]\n'
                         f'description = "A100 site"\n[gpu]\ndriver = "{driver}"\nclass = "datacenter"\n')
    got_rc, data, c = check(layout, prof)
    assert got_rc == rc and c["gpu.cuda"]["status"] == status and data["verdict"] == status
    if status == "fail":
        assert "driver" in c["gpu.cuda"]["detail"] and "470.57.02" in c["gpu.cuda"]["detail"]
    assert c["prepare.gpu"]["status"] == "pass"


@pytest.mark.parametrize("with_psm2", [False, True])
def test_omnipath_site_and_libpsm2(tmp_path, store_dir, with_psm2):
    files = {**glibc_files(), **{k: host_lib(v) for k, v in MPICH.items()}}
    if with_psm2:
        files[f"{CLIBDIR}/libpsm2.so.2.2"] = host_lib("libpsm2.so.2")
    root = rootfs(tmp_path / "root", files, {**MPICH_LINKS, **({f"{CLIBDIR}/libpsm2.so.2": "libpsm2.so.2.2"}
                                                              if with_psm2 else {})})
    ldconfig(root)
    rc, data, c = check(layout_of(tmp_path, root), "supermuc-ng")
    assert rc == 0
    f = c["fabric.support"]
    if with_psm2:
        assert f["status"] == "pass"
    else:
        assert f["status"] == "warn" and data["verdict"] == "warn"
        assert "libpsm2" in f["detail"] and "FI_PROVIDER=psm2" in f["detail"] and "TCP" in f["detail"]


def test_profile_all_table(mpich_image, store_dir):
    r = hpcconv("check", f"oci:{mpich_image}", "--profile", "all", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["profile"]: x for x in json.loads(r.stdout)["profiles"]}
    from hpcconv.profiles import list_profiles

    assert set(rows) == {p.name for p in list_profiles() if p.kind == "site"}
    assert rows["alps-gh200"]["verdict"] == "fail" and rows["alps-gh200"]["fails"][0].startswith("platform:")
    assert rows["lumi-c"]["verdict"] == "pass" and rows["perlmutter-cpu"]["verdict"] == "pass"
    assert rows["marenostrum5-gpp"]["verdict"] == "warn"        # InfiniBand without verbs/UCX in the image
    text = hpcconv("check", f"oci:{mpich_image}", "--profile", "all").stdout
    assert re.search(r"^lumi-c\s+PASS", text, re.M) and re.search(r"^alps-gh200\s+FAIL\s+platform:", text, re.M)
    assert "can run at:" in text and "lumi-c" in text.splitlines()[-1]


def test_profile_all_scans_once_per_platform(mpich_image, store_dir):
    from hpcconv import pipeline
    from hpcconv.sources import SourceOptions

    calls = []
    real_scan = pipeline.scan

    def counting(image, *a, **kw):
        calls.append(str(image.platform))
        return real_scan(image, *a, **kw)

    pipeline.scan = counting
    try:
        rows, _ = pipeline.check_all(f"oci:{mpich_image}", SourceOptions())
    finally:
        pipeline.scan = real_scan
    assert calls == ["linux/amd64"] and len(rows) >= 8


def test_check_exit_codes_for_user_errors(mpich_image, tmp_path):
    assert hpcconv("check", f"oci:{mpich_image}", "--profile", "lumi-cc").returncode == 2
    bad = write_profile(tmp_path, "typo", 'kind = "generic"\nextends = ["generic-x86-64"]\ndescription = "x"\n'
                        '[gpu]\nvendr = "nvidia"\n')
    r = hpcconv("check", f"oci:{mpich_image}", "--profile", str(bad))
    assert r.returncode == 2 and "typo.toml" in r.stderr and "gpu.vendr" in r.stderr
    assert hpcconv("check", f"oci:{tmp_path}/nothing", "--profile", "lumi-c").returncode == 3


def test_inspect_says_what_is_inside(mpich_image, store_dir):
    r = hpcconv("inspect", f"oci:{mpich_image}", "--json")
    assert r.returncode == 0, r.stderr
    inside = json.loads(r.stdout)["inside"]
    ldd = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout
    assert inside["glibc"]["version"] == re.search(r"(2\.\d+)\s*$", ldd.splitlines()[0]).group(1)
    assert inside["elf"]["machines"] == {"x86_64/64": 3}
    assert [f["family"] for f in inside["mpi"]["found"]] == ["mpich-abi"]
    assert inside["gpu"]["cuda"] is None and inside["fabric"]["libfabric"] is False
    text = hpcconv("inspect", f"oci:{mpich_image}").stdout
    assert "MPI: MPICH-ABI MPI (libmpi.so.12 12.2.2" in text and "libc: glibc 2." in text
    cfg = json.loads(hpcconv("inspect", f"oci:{mpich_image}", "--config-only", "--json").stdout)
    assert "inside" not in cfg


def test_profile_all_on_a_multi_arch_index_judges_each_site_on_its_platform(tmp_path, deb_cache, store_dir):
    from hpcconv import pipeline
    from hpcconv.sources import SourceOptions

    a = build_image([busybox_layer("amd64", deb_cache)])
    b = build_image([busybox_layer("arm64", deb_cache)], arch="arm64", variant="v8")
    idx, blobs = build_index([(a, {"os": "linux", "architecture": "amd64"}),
                              (b, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    layout = write_layout(tmp_path / "multi", idx, blobs)
    calls = []
    real_scan = pipeline.scan
    pipeline.scan = lambda image, *a, **kw: calls.append(str(image.platform)) or real_scan(image, *a, **kw)
    try:
        rows, _ = pipeline.check_all(f"oci:{layout}", SourceOptions())
    finally:
        pipeline.scan = real_scan
    assert sorted(calls) == ["linux/amd64", "linux/arm64"]
    by = {r["profile"]: r for r in rows}
    assert by["alps-gh200"]["platform"] == "linux/arm64" and by["alps-gh200"]["verdict"] != "fail"
    assert by["lumi-c"]["platform"] == "linux/amd64" and by["lumi-c"]["verdict"] != "fail"


def test_a_fragment_is_not_a_target(mpich_image):
    r = hpcconv("check", f"oci:{mpich_image}", "--profile", "gpu-nvidia")
    assert r.returncode == 2 and "fragment" in r.stderr and "Traceback" not in r.stderr
    r = hpcconv("convert", f"oci:{mpich_image}", "--profile", "x86-64-v3", "-o", "/nonexistent/x.sqfs")
    assert r.returncode == 2 and "fragment" in r.stderr


def test_registry_sources_get_the_platform_verdict_too(plain_registry, plain_images, store_dir):
    """Through the real registry source: a single-arch amd64 image on an arm64 site is a failed
    platform check (exit 1), not a source error (exit 3); an index is picked by the profile."""
    host = plain_registry.host
    r = hpcconv("check", f"docker://{host}/test/busybox:amd64", "--profile", "alps-gh200", "--insecure", "--json")
    assert r.returncode == 1, r.stderr
    c = {x["name"]: x for x in json.loads(r.stdout)["checks"]}
    assert list(c) == ["platform"] and c["platform"]["status"] == "fail"
    r = hpcconv("check", f"docker://{host}/test/multi:latest", "--profile", "alps-gh200", "--insecure", "--json")
    data = json.loads(r.stdout)
    assert data["platform"] == "linux/arm64" and {x["name"]: x for x in data["checks"]}["platform"]["status"] == "pass"
