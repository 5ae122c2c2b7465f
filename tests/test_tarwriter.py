"""The direct tar header writer (entries.tar_header / TarWriter) writes what tarfile writes."""

import io
import random
import tarfile

import pytest

from hpcconv.entries import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry, TarWriter, read_tar_entries,
                             tar_header, to_tarinfo)


def _tarfile_bytes(entries, prefix=""):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        for e in entries:
            ti = to_tarinfo(e, prefix)
            tf.addfile(ti, io.BytesIO(e.reader.getvalue()) if e.type == FILE else None)
    return buf.getvalue()


def _entries(n=400, seed=7):
    rnd = random.Random(seed)
    names = ["a", "bin/sh", "usr/lib/x86_64-linux-gnu/" + "l" * 90, "é/ü", "d" * 120 + "/f",
             "bad\udcff\udcfename", "x/" + "y" * 200]
    out = []
    for i in range(n):
        kind = rnd.choice([FILE, FILE, FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO])
        name = f"{rnd.choice(names)}{i}"
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 1, 511, 512, 513, 3000])))
        e = Entry(name, kind, rnd.choice([0o644, 0o4755, 0o1777, 0o7777, 0]),
                  uid=rnd.choice([0, 1000, 8 ** 7 - 1, 8 ** 7, 2 ** 32 - 1]),
                  gid=rnd.choice([0, 5, 8 ** 7 + 3]),
                  mtime=rnd.choice([0, 1700000000, 0.0, 1700000000.25, 8 ** 11, 12.5e10, -5]),
                  uname=rnd.choice(["", "root", "u" * 40, "jörg"]), gname=rnd.choice(["", "wheel"]))
        if kind == FILE:
            e.size, e.reader = len(data), io.BytesIO(data)
        elif kind in (SYMLINK, HARDLINK):
            e.linkname = rnd.choice(["a0", "t" * 150, "ü", "/abs/\udcffq"] + (["../x"] if kind == SYMLINK else []))
        elif kind in (CHAR, BLOCK):
            e.devmajor, e.devminor = rnd.choice([(1, 3), (0, 0), (259, 65535)])
        if rnd.random() < 0.2:
            e.xattrs = {"security.capability": b"\x01\x00\x00\x02", "user.k": "välue".encode()}
        if rnd.random() < 0.05:
            e.xattrs = {"user.raw": b"\xff\xfe"}
        out.append(e)
    return out


def test_headers_match_tarfile():
    for e in _entries():
        want = to_tarinfo(e, "p/").tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        assert tar_header(e, "p/") == want, e


def test_stream_matches_tarfile_and_reads_back():
    es = _entries(200, seed=3)
    want = _tarfile_bytes(es)
    for e in es:
        if e.reader is not None:
            e.reader.seek(0)
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        assert w.write_all(es) == len(es)
    assert buf.getvalue() == want
    back = list(read_tar_entries(io.BytesIO(buf.getvalue())))
    assert [b.path for b in back] == [e.path for e in es]


def test_short_content_is_an_error():
    e = Entry("f", FILE, 0o644, size=10, reader=io.BytesIO(b"abc"))
    with pytest.raises(OSError):
        TarWriter(io.BytesIO()).add(e)


def test_big_content_streams_in_chunks():
    data = bytes(range(256)) * 12289         # > 3 MiB, not a block multiple
    e = Entry("big", FILE, 0o644, size=len(data), reader=io.BytesIO(data))
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        w.add(e)
    e.reader.seek(0)
    assert buf.getvalue() == _tarfile_bytes([e])
