"""ELF pass: machine against the profile, ISA level from GNU property notes (fail), glibc-hwcaps (pass),
AVX/AVX-512 instruction scan (warn), on real Debian binaries and small programs gcc builds here."""

from __future__ import annotations

import pytest
from conftest import need
from dockertools import busybox_binary
from rewritetools import CLIBDIR, VECTOR_LOOP, by_name, compile_c, real, real_name, run_passes

from hpcconv.profiles import load_profile
from hpcconv.rewrite.elf import ElfPass
from hpcconv.rewrite.elfinfo import ElfScanner
from hpcconv.entries import FILE, Entry


@pytest.fixture(scope="module")
def progs(tmp_path_factory):
    need("gcc")
    d = tmp_path_factory.mktemp("isa")
    return {
        "v1": compile_c(d, "v1", VECTOR_LOOP, "-march=x86-64"),
        "v3": compile_c(d, "v3", VECTOR_LOOP, "-march=x86-64-v3"),
        "v4": compile_c(d, "v4", VECTOR_LOOP, "-march=x86-64-v4"),
        "v4note": compile_c(d, "v4note", VECTOR_LOOP, "-march=x86-64-v4", "-Wl,-z,x86-64-v4"),
        "v3note": compile_c(d, "v3note", VECTOR_LOOP, "-march=x86-64-v3", "-Wl,-z,x86-64-v3"),
    }


def elf_info(path, scan=True):
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    s = ElfScanner(Entry(str(path).lstrip("/"), FILE, size=len(data)), data[:65536],
                   lambda e, i: out.setdefault("i", i), scan_instructions=scan)
    s.feed(0, data[:65536])
    s.feed(65536, data[65536:]) if len(data) > 65536 else None
    s.close(True)
    return out["i"]


def elf_checks(spec, profile):
    return by_name(run_passes(spec, load_profile(profile) if profile else None, [ElfPass()]))


def test_elf_facts_of_real_files(progs):
    bash = elf_info("/usr/bin/bash")
    assert (bash.machine_name, bash.elf_class, bash.kind) == ("x86_64", 64, "dyn")
    assert bash.interp == "/lib64/ld-linux-x86-64.so.2" and "libc.so.6" in bash.needed
    libc = elf_info(f"/{CLIBDIR}/libc.so.6")
    assert libc.soname == "libc.so.6" and libc.abi_tag == (0, (3, 2, 0))
    fab = elf_info(f"/{CLIBDIR}/{real_name('libfabric.so.1')}")
    assert {"libpsm2.so.2", "libibverbs.so.1", "librdmacm.so.1"} <= set(fab.needed)
    assert elf_info(progs["v4note"]).isa_level_needed == 4
    assert elf_info(progs["v3note"]).isa_level_needed == 3
    assert elf_info(progs["v4"]).isa_level_needed in (None, 1)    # no marker without -z x86-64-v4


def test_amd64_image_on_arm64_profile_fails():
    c = elf_checks([("file", "bin/bash", "/usr/bin/bash"), real("libc.so.6")], "generic-aarch64")
    assert c["elf.machine"].status == "fail"
    assert "x86_64/64" in c["elf.machine"].detail and "aarch64" in c["elf.machine"].detail
    assert "--platform linux/arm64" in c["elf.machine"].detail


def test_arm64_binary_on_x86_profile_fails(deb_cache, tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(busybox_binary("arm64", deb_cache))
    c = elf_checks([("file", "bin/busybox", str(bb))], "lumi-c")
    assert c["elf.machine"].status == "fail" and "aarch64/64" in c["elf.machine"].detail
    c = elf_checks([("file", "bin/busybox", str(bb))], "alps-gh200")
    assert c["elf.machine"].status == "pass"


def test_matching_arch_passes_and_baseline_code_is_fine(progs):
    c = elf_checks([("file", "usr/bin/app", str(progs["v1"])), ("file", "bin/bash", "/usr/bin/bash")], "lumi-c")
    assert c["elf.machine"].status == "pass" and c["elf.isa-scan"].status == "pass"
    assert "elf.isa-needed" not in c


def test_avx512_binary_on_v3_site_warns_with_the_fix(progs):
    c = elf_checks([("file", "usr/local/bin/app", str(progs["v4"]))], "perlmutter-cpu")
    w = c["elf.isa-scan"]
    assert w.status == "warn" and "AVX-512" in w.detail and "/usr/local/bin/app" in w.detail
    assert "x86-64-v3" in w.detail and "-march=x86-64-v3" in w.detail
    assert elf_checks([("file", "usr/local/bin/app", str(progs["v4"]))], "supermuc-ng")["elf.isa-scan"].status == "pass"


def test_avx2_binary_on_v2_site_warns(progs, tmp_path):
    prof = tmp_path / "v2site.toml"
    prof.write_text('extends = ["x86-64-v2"]\nkind = "generic"\nconfidence = "low"\n')
    c = by_name(run_passes([("file", "opt/app", str(progs["v3"]))], load_profile(str(prof)), [ElfPass()]))
    assert c["elf.isa-scan"].status == "warn" and "AVX/AVX2" in c["elf.isa-scan"].detail
    assert elf_checks([("file", "opt/app", str(progs["v3"]))], "lumi-c")["elf.isa-scan"].status == "pass"


def test_isa_note_above_site_level_fails(progs):
    c = elf_checks([("file", "usr/bin/app", str(progs["v4note"]))], "lumi-g")
    f = c["elf.isa-needed"]
    assert f.status == "fail" and "x86-64-v4" in f.detail and "glibc refuses" in f.detail
    assert elf_checks([("file", "usr/bin/app", str(progs["v3note"]))], "lumi-g")["elf.isa-needed"].status == "pass"


def test_dispatching_libraries_are_not_scanned():
    """Debian's libc and libcrypto carry AVX-512 paths chosen at run time: no warning for them."""
    c = elf_checks([real("libc.so.6"), real("libcrypto.so.3")], "perlmutter-cpu")
    assert c["elf.isa-scan"].status == "pass"


def test_glibc_hwcaps_directories_are_reported(progs):
    c = elf_checks([("file", f"{CLIBDIR}/glibc-hwcaps/x86-64-v3/libfoo.so.1", str(progs["v3"])),
                    ("file", f"{CLIBDIR}/libfoo.so.1", str(progs["v1"]))], "lumi-c")
    assert c["elf.hwcaps"].status == "pass" and "x86-64-v3" in c["elf.hwcaps"].detail
    assert c["elf.isa-scan"].status == "pass"     # hwcaps copies are not scanned: the loader picks them


def test_no_elf_files_is_skip():
    c = elf_checks([("bytes", "etc/motd", b"hi\n")], "lumi-c")
    assert c["elf.machine"].status == "skip"


def test_inspect_without_profile_reports_facts(progs):
    c = elf_checks([("file", "usr/bin/app", str(progs["v4note"]))], None)
    assert c["elf.machine"].status == "pass" and "x86_64/64" in c["elf.machine"].detail
    assert c["elf.isa-needed"].status == "pass" and "x86-64-v4" in c["elf.isa-needed"].detail
