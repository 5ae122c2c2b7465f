"""glibc pass: version from the real libc.so.6 banner or from libc-2.N.so names, musl, minimum kernel
from ELF ABI notes against the site kernel, glibc floor for host-library injection."""

from __future__ import annotations

import pytest
from rewritetools import by_name, real, run_passes

from hpcconv.profiles import load_profile
from hpcconv.rewrite.glibc import GlibcPass


def site(tmp_path, name, body, base="generic-x86-64"):
    p = tmp_path / f"{name}.toml"
    p.write_text(f'extends = ["{base}"]\nkind = "generic"\nconfidence = "low"\n{body}\n')
    return load_profile(str(p))


def checks(spec, profile=None):
    return by_name(run_passes(spec, profile, [GlibcPass()]))


LIBC = [real("libc.so.6"), ("file", "bin/bash", "/usr/bin/bash")]


def test_version_from_the_real_libc_banner():
    c = checks(LIBC)
    assert c["glibc.version"].status == "pass"
    assert c["glibc.version"].detail.startswith("glibc 2.36 (Debian GLIBC 2.36-")
    assert c["glibc.kernel"].detail.startswith("needs Linux >= 3.2.0")


def test_version_from_pre_2_34_names_without_content():
    c = checks([("symlink", "lib/x86_64-linux-gnu/libc.so.6", "libc-2.31.so"),
                ("bytes", "lib/x86_64-linux-gnu/libc-2.31.so", b"\x7fELF not really")])
    assert c["glibc.version"].detail == "glibc 2.31"


def test_musl_and_nothing():
    assert checks([("bytes", "lib/ld-musl-x86_64.so.1", b"x")])["glibc.version"].detail.startswith("musl")
    assert checks([("bytes", "etc/motd", b"x")])["glibc.version"].status == "skip"


def test_image_glibc_needs_newer_kernel_than_the_site(tmp_path):
    old = site(tmp_path, "oldkernel", '[host]\nkernel = "3.1.0"')
    c = checks(LIBC, old)
    f = c["glibc.kernel"]
    assert f.status == "fail" and "needs Linux >= 3.2.0" in f.detail and "kernel too old" in f.detail
    assert checks(LIBC, site(tmp_path, "new", '[host]\nkernel = "5.14.21"'))["glibc.kernel"].status == "pass"
    assert checks(LIBC, site(tmp_path, "same", '[host]\nkernel = "3.2"'))["glibc.kernel"].status == "pass"
    assert checks(LIBC, load_profile("lumi-c"))["glibc.kernel"].status == "skip"     # kernel unknown there


def test_injection_needs_container_glibc_at_least_the_hosts(tmp_path):
    c = checks(LIBC, load_profile("perlmutter-cpu"))       # host MPI, container glibc >= 2.26
    assert c["glibc.injection"].status == "pass" and "2.36 >= 2.26" in c["glibc.injection"].detail
    newer = site(tmp_path, "newhost", '[host]\ncontainer_glibc_min = "2.38"', base="perlmutter-cpu")
    f = checks(LIBC, newer)["glibc.injection"]
    assert f.status == "fail" and "glibc >= 2.38" in f.detail and "glibc 2.36" in f.detail
    assert checks(LIBC, load_profile("juwels-booster"))["glibc.injection"].status == "pass"   # NVIDIA libs, 2.28
    assert "glibc.injection" not in checks(LIBC, load_profile("generic-x86-64"))              # nothing injected


def test_musl_image_cannot_take_host_libraries():
    f = checks([("bytes", "lib/ld-musl-x86_64.so.1", b"x")], load_profile("lumi-c"))["glibc.injection"]
    assert f.status == "fail" and "musl" in f.detail


def test_host_glibc_unknown_is_skip(tmp_path):
    p = site(tmp_path, "unk", '[host]\nglibc = "unknown"\ncontainer_glibc_min = "unknown"', base="perlmutter-cpu")
    assert checks(LIBC, p)["glibc.injection"].status == "skip"


@pytest.mark.parametrize("chunk", [7, 4096])
def test_banner_split_across_chunks(chunk):
    from hpcconv.rewrite.glibc import BannerScanner

    data = b"\0" * 5000 + b"GNU C Library (Ubuntu GLIBC 2.35-0ubuntu3.8) stable release version 2.35.\n" + b"\0" * 100
    s = BannerScanner()
    for i in range(0, len(data), chunk):
        s.feed(i, data[i:i + chunk])
    assert (s.version, s.build) == ("2.35", "Ubuntu GLIBC 2.35-0ubuntu3.8")
