"""A streaming byte-pattern scan of x86-64 code for VEX (AVX/AVX2/FMA/BMI) and EVEX (AVX-512) encodings.

No disassembly: the scan matches the fixed bits of the encodings (EVEX: 62, P0 with bits 3..2 clear and
a map of 1..3, P1 with bit 2 set, P2 without the reserved vector length 11 unless rounding; VEX3: C4
with a map of 1..3; VEX2: C5 followed by an opcode VEX defines) and counts *clusters*: at least
N matches within a span of bytes (VEX_CLUSTER, EVEX_CLUSTER). Random bytes match an EVEX pattern about once in
3,000 bytes, so isolated matches are noise, while compiled vector loops put several vector instructions
next to each other. The result is a hint ("probably needs"), which is why the ELF pass only warns on it.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections import deque

from ..speedups import native


def _cls(pred) -> bytes:
    return b"[" + b"".join(re.escape(bytes([v])) for v in range(256) if pred(v)) + b"]"


def _p0(v: int) -> bool:
    return (v & 0x0C) == 0 and (v & 0x03) != 0


def _p1(v: int) -> bool:
    return bool(v & 0x04)


def _p2(v: int) -> bool:
    return ((v >> 5) & 3) != 3 or bool(v & 0x10)


def _vex3_b1(v: int) -> bool:
    return (v & 0x1F) in (1, 2, 3)


def _vex2_op(v: int) -> bool:
    """Opcodes of the implied 0F map that have VEX forms."""
    return (v in range(0x10, 0x18) or v in range(0x28, 0x30) or v in range(0x50, 0x80)
            or v in (0x77, 0xAE, 0xC2, 0xC4, 0xC5, 0xC6) or v in range(0xD0, 0x100))


def _any(v: int) -> bool:
    return True


_P0, _P1, _P2, _VEX3_B1, _VEX2_OP = map(_cls, (_p0, _p1, _p2, _vex3_b1, _vex2_op))

EVEX_RE = re.compile(b"\x62" + _P0 + _P1 + _P2, re.S)
VEX_RE = re.compile(b"\xc4" + _VEX3_B1 + b".|\xc5." + _VEX2_OP, re.S)


def _table(*preds) -> bytes:
    """The same pattern for `native.match_starts`: one 256-byte membership table per position."""
    return b"".join(bytes(1 if pred(v) else 0 for v in range(256)) for pred in preds)


_EVEX_TABLES = (_table(lambda v: v == 0x62, _p0, _p1, _p2),)
_VEX_TABLES = (_table(lambda v: v == 0xC4, _vex3_b1, _any), _table(lambda v: v == 0xC5, _any, _vex2_op))
# The same matches, found ~5x faster: each alternative alone has a literal first byte that the regex
# engine searches for quickly (the alternation has none); every candidate start (overlaps included,
# via lookahead) is then taken left to right without overlap, which is exactly what VEX_RE.finditer
# yields (both alternatives are 3 bytes long and differ in their first byte).
_VEX3_AT = re.compile(b"\xc4(?=" + _VEX3_B1 + b".)", re.S)
_VEX2_AT = re.compile(b"\xc5(?=." + _VEX2_OP + b")", re.S)


_start = re.Match.start


def _exact_vex(starts: list[int]) -> list[int]:
    """VEX_RE.finditer's starts from the sorted union of both alternatives' candidate starts:
    taken left to right without overlap (both alternatives are 3 bytes long)."""
    out: list[int] = []
    end = -1
    for p in starts:
        if p >= end:
            out.append(p)
            end = p + 3
    return out


def _has_cluster(ps: list[int], need: int, span: int) -> bool:
    """Some `need` consecutive starts of the sorted `ps` lie within `span` bytes."""
    return len(ps) >= need and any(b - a <= span for a, b in zip(ps, ps[need - 1:]))

# (hits, span): calibrated on Debian 12 binaries without vector code (python3.11, gcc, bash, libmpich,
# libfabric, libstdc++: no cluster) and on gcc -O3 -march=x86-64-v3/-v4 builds of a small loop (clusters).
VEX_CLUSTER = (8, 64)
EVEX_CLUSTER = (4, 64)
#: a small code body with at least this many EVEX matches, one per RATE bytes or denser, counts too
EVEX_MIN_HITS, EVEX_RATE = 3, 500
_OVERLAP = 3


class _Kind:
    """One encoding's matches: their count, and whether a cluster was seen (`need` matches within
    `span` bytes). The scan of a kind stops at its first cluster: more bytes cannot change the
    verdict for it (`probable_level`). Matches are VEX_RE's / EVEX_RE's over the whole segment,
    left to right without overlap, also across the pieces it arrives in."""

    def __init__(self, hits_span: tuple[int, int], vex: bool):
        self.need, self.span = hits_span
        self.vex = vex
        self.tables = _VEX_TABLES if vex else _EVEX_TABLES
        self.hits = 0
        self.count = 0
        self._recent: list[int] = []          # the last need-1 starts (absolute), for the next piece
        self._end = 0                         # where the last match ended (absolute)

    def new_segment(self) -> None:
        """Matches and clusters do not reach across segments (which may even come out of order in
        an odd ELF file)."""
        self._recent = []
        self._end = 0

    def lo(self, base: int) -> int:
        """Where in a buffer at file offset `base` the next match may start."""
        return max(0, self._end - base)

    def starts(self, buf: bytes, base: int, limit: int) -> list[int]:
        """Match starts in buf[:limit] (buf starts at file offset `base`), with the regex engine
        (`native.match_starts` finds the same for all kinds in one pass)."""
        lo = self.lo(base)
        if not self.vex:
            ps = list(map(_start, EVEX_RE.finditer(buf, lo)))
        else:
            # candidates of both alternatives, sorted: a superset of the matches
            ps = sorted(list(map(_start, _VEX3_AT.finditer(buf, lo))) + list(map(_start, _VEX2_AT.finditer(buf, lo))))
        n = bisect.bisect_left(ps, limit)
        if n < len(ps):
            ps = ps[:n]
        return _exact_vex(ps) if self.vex else ps

    def take(self, ps: list[int], base: int) -> None:
        """Count the match starts of one piece and look for a cluster."""
        if not ps:
            return
        self.hits += len(ps)
        self._end = base + ps[-1] + (3 if self.vex else 4)
        k = self.need - 1
        joint = [p - base for p in self._recent] + ps[:k]
        if _has_cluster(joint, self.need, self.span) or _has_cluster(ps, self.need, self.span):
            self.count = 1
        self._recent = (self._recent + [base + p for p in ps[-k:]])[-k:]


class X86Scanner:
    """Feed consecutive (offset, bytes) pieces of executable segments; results land in ``scan``."""

    def __init__(self, scan):
        self.scan = scan
        self._evex, self._vex = _Kind(EVEX_CLUSTER, vex=False), _Kind(VEX_CLUSTER, vex=True)
        self._tail = b""
        self._tail_off = 0
        self._next: int | None = None

    def _open_kinds(self):
        """The encodings still worth scanning for: one EVEX cluster decides level 4 and one VEX
        cluster level 3 (`probable_level`), so once found, more bytes cannot change the verdict
        for that kind and its scan stops (the hit counts then stop too)."""
        if self._evex.count:
            return ()
        if self._vex.count:
            return (self._evex,)
        return (self._evex, self._vex)

    def feed(self, offset: int, data: bytes) -> None:
        self.scan.bytes_scanned += len(data)
        kinds = self._open_kinds()
        if not kinds:
            return
        if self._next != offset:          # a new segment: no carry-over between segments
            self._tail = b""
            for kind in kinds:
                kind.new_segment()
        tail, n = self._tail, len(data)
        self._next = offset + n
        # A match that starts less than _OVERLAP bytes before the end of what has arrived may not be
        # complete yet: those bytes carry over to the next piece.
        if n >= _OVERLAP:
            if tail:                       # matches starting in the carried bytes end in data[:_OVERLAP]
                _scan(kinds, tail + data[:_OVERLAP], self._tail_off, len(tail))
            if n > _OVERLAP:               # the piece itself, not copied
                _scan(kinds, data, offset, n - _OVERLAP)
            self._tail = bytes(data[n - _OVERLAP:])     # (data may be a memoryview: see Scanner)
            self._tail_off = offset + n - _OVERLAP
            return
        buf = tail + data                  # a piece shorter than the carry
        base = offset - len(tail)
        limit = len(buf) - _OVERLAP
        if limit > 0:
            _scan(kinds, buf, base, limit)
        cut = max(limit, 0)
        self._tail = buf[cut:]
        self._tail_off = base + cut

    def close(self) -> None:
        if self._tail:
            _scan(self._open_kinds(), self._tail, self._tail_off, len(self._tail))
        self.scan.evex, self.scan.evex_clusters = self._evex.hits, self._evex.count
        self.scan.vex, self.scan.vex_clusters = self._vex.hits, self._vex.count


class DeferredScanner:
    """An X86Scanner whose work runs on one worker thread: `feed` keeps the pieces (references, no
    copy) and hands them over every PIECES_CAP bytes and at `close`; the worker feeds them to the
    real scanner in order (one thread: jobs run in the order given) and fills the IsaScan, which
    `IsaScan.wait()` (called by `probable_level`) waits for. The scan is C without the GIL, so the
    thread that reads the layers, the busiest one, no longer spends its time on it. Pieces waiting
    for the worker are capped at PENDING_CAP bytes in all: past that, the oldest jobs are waited for.
    A piece that is a memoryview (entries.reader_of) keeps its whole decoded chunk alive: it counts
    as that chunk (once for consecutive pieces of one chunk), so the cap bounds the memory held."""

    def __init__(self, scan):
        self.scan = scan
        self._real = X86Scanner(scan)          # used on the worker thread only
        self._pieces: list[tuple[int, bytes]] = []
        self._bytes = 0
        self._chunk = None                     # the chunk the last piece viewed (counted already)

    def feed(self, offset: int, data: bytes) -> None:
        self._pieces.append((offset, data))
        if type(data) is memoryview:
            if data.obj is not self._chunk:
                self._chunk = data.obj
                self._bytes += len(data.obj)
        else:
            self._bytes += len(data)
        if self._bytes >= PIECES_CAP:
            self._hand_over(False)

    def close(self) -> None:
        self._hand_over(True)

    def _hand_over(self, last: bool) -> None:
        pieces, n = self._pieces, self._bytes
        self._pieces, self._bytes, self._chunk = [], 0, None
        self.scan.pending = _submit(n, _run_scan, self._real, pieces, last)


def _run_scan(real: X86Scanner, pieces: list[tuple[int, bytes]], last: bool) -> None:
    for offset, data in pieces:
        real.feed(offset, data)
    if last:
        real.close()


PIECES_CAP = 8 << 20
PENDING_CAP = 32 << 20
_worker = None
_queued: deque = deque()            # (future, bytes) not known to be done
_lock = threading.Lock()


def _submit(nbytes: int, fn, *args):
    """fn(*args) on the worker thread, `nbytes` of pieces held until it ran."""
    global _worker
    with _lock:
        if _worker is None:
            from concurrent.futures import ThreadPoolExecutor

            _worker = ThreadPoolExecutor(1, thread_name_prefix="x86scan")
        while _queued and (_queued[0][0].done() or sum(n for _, n in _queued) > PENDING_CAP):
            _queued.popleft()[0].result()
        fut = _worker.submit(fn, *args)
        _queued.append((fut, nbytes))
    return fut


def _scan(kinds, buf: bytes, base: int, limit: int) -> None:
    if not kinds:
        return
    if native is not None:
        found = native.match_starts(buf, limit, tuple((k.lo(base), k.tables) for k in kinds))
    else:
        found = [k.starts(buf, base, limit) for k in kinds]
    for k, ps in zip(kinds, found):
        k.take(ps, base)


def probable_level(scan) -> int:
    """x86-64 level the scanned code probably needs: 4 (AVX-512), 3 (AVX/AVX2/FMA) or 1 (nothing seen)."""
    if scan is None:
        return 1
    scan.wait()
    if scan.evex_clusters or (scan.evex >= EVEX_MIN_HITS and scan.evex * EVEX_RATE >= scan.bytes_scanned):
        return 4
    if scan.vex_clusters:
        return 3
    return 1
