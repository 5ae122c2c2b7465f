"""MPI pass: family/version from the real Debian Open MPI and MPICH files, and the Sarus-style ABI check
against a host-MPI profile (family, major: fail; minor: warn under 'full', fail under 'strict')."""

from __future__ import annotations

from rewritetools import CLIBDIR, by_name, real, real_name, run_passes

from hpcconv.profiles import load_profile
from hpcconv.rewrite.mpi import MpiPass

OMPI = real_name("libmpi.so.40")          # e.g. libmpi.so.40.30.4 (Open MPI 4.1)
MPICH = real_name("libmpich.so.12")       # e.g. libmpich.so.12.2.2 (MPICH 4.0)

OPENMPI_IMAGE = [real("libmpi.so.40"), ("symlink", f"{CLIBDIR}/libmpi.so.40", OMPI),
                 real("libopen-pal.so.40"), real("libopen-rte.so.40"), real("libpmix.so.2")]
# upstream MPICH installs libmpi.so.12 as the real library; Debian names it libmpich.so.12: both forms
MPICH_IMAGE = [real("libmpich.so.12"), ("symlink", f"{CLIBDIR}/libmpich.so.12", MPICH),
               ("symlink", f"{CLIBDIR}/libmpi.so.12", MPICH)]


def site(tmp_path, name, body, base="perlmutter-cpu"):
    p = tmp_path / f"{name}.toml"
    p.write_text(f'extends = ["{base}"]\n{body}\n')
    return load_profile(str(p))


def checks(spec, profile=None):
    return by_name(run_passes(spec, profile, [MpiPass()]))


def test_detects_open_mpi_from_real_files():
    d = checks(OPENMPI_IMAGE)["mpi.detect"]
    assert d.status == "pass" and d.detail.startswith("Open MPI 4.1.x") and f"/{CLIBDIR}/{OMPI}" in d.detail


def test_detects_mpich_abi_from_real_files():
    d = checks(MPICH_IMAGE)["mpi.detect"]
    assert d.status == "pass" and d.detail.startswith("MPICH") and "libmpi.so.12" in d.detail


def test_open_mpi_image_on_mpich_abi_host_fails_with_the_reason():
    f = checks(OPENMPI_IMAGE, load_profile("perlmutter-cpu"))["mpi.abi"]
    assert f.status == "fail"
    assert "Open MPI" in f.detail and "libmpi.so.40" in f.detail and "libmpi.so.12" in f.detail
    assert "MPICH" in f.detail and "mpi.mode = 'container'" in f.detail


def test_mpich_abi_image_on_mpich_abi_host_passes_prepared():
    p = checks(MPICH_IMAGE, load_profile("perlmutter-cpu"))["mpi.abi"]
    assert p.status == "pass" and "/opt/udiImage/modules/mpich" in p.detail and "first" in p.detail


def test_minor_rules(tmp_path):
    older = site(tmp_path, "older", '[mpi]\nabi = "12.1"')         # host 12.1 < image 12.2
    w = checks(MPICH_IMAGE, older)["mpi.abi"]
    assert w.status == "warn" and "older than the container's" in w.detail and "minor <= 1" in w.detail
    assert checks(MPICH_IMAGE, site(tmp_path, "newer", '[mpi]\nabi = "12.3"'))["mpi.abi"].status == "pass"
    strict = site(tmp_path, "strict", '[mpi]\nabi = "12.3"\ncompat = "strict"')
    assert checks(MPICH_IMAGE, strict)["mpi.abi"].status == "fail"
    major = site(tmp_path, "major", '[mpi]\nabi = "12.1"\ncompat = "major"')
    assert checks(MPICH_IMAGE, major)["mpi.abi"].status == "pass"


def test_open_mpi_image_on_open_mpi_host(tmp_path):
    p = tmp_path / "omhost.toml"
    p.write_text('extends = ["lumi-c", "openmpi-host"]\n[mpi]\nabi = "40.40"\n')
    prof = load_profile(str(p))
    assert prof.mpi.family == "openmpi"
    assert checks(OPENMPI_IMAGE, prof)["mpi.abi"].status == "pass"        # host 5.0 (40.40) >= image 4.1 (40.30)
    f = checks(MPICH_IMAGE, prof)["mpi.abi"]
    assert f.status == "fail" and "MPICH" in f.detail


def test_open_mpi_1_10_trap():
    """libmpi.so.12 next to libopen-pal is Open MPI 1.10: same soname as the MPICH ABI, incompatible."""
    spec = [("bytes", "usr/lib/libmpi.so.12.0.2", b"x"), ("symlink", "usr/lib/libmpi.so.12", "libmpi.so.12.0.2"),
            ("bytes", "usr/lib/libopen-pal.so.13.0.2", b"x")]
    assert checks(spec)["mpi.detect"].detail.startswith("Open MPI 1.10")
    f = checks(spec, load_profile("lumi-c"))["mpi.abi"]
    assert f.status == "fail" and "Open MPI 1.10, not the MPICH ABI" in f.detail


def test_two_families_warn():
    w = checks(OPENMPI_IMAGE + MPICH_IMAGE)["mpi.detect"]
    assert w.status == "warn" and "exactly one libmpi family" in w.detail


def test_no_mpi_and_container_mode():
    assert checks([real("libc.so.6")], load_profile("lumi-c"))["mpi.detect"].status == "skip"
    c = checks(OPENMPI_IMAGE, load_profile("alps-gh200"))      # container MPI: report only
    assert c["mpi.detect"].status == "pass" and "mpi.abi" not in c
