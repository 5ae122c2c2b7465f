"""The pass framework: one pass over the stream, head replay, scanners see every byte once, the
reader contract, bounded memory in the ELF scanner."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
from rewritetools import CLIBDIR, LIBDIR, ViewReader, real, real_name, stream

from hpcconv.entries import FILE, Entry, TarWriter, read_tar_entries, reader_of
from hpcconv.rewrite.base import HEAD_SIZE, Pass, PassRunner, Scanner
from hpcconv.speedups import native
from hpcconv.rewrite.elfinfo import PREFIX_CAP, SEGMENT_CAP, ElfScanner

BIG = real_name("libmpich.so.12")      # ~40 MB real library
FABRIC = real_name("libfabric.so.1")
OMPI = real_name("libmpi.so.40")


class Hasher(Scanner):
    def __init__(self, path, log):
        self.path, self.log, self.h, self.next = path, log, hashlib.sha256(), 0

    def feed(self, offset, data):
        assert offset == self.next, "bytes must arrive in order, once"
        self.h.update(data)
        self.next += len(data)

    def close(self, complete):
        self.log[self.path] = (self.h.hexdigest(), self.next, complete)


class HashPass(Pass):
    name = "hash"

    def __init__(self):
        self.log, self.seen, self.elves = {}, [], []

    def observe(self, entry, head):
        self.seen.append((entry.path, entry.type, None if head is None else len(head)))
        return Hasher(entry.path, self.log) if entry.type == FILE else None

    def observe_elf(self, entry, elf):
        self.elves.append((entry.path, elf.soname))


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


SPEC = [real("libc.so.6"), ("bytes", "etc/hello", b"hello\n"), ("symlink", "lib64", "usr/lib"),
        real(BIG), ("bytes", "empty", b""), real("libfabric.so.1")]


@pytest.mark.parametrize("consumer", ["full", "partial", "none"])
def test_scanners_see_every_byte_whatever_downstream_reads(consumer):
    p = HashPass()
    runner = PassRunner([p])
    got = {}
    for e in runner.transform(stream(SPEC)):
        if e.type == FILE and e.size:
            if consumer == "full":
                got[e.path] = hashlib.sha256(e.reader.read()).hexdigest()
            elif consumer == "partial":
                e.reader.read(10)
    for path in (f"{CLIBDIR}/libc.so.6", f"{CLIBDIR}/{BIG}", f"{CLIBDIR}/{FABRIC}"):
        digest, n, complete = p.log[path]
        assert digest == sha("/" + path) and complete and n == len(open("/" + path, "rb").read())
        if consumer == "full":
            assert got[path] == digest          # downstream got the exact bytes, head replayed
    assert p.log["etc/hello"] == (hashlib.sha256(b"hello\n").hexdigest(), 6, True)
    assert ("lib64", "symlink", None) in p.seen and ("empty", "file", 0) in p.seen
    assert sorted(p.elves) == sorted([(f"{CLIBDIR}/libc.so.6", "libc.so.6"), (f"{CLIBDIR}/{BIG}", "libmpich.so.12"),
                                      (f"{CLIBDIR}/{FABRIC}", "libfabric.so.1")])


def test_transform_is_transparent_for_a_tar_writer(tmp_path):
    """Writing the transformed stream gives the same tar as writing the original stream."""
    def write(entries):
        buf = io.BytesIO()
        with TarWriter(buf) as w:
            w.write_all(entries)
        return buf.getvalue()

    plain = write(stream(SPEC))
    runner = PassRunner([HashPass()])
    assert write(runner.transform(stream(SPEC))) == plain
    assert runner.files_seen == 4 and runner.elf_seen == 3     # the empty file has no content to scan


def test_reads_in_small_pieces_match():
    runner = PassRunner([HashPass()], head_size=4096)
    for e in runner.transform(stream([real("libfabric.so.1")])):
        if e.type == FILE:
            parts = []
            while True:
                b = e.reader.read(1000)
                if not b:
                    break
                parts.append(b)
            assert hashlib.sha256(b"".join(parts)).hexdigest() == sha(f"{LIBDIR}/{FABRIC}")


def test_short_source_reports_incomplete():
    p = HashPass()
    e = Entry("x", FILE, size=100, reader=io.BytesIO(b"only 20 bytes here.."))
    PassRunner([p]).run([e])
    assert p.log["x"][1:] == (20, False)


def test_consumer_stopping_early_does_not_read_on():
    p = HashPass()
    gen = PassRunner([p]).transform(stream(SPEC))
    next(gen)
    next(gen)
    gen.close()     # no exception, nothing read from closed files


def test_elf_scanner_memory_is_bounded():
    """A 40 MB library: the scanner keeps at most the capped prefix and a few capped segments."""
    path = f"{LIBDIR}/{BIG}"
    out = {}
    with open(path, "rb") as f:
        head = f.read(65536)
        s = ElfScanner(Entry(BIG, FILE), head, lambda e, i: out.setdefault("i", i), scan_instructions=True)
        s.feed(0, head)
        off = len(head)
        waiting = 0
        while chunk := f.read(1 << 20):
            s.feed(off, chunk)
            off += len(chunk)
            waiting = max(waiting, s._x86._bytes)       # pieces not yet handed to the scan's thread
        held = sum(len(b) for b in s._captured.values())
        s.close(True)
    from hpcconv.rewrite.x86scan import PIECES_CAP

    assert 0 < waiting < PIECES_CAP + (1 << 20)
    assert held <= PREFIX_CAP + 4 * SEGMENT_CAP
    info = out["i"]
    assert info.soname == "libmpich.so.12" and "libucp.so.0" in info.needed
    info.isa_scan.wait()                                # the scan runs on a worker thread
    assert info.isa_scan.bytes_scanned > 30_000_000     # the whole executable segment was scanned


def test_tar_round_trip_of_real_stream_keeps_elf_facts(tmp_path):
    """Entries read back from a tar (tarfile readers) work the same as file readers."""
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        w.write_all(stream([real("libmpi.so.40"), ("symlink", f"{CLIBDIR}/libmpi.so.40", OMPI)]))
    buf.seek(0)
    p = HashPass()
    PassRunner([p]).run(read_tar_entries(buf))
    assert p.elves == [(f"{CLIBDIR}/{OMPI}", "libmpi.so.40")]
    assert tarfile.is_tarfile(io.BytesIO(buf.getvalue()))


def test_source_errors_propagate_from_the_drain():
    class Broken(io.RawIOBase):
        """100 good bytes, then the source fails (after the head was read)."""
        sent = False

        def readable(self):
            return True

        def readinto(self, b):
            if not self.sent:
                self.sent = True
                b[:100] = b"x" * 100
                return 100
            raise OSError("layer blob truncated")

    e = Entry("x", FILE, size=1 << 20, reader=io.BufferedReader(Broken()))
    with pytest.raises(OSError, match="truncated"):
        PassRunner([HashPass()], head_size=16).run([e, Entry("y", FILE)])


def test_read_view_through_the_tee_same_bytes_and_findings():
    """Sources with read_view, read downstream through entries.reader_of (as the SquashFS writer
    does): scanners fed memoryviews find what they find in bytes (every pass's facts, ELF facts,
    the glibc banner), and the consumer gets the very bytes."""
    from hpcconv.rewrite import default_passes

    def run(views: bool):
        passes = [HashPass()] + default_passes()
        runner = PassRunner(passes)
        got, kinds, firsts = {}, set(), {}

        def entries():
            for e in stream(SPEC):
                if e.type == FILE and e.size and views:
                    e = e.with_(reader=ViewReader(e.reader.read()))
                yield e
        for e in runner.transform(entries()):
            if e.type == FILE and e.size:
                read = reader_of(e.reader) if views else e.reader.read
                parts = []
                while True:
                    b = read(1 << 20)
                    if not len(b):
                        break
                    kinds.add(type(b))
                    firsts.setdefault(e.path, b)
                    parts.append(bytes(b))
                got[e.path] = hashlib.sha256(b"".join(parts)).hexdigest()
        return got, passes[0].log, runner.facts(), kinds, firsts

    got, log, facts, kinds, firsts = run(True)
    ref_got, ref_log, ref_facts, ref_kinds, _ = run(False)
    assert memoryview in kinds and ref_kinds == {bytes}
    if native is not None:
        # a file longer than the head: the head (a view, for the passes) and the bytes after it
        # come downstream as one view of the source, not a copy (rewrite/base._TeeReader._take)
        longer = {p: b for p, b in firsts.items() if len(b) > HEAD_SIZE}
        assert len(longer) >= 3 and all(type(b) is memoryview and len(b) == 1 << 20 for b in longer.values())
    assert got == ref_got and log == ref_log and facts == ref_facts
    assert got[f"{CLIBDIR}/{BIG}"] == sha(f"/{CLIBDIR}/{BIG}")
    assert facts["glibc"] and facts["elf"]


def test_read_hands_on_bytes_when_the_head_is_a_view():
    """A source with read_view gives a longer file's head as a view (no copy); the tee's plain read
    still hands on bytes (its contract; consumers concatenate them), read_view may hand on views."""
    data = bytes(range(256)) * 2000                        # longer than the head
    e = Entry("f", FILE, 0o644, 0, 0, 0, len(data), reader=ViewReader(data))
    for view in (False, True):
        for out in PassRunner([HashPass()], head_size=4096).transform([e.with_(reader=ViewReader(data))]):
            read = reader_of(out.reader) if view else out.reader.read
            parts = [read(100), read(10_000), read()]
            assert b"".join(bytes(p) for p in parts) == data
            if not view:
                assert {type(p) for p in parts} == {bytes}
            elif native is not None:                       # the head's view and the next: one view
                assert {type(p) for p in parts} == {memoryview}
