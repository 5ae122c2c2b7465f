"""GPU pass: a (fake) CUDA runtime against site drivers, forward compat, baked driver libraries, ROCm."""

from __future__ import annotations

import pytest
from conftest import need
from rewritetools import by_name, compile_c, run_passes

from hpcconv.profiles import load_profile
from hpcconv.rewrite.gpu import TOOLKIT_DRIVER, GpuPass, driver_ok

CUDA_DIR = "usr/local/cuda-12.4/targets/x86_64-linux/lib"


@pytest.fixture(scope="module")
def fake_cudart(tmp_path_factory):
    """A shared object with the soname and file name of the CUDA 12.4 runtime (not NVIDIA's code)."""
    need("gcc")
    d = tmp_path_factory.mktemp("cuda")
    return compile_c(d, "libcudart.so.12.4.127", "int cudaRuntimeGetVersion(int *v) { *v = 12040; return 0; }\n",
                     "-shared", "-fPIC", "-Wl,-soname,libcudart.so.12")


def cuda_image(lib):
    return [("file", f"{CUDA_DIR}/libcudart.so.12.4.127", str(lib)),
            ("symlink", f"{CUDA_DIR}/libcudart.so.12", "libcudart.so.12.4.127")]


def site(tmp_path, name, body, base="perlmutter-gpu"):
    p = tmp_path / f"{name}.toml"
    p.write_text(f'extends = ["{base}"]\n{body}\n')
    return load_profile(str(p))


def checks(spec, profile):
    return by_name(run_passes(spec, profile, [GpuPass()]))


def test_cuda_12_4_against_driver_470_fails(fake_cudart, tmp_path):
    f = checks(cuda_image(fake_cudart), site(tmp_path, "d470", '[gpu]\ndriver = "470.82.01"'))["gpu.cuda"]
    assert f.status == "fail" and "CUDA 12.4.127" in f.detail and "550.54.14" in f.detail
    assert "525.60.13" in f.detail and "rebuild on a CUDA 11.4" in f.detail


def test_cuda_12_4_against_driver_550_passes(fake_cudart, tmp_path):
    assert checks(cuda_image(fake_cudart), site(tmp_path, "d550", '[gpu]\ndriver = "550"'))["gpu.cuda"].status == "pass"
    assert checks(cuda_image(fake_cudart), site(tmp_path, "d550x", '[gpu]\ndriver = "550.54.14"'))["gpu.cuda"].status == "pass"
    assert checks(cuda_image(fake_cudart), load_profile("perlmutter-gpu"))["gpu.cuda"].status == "pass"


def test_minor_version_compatibility_warns(fake_cudart, tmp_path):
    w = checks(cuda_image(fake_cudart), site(tmp_path, "d535", '[gpu]\ndriver = "535.129.03"'))["gpu.cuda"]
    assert w.status == "warn" and "minor-version compatibility" in w.detail and "PTX" in w.detail


def test_forward_compatibility_needs_datacenter_gpu(fake_cudart, tmp_path):
    img = cuda_image(fake_cudart) + [("bytes", "usr/local/cuda-12.4/compat/libcuda.so.550.54.15", b"x")]
    w = checks(img, site(tmp_path, "d470dc", '[gpu]\ndriver = "470.82.01"'))["gpu.cuda"]
    assert w.status == "warn" and "forward" in w.detail
    consumer = site(tmp_path, "d470gf", '[gpu]\ndriver = "470.82.01"\nclass = "consumer"')
    assert checks(img, consumer)["gpu.cuda"].status == "fail"


def test_unknown_driver_is_skip_and_no_gpu_site_warns(fake_cudart):
    assert checks(cuda_image(fake_cudart), load_profile("juwels-booster"))["gpu.cuda"].status == "skip"
    assert checks(cuda_image(fake_cudart), load_profile("lumi-c"))["gpu.cuda"].status == "warn"


def test_baked_driver_libraries_warn(fake_cudart):
    img = cuda_image(fake_cudart) + [("bytes", "usr/lib/x86_64-linux-gnu/libcuda.so.550.54.14", b"x")]
    w = checks(img, load_profile("perlmutter-gpu"))["gpu.driver-libs"]
    assert w.status == "warn" and "remove them" in w.detail


def test_rocm(tmp_path):
    img = [("dir", "opt/rocm-6.0.3/lib"), ("bytes", "opt/rocm-6.0.3/lib/libamdhip64.so.6.0.60003", b"x")]
    assert checks(img, load_profile("lumi-g"))["gpu.rocm"].status == "skip"          # host ROCm unknown
    assert checks(img, site(tmp_path, "r61", '[gpu]\nrocm = "6.1"', base="lumi-g"))["gpu.rocm"].status == "pass"
    f = checks(img, site(tmp_path, "r64", '[gpu]\nrocm = "6.4"', base="lumi-g"))["gpu.rocm"]
    assert f.status == "fail" and "+-2 releases" in f.detail
    assert checks(img, load_profile("perlmutter-gpu"))["gpu.rocm"].status == "warn"  # no AMD GPU there


def test_nothing_gpu():
    assert checks([("bytes", "etc/motd", b"x")], load_profile("lumi-g"))["gpu.detect"].status == "skip"


def test_driver_comparison_and_table():
    assert driver_ok("550", "550.54.14") and not driver_ok("545", "550.54.14")
    assert driver_ok("550.54.15", "550.54.14") and not driver_ok("550.54.13", "550.54.14")
    assert TOOLKIT_DRIVER[(12, 4)] == "550.54.14" and TOOLKIT_DRIVER[(11, 8)] == "520.61.05"


def test_cuda_version_from_env_and_version_files(tmp_path):
    d470 = site(tmp_path, "d470b", '[gpu]\ndriver = "470.82.01"')
    # nvidia/cuda base images declare CUDA_VERSION in the config: it wins over file names
    c = by_name(run_passes([("bytes", "etc/motd", b"x")], d470, [GpuPass(["PATH=/bin", "CUDA_VERSION=11.4.3"])]))
    assert c["gpu.cuda"].status == "pass" and "image env CUDA_VERSION" not in c["gpu.cuda"].detail
    c = by_name(run_passes([("bytes", "etc/motd", b"x")], d470, [GpuPass(["CUDA_VERSION=12.8.1"])]))
    assert c["gpu.cuda"].status == "fail" and "(image env CUDA_VERSION)" in c["gpu.cuda"].detail
    vj = b'{"cuda": {"name": "CUDA SDK", "version": "13.0.2"}, "cuda_cudart": {"version": "13.0.96"}}'
    c = checks([("bytes", "usr/local/cuda-13.0/version.json", vj)], d470)
    assert c["gpu.cuda"].status == "fail" and "CUDA 13.0.2 (/usr/local/cuda-13.0/version.json)" in c["gpu.cuda"].detail
    c = checks([("bytes", "usr/local/cuda-10.2/version.txt", b"CUDA Version 10.2.89\n")], d470)
    assert c["gpu.cuda"].status == "pass" and "10.2.89" in c["gpu.cuda"].detail
