"""The streaming x86 scan (rewrite.x86scan) against a plain reference over the whole segment.

The scanner sees a segment in pieces (as the tar content streams), finds match starts (with the C
module, or the regex engine: every test runs with both) and resolves VEX overlaps and clusters over
sorted start lists; the reference here
takes every VEX_RE / EVEX_RE match of the whole segment at once and slides a window over them.
Both must agree whatever the piece sizes (clusters and matches that straddle a piece boundary
included), on host binaries, on gcc-built vector loops and on random bytes with planted clusters."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcconv.rewrite import x86scan
from hpcconv.rewrite.elfinfo import IsaScan
from hpcconv.rewrite.x86scan import (EVEX_CLUSTER, EVEX_MIN_HITS, EVEX_RATE, EVEX_RE, VEX_CLUSTER, VEX_RE,
                                     X86Scanner, probable_level)
from rewritetools import VECTOR_LOOP

PIECES = [1, 2, 3, 5, 63, 64, 65, 4096, 1 << 20]


@pytest.fixture(autouse=True, params=["c", "regex"])
def matcher(request, monkeypatch):
    """Every test with the match starts found by the C module and by the regex engine."""
    if request.param == "c":
        if x86scan.native is None:
            pytest.skip("hpcconv._native is not built or HPCCONV_NO_NATIVE is set (test_native.py fails CI if not built)")
    else:
        monkeypatch.setattr(x86scan, "native", None)
    return request.param


def _cluster(ps: list[int], hits_span: tuple[int, int]) -> bool:
    need, span = hits_span
    return any(ps[i + need - 1] - ps[i] <= span for i in range(len(ps) - need + 1))


def reference(buf: bytes) -> tuple[int, int, int]:
    """(level, evex hits, vex hits) from all matches of the whole segment."""
    evex = [m.start() for m in EVEX_RE.finditer(buf)]
    vex = [m.start() for m in VEX_RE.finditer(buf)]
    if _cluster(evex, EVEX_CLUSTER) or (len(evex) >= EVEX_MIN_HITS and len(evex) * EVEX_RATE >= len(buf)):
        level = 4
    elif _cluster(vex, VEX_CLUSTER):
        level = 3
    else:
        level = 1
    return level, len(evex), len(vex)


def scanned(buf: bytes, piece: int, offset: int = 4096) -> IsaScan:
    scan = IsaScan()
    x = X86Scanner(scan)
    for i in range(0, len(buf), piece):
        x.feed(offset + i, buf[i:i + piece])
    x.close()
    return scan


def check(buf: bytes, pieces=PIECES) -> int:
    level, evex, vex = reference(buf)
    for piece in pieces:
        scan = scanned(buf, piece)
        assert probable_level(scan) == level, piece
        assert scan.bytes_scanned == len(buf)
        if level == 1:          # no cluster: every match was counted (a kind's scan stops at its cluster)
            assert (scan.evex, scan.vex) == (evex, vex), piece
    return level


def _text(path: Path) -> bytes:
    """The executable PT_LOAD segment of an ELF file (what the ELF scanner feeds)."""
    from hpcconv.rewrite.elfinfo import ElfScanner

    class E:
        pass

    e = E()
    e.path = "x"
    data = path.read_bytes()
    s = ElfScanner(e, data[:4096], lambda *a: None)
    return b"".join(data[a:b] for a, b in s._exec)


def test_random_bytes_with_planted_clusters():
    rng = random.Random(7)
    noise = bytes(rng.getrandbits(8) for _ in range(200_000))
    assert check(noise, [1, 7, 64, 4096, 1 << 20]) in (1, 4)    # random bytes: isolated matches (or a rare EVEX rate)
    vex3 = b"\xc4\xe2\x79"           # VEX3 prefix, map 2, then an opcode byte
    evex = b"\x62\xf1\x7c\x48"       # EVEX P0..P2 (zmm)
    quiet = bytes(4000)              # zeros: no match at all
    for at in (0, 61, 62, 63, 64, 65, 127, 128, 4095):
        # a cluster of 8 VEX starts within 40 bytes, placed across piece boundaries
        buf = quiet[:at] + (vex3 + b"\x90\x90") * 8 + quiet
        assert check(buf) == 3, at
        # 7 are not a cluster
        buf = quiet[:at] + (vex3 + b"\x90\x90") * 7 + quiet * 2
        assert check(buf) == 1, at
        # 4 EVEX starts within 64 bytes
        buf = quiet[:at] + (evex + b"\x90" * 12) * 4 + quiet * 3
        assert check(buf) == 4, at
    # overlapping VEX candidates count once (VEX_RE's non-overlapping matches): in C5 C5 58 C5 C5 58
    # ... a VEX2 form starts at every C5 (C5 58 C5: opcode C5), but only one per 3 bytes is a match:
    # 7 repeats are 14 candidates and 7 matches, no cluster; 8 repeats are a cluster
    for at in (0, 62, 63, 64, 65):
        assert check(quiet[:at] + b"\xc5\xc5\x58" * 7 + quiet) == 1, at
        assert check(quiet[:at] + b"\xc5\xc5\x58" * 8 + quiet) == 3, at


def test_host_binaries_agree_with_the_reference():
    for name in ("python3", "bash", "gcc"):
        exe = shutil.which(name)
        if exe is None:
            continue
        text = _text(Path(exe).resolve())
        assert text
        check(text, [4096, 65536, 1 << 20, 1 << 22])


@pytest.mark.parametrize("march,level", [("x86-64", 1), ("x86-64-v3", 3), ("x86-64-v4", 4)])
def test_gcc_vector_loops(tmp_path, march, level):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (scripts/setup-system.sh installs it)")
    src = tmp_path / "loop.c"
    src.write_text(VECTOR_LOOP)
    out = tmp_path / "loop"
    subprocess.run(["gcc", "-O3", f"-march={march}", "-o", str(out), str(src)], check=True, capture_output=True)
    assert check(_text(out)) == level


def test_segments_do_not_combine_even_out_of_order():
    """Two segments fed out of file order (an odd ELF), each with half a cluster: no cluster, and no
    match of the second is skipped because the first ended further on; the same two pieces fed as
    one contiguous segment make the cluster."""
    vex3 = b"\xc4\xe2\x79\x90\x90"
    a, b = bytes(200) + vex3 * 4, vex3 * 4 + bytes(200)     # 4 VEX matches each: half a cluster
    for first, second in ((4096, 4096 + len(a)), (100_000, 4096)):
        scan = IsaScan()
        x = X86Scanner(scan)
        x.feed(first, a)
        x.feed(second, b)
        x.close()
        if second == first + len(a):
            assert probable_level(scan) == 3
        else:
            assert probable_level(scan) == 1 and scan.vex == 8, (scan.vex, scan.vex_clusters)


def test_memoryview_pieces_scan_the_same():
    """The passes may feed read-only memoryviews of the decoded layer (entries.reader_of): the same
    findings as bytes pieces, carry-over between pieces included."""
    rng = random.Random(11)
    vex3, evex = b"\xc4\xe2\x79", b"\x62\xf1\x7c\x48"
    for at in (0, 62, 63, 64, 65, 4095):
        for buf in (bytes(at) + (vex3 + b"\x90\x90") * 8 + bytes(5000),
                    bytes(at) + (evex + b"\x90" * 12) * 4 + bytes(9000),
                    bytes(rng.getrandbits(8) for _ in range(20_000))):
            for piece in (1, 5, 63, 64, 65, 4096):
                scan = IsaScan()
                x = X86Scanner(scan)
                whole = memoryview(buf)
                for i in range(0, len(buf), piece):
                    x.feed(4096 + i, whole[i:i + piece])
                x.close()
                ref = scanned(buf, piece)
                assert (probable_level(scan), scan.evex, scan.vex, scan.bytes_scanned) == \
                    (probable_level(ref), ref.evex, ref.vex, ref.bytes_scanned), (at, piece)


def test_deferred_scanner_counts_the_chunks_its_views_keep_alive(monkeypatch):
    """A memoryview piece keeps its whole decoded chunk alive while it waits for the worker: it
    counts as the chunk (once for consecutive pieces of one chunk), so PENDING_CAP bounds memory."""
    handed = []
    submit = x86scan._submit
    monkeypatch.setattr(x86scan, "_submit", lambda n, fn, *a: (handed.append(n), submit(n, fn, *a))[1])
    a, b = bytes(5 << 20), bytes(5 << 20)
    scan = IsaScan()
    d = x86scan.DeferredScanner(scan)
    d.feed(4096, memoryview(a)[:100])
    d.feed(4196, memoryview(a)[100:300])         # the same chunk: nothing more held
    assert handed == []
    d.feed(4396, memoryview(b)[:100])            # a second chunk: 10 MiB held, past PIECES_CAP
    assert handed == [10 << 20]
    d.feed(4496, b"\x90" * 100)                  # bytes count as themselves
    d.close()
    assert handed == [10 << 20, 100]
    assert probable_level(scan) == 1 and scan.bytes_scanned == 500
