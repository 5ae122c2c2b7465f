"""Fabric pass on real Debian rdma-core, libfabric, PSM2 and UCX files."""

from __future__ import annotations

from rewritetools import CLIBDIR, LIBDIR, by_name, real, run_passes

from hpcconv.profiles import load_profile
from hpcconv.rewrite.fabric import FabricPass

OPENMPI = [real("libmpi.so.40"), real("libopen-pal.so.40")]
PSM2 = [real("libpsm2.so.2")]
LIBFABRIC = [real("libfabric.so.1")]       # Debian's: psm2, verbs, efa built in (DT_NEEDED)
VERBS = [real("libibverbs.so.1"), real("libmlx5-rdmav34.so", f"{CLIBDIR}/libibverbs", f"{LIBDIR}/libibverbs"),
         ("bytes", "etc/libibverbs.d/mlx5.driver", b"driver mlx5\n")]
UCX = [real("libucp.so.0"), real("libuct_ib.so.0", f"{CLIBDIR}/ucx", f"{LIBDIR}/ucx")]
MCA_DIR = f"{LIBDIR}/openmpi/lib/openmpi3"


def mca(*names):
    return [real(f"mca_{n}.so", f"{CLIBDIR}/openmpi/lib/openmpi3", MCA_DIR) for n in names]


def checks(spec, profile=None):
    return by_name(run_passes(spec, load_profile(profile) if profile else None, [FabricPass()]))


def test_detects_real_stacks():
    d = checks(PSM2 + LIBFABRIC + VERBS + UCX)["fabric.detect"].detail
    assert "PSM2" in d and "verbs (mlx5)" in d and "UCX with IB transport" in d
    assert "libfabric [" in d and "psm2" in d and "verbs" in d     # built-in providers from DT_NEEDED


def test_omnipath_site_image_without_psm2_warns_with_the_fix():
    w = checks(OPENMPI, "supermuc-ng")["fabric.support"]
    assert w.status == "warn" and "fall back to TCP" in w.detail
    assert "libpsm2-2" in w.detail and "FI_PROVIDER=psm2" in w.detail


def test_omnipath_site_with_psm2_or_libfabric_psm2_passes():
    assert checks(OPENMPI + PSM2, "supermuc-ng")["fabric.support"].status == "pass"
    # libfabric alone: its psm2 provider is built in (it needs libpsm2.so.2, which the pass reads from DT_NEEDED)
    assert checks(OPENMPI + LIBFABRIC, "supermuc-ng")["fabric.support"].status == "pass"


def test_infiniband_site():
    assert checks(OPENMPI + VERBS + UCX, "juwels-booster")["fabric.support"].status == "pass"
    w = checks(OPENMPI + UCX + [real("libibverbs.so.1")], "juwels-booster")["fabric.support"]
    assert w.status == "warn" and "mlx5 verbs provider" in w.detail and "ibverbs-providers" in w.detail
    w = checks(OPENMPI + VERBS + [real("libucp.so.0")], "juwels-booster")["fabric.support"]
    assert w.status == "warn" and "libuct_ib" in w.detail


def test_slingshot_site():
    w = checks(OPENMPI + LIBFABRIC, "alps-gh200")["fabric.support"]       # container MPI, no cxi
    assert w.status == "warn" and "cxi" in w.detail and "SLINGSHOT_" in w.detail
    assert checks(OPENMPI + LIBFABRIC, "lumi-c")["fabric.support"].status == "pass"    # host MPI brings cxi
    cxi = [("bytes", f"{CLIBDIR}/libfabric/libcxi-fi.so", b"x")]
    assert checks(LIBFABRIC + cxi, "alps-gh200")["fabric.support"].status == "pass"


def test_tcp_site_and_env():
    assert checks(OPENMPI, "generic-x86-64")["fabric.support"].status == "pass"
    env = checks(OPENMPI + PSM2, "supermuc-ng")
    assert "fabric.env" not in env      # supermuc-ng's env is MPI env (mpi.env), not interconnect.env


def test_open_mpi_components_decide():
    """Debian's Open MPI components as DSOs: without a psm2/ofi MTL (or a UCX PML on IB) it uses TCP."""
    assert checks(OPENMPI + PSM2 + mca("btl_tcp", "mtl_psm2"), "supermuc-ng")["fabric.support"].status == "pass"
    w = checks(OPENMPI + PSM2 + mca("btl_tcp", "pml_ob1"), "supermuc-ng")["fabric.support"]
    assert w.status == "warn" and "mca_mtl_psm2" in w.detail and "--with-psm2" in w.detail
    assert checks(OPENMPI + VERBS + UCX + mca("pml_ucx"), "juwels-booster")["fabric.support"].status == "pass"
    w = checks(OPENMPI + VERBS + UCX + mca("btl_tcp", "pml_ob1"), "juwels-booster")["fabric.support"]
    assert w.status == "warn" and "--with-ucx" in w.detail
