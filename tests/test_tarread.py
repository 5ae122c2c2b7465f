"""hpcconv.tarread against CPython's tarfile (the reference) on the formats layers use, plus GNU
tar's sparse encodings and broken input."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile

import pytest

from hpcconv.errors import CorruptInput
from hpcconv.tarread import TarReader


def members(fmt, pax_global=None):
    out = []

    def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        ti.mtime = kw.pop("mtime", 1_600_000_000)
        for k, v in kw.items():
            setattr(ti, k, v)
        out.append((ti, data))

    add("etc", tarfile.DIRTYPE, mode=0o755)
    add("etc/passwd", data=b"root:x:0:0\n", mode=0o644, uid=0, gid=0)
    add("p" * 90 + "/" + "q" * 90, data=b"prefix split", mode=0o4755)        # ustar prefix field
    add("suid", data=b"s" * 513, mode=0o6755, uid=1234, gid=5678)
    if fmt != tarfile.USTAR_FORMAT:
        add("big-owner", data=b"b", uid=3_000_000, gid=2_500_000)            # base-256 in GNU
    add("sym", tarfile.SYMTYPE, linkname="etc/passwd", mode=0o777)
    add("hard", tarfile.LNKTYPE, linkname="etc/passwd")
    add("null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    add("loop0", tarfile.BLKTYPE, devmajor=7, devminor=0)
    add("fifo", tarfile.FIFOTYPE)
    add("empty")
    add("exact-block", data=bytes(range(256)) * 2)
    if fmt != tarfile.USTAR_FORMAT:
        add("l" * 150 + "/" + "n" * 200, data=b"long name")
        add("longlink", tarfile.SYMTYPE, linkname="t" * 300)
        add("hardlong", tarfile.LNKTYPE, linkname="l" * 150 + "/" + "n" * 200)
        add("caf\udce9-\n space", data=b"odd bytes")
    if fmt == tarfile.PAX_FORMAT:
        add("xattr", data=b"x", pax_headers={"SCHILY.xattr.user.a": "1",
                                             "SCHILY.xattr.security.capability": "\x01\udcff\x00"})
        add("frac-mtime", data=b"f", mtime=1_600_000_000.25)
        add("bin\udcfe\udcff", data=b"binary name, hdrcharset=BINARY")
    return out


def build(fmt, pax_global=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape",
                      pax_headers=pax_global) as tf:
        for ti, data in members(fmt):
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def ref(data: bytes):
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            body = tf.extractfile(ti).read() if ti.isfile() else b""
            out.append((ti.name, ti.type if ti.type != tarfile.GNUTYPE_SPARSE else tarfile.REGTYPE,
                        ti.mode, ti.uid, ti.gid, ti.mtime, ti.size if ti.isfile() else 0,
                        ti.linkname, ti.devmajor if ti.ischr() or ti.isblk() else 0,
                        ti.devminor if ti.ischr() or ti.isblk() else 0,
                        {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")},
                        hashlib.sha256(body).hexdigest()))
    return out


def content(c, read, n: int, kinds: set | None = None) -> bytes:
    """A member's content, read n bytes at a time with `read` (c.read or c.read_view); the types
    the reads returned go into `kinds`."""
    parts = []
    while True:
        b = read(n)
        if not len(b):
            break
        if kinds is not None:
            kinds.add(type(b))
        parts.append(bytes(b))
    return b"".join(parts)


def ours(data: bytes, read_every=True):
    out = []
    tr = TarReader(io.BufferedReader(io.BytesIO(data)))
    for m in tr:
        body = b""
        if m.type in (b"0", b"\0", b"7"):
            c = tr.content(m)
            body = content(c, c.read, 1000)
            assert len(body) == m.size
        out.append((m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.devmajor,
                    m.devminor, {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")},
                    hashlib.sha256(body).hexdigest()))
    return out


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_same_as_tarfile(fmt):
    data = build(fmt)
    assert ours(data) == ref(data)
    assert len(ref(data)) == len(members(fmt))


def test_global_pax_header_applies_to_following_members():
    data = build(tarfile.PAX_FORMAT, pax_global={"uid": "4242", "comment": "x"})
    got = ours(data)
    assert got == ref(data)
    assert {g[3] for g in got if g[0] != "big-owner" and g[0] != "suid"} == {4242}


def test_skipping_content_keeps_position():
    data = build(tarfile.PAX_FORMAT)
    tr = TarReader(io.BufferedReader(io.BytesIO(data)))
    names = []
    for i, m in enumerate(tr):
        if i % 2 and m.type == b"0":
            tr.content(m).read(3)           # partial read
        names.append(m.name)
    assert names == [r[0] for r in ref(data)]


def test_content_is_invalid_after_moving_on():
    data = build(tarfile.USTAR_FORMAT)
    tr = TarReader(io.BufferedReader(io.BytesIO(data)))
    it = iter(tr)
    m = next(it)
    m = next(it)
    c = tr.content(m)
    next(it)
    with pytest.raises(ValueError):
        c.read()


@pytest.mark.parametrize("fmt", ["gnu", "posix", "posix-0.0", "posix-0.1"])
def test_gnu_tar_sparse(fmt, tmp_path):
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.write(b"head")
        fh.seek(300_000)
        fh.write(b"middle" * 1000)
        fh.seek(2_000_000)
        fh.write(b"x")
        fh.truncate(3_000_000)                  # trailing hole
    args = ["tar", "--sparse", "-cf", str(tmp_path / "s.tar"), "-C", str(tmp_path), "sparse"]
    if fmt == "gnu":
        args.insert(2, "--format=gnu")
    else:
        args[2:2] = ["--format=posix"] + (["--sparse-version=" + fmt.split("-")[1]] if "-" in fmt else [])
    subprocess.run(args, check=True)
    data = (tmp_path / "s.tar").read_bytes()
    got = ours(data)
    assert [(g[0], g[6], g[11]) for g in got] == [("sparse", 3_000_000, hashlib.sha256(f.read_bytes()).hexdigest())]
    tr = TarReader(io.BufferedReader(io.BytesIO(data)))
    assert [m.sparse is not None for m in tr] == [True]


def test_truncated_stream():
    data = build(tarfile.PAX_FORMAT)
    for cut in (100, 700, len(data) // 2):
        with pytest.raises(CorruptInput):
            ours(data[:cut])


def test_bad_checksum():
    data = bytearray(build(tarfile.USTAR_FORMAT))
    data[0] ^= 1
    with pytest.raises(CorruptInput, match="checksum"):
        ours(bytes(data))


def test_empty_streams():
    assert ours(b"") == []
    assert ours(bytes(1024)) == []
    assert ours(bytes(10240)) == []


def test_huge_extended_header_refused():
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type = tarfile.XHDTYPE
    ti.size = 1 << 32
    with pytest.raises(CorruptInput, match="extended header of"):
        ours(ti.tobuf(tarfile.GNU_FORMAT))


def test_header_only_types_carry_no_data_whatever_size_says():
    out = io.BytesIO()
    for name, kind, size in (("h", tarfile.LNKTYPE, 700), ("s", tarfile.SYMTYPE, 3), ("d", tarfile.DIRTYPE, 512),
                             ("f", tarfile.REGTYPE, 5)):
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.linkname = kind, size, "f" if kind in (tarfile.LNKTYPE, tarfile.SYMTYPE) else ""
        out.write(ti.tobuf(tarfile.USTAR_FORMAT))
    out.write(b"hello".ljust(512, b"\0") + bytes(1024))
    data = out.getvalue()
    assert [g[0] for g in ours(data)] == [r[0] for r in ref(data)] == ["h", "s", "d", "f"]
    assert ours(data)[-1][11] == hashlib.sha256(b"hello").hexdigest()


def _gnu_sparse_header(entries: list[tuple[int, int]], extended: bool, realsize: int, stored: int) -> bytes:
    ti = tarfile.TarInfo("s")
    ti.type = tarfile.GNUTYPE_SPARSE
    ti.size = stored
    b = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    for i, (o, n) in enumerate(entries[:4]):
        b[386 + 24 * i: 386 + 24 * i + 24] = b"%011o\0%011o\0" % (o, n)
    b[482] = 1 if extended else 0
    b[483:495] = b"%011o\0" % realsize
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def test_old_gnu_sparse_handmade_and_oversized_map():
    # handmade: 2 segments, realsize 20
    data = _gnu_sparse_header([(2, 3), (10, 2)], False, 20, 5) + b"abcde".ljust(512, b"\0") + bytes(1024)
    tr = TarReader(io.BufferedReader(io.BytesIO(data)))
    (m,) = [(m, tr.content(m).read()) for m in tr]
    assert m[1] == b"\0\0abc\0\0\0\0\0de" + bytes(8)
    # a map with over a million entries in extension blocks is refused, not collected
    ext = (b"%011o\0%011o\0" % (1, 1)) * 21 + b"\x01" + bytes(7)
    data = _gnu_sparse_header([(1, 1)] * 4, True, 10, 0) + ext * 60_000
    with pytest.raises(CorruptInput, match="sparse map too large"):
        ours(data)


def test_endless_extended_headers_refused():
    out = io.BytesIO()
    for i in range(40):
        ti = tarfile.TarInfo("././@PaxHeader")
        ti.type = tarfile.XHDTYPE
        rec = f"comment{i}=" + "x" * (1 << 19)
        rec = f"{len(rec) + 9} {rec}\n"
        rec = f"{len(rec)} " + rec[len(rec.split(' ')[0]) + 1:]
        payload = rec.encode()
        ti.size = len(payload)
        out.write(ti.tobuf(tarfile.GNU_FORMAT) + payload.ljust(-(-len(payload) // 512) * 512, b"\0"))
    with pytest.raises(CorruptInput, match="in all for one member"):
        ours(out.getvalue())


@pytest.mark.parametrize("native", [True, False], ids=["c-module", "python"])
def test_gnu_tar_posix_time_records(native, tmp_path, monkeypatch):
    """GNU tar's --format=posix gives every member PAX records of its times (atime, ctime, and
    mtime where it has a fraction): read as tarfile reads them, through the C module's header
    fields (the rest of the header is the block's) and without it."""
    import os

    from hpcconv import tarread

    if native and tarread._native_fields is None:
        pytest.skip("the C module is not built")
    if not native:
        monkeypatch.setattr(tarread, "_native_fields", None)
    src = tmp_path / "src"
    (src / "d" / ("p" * 90)).mkdir(parents=True)
    (src / "d" / ("p" * 90) / ("q" * 60)).write_bytes(b"ustar prefix")
    (src / "d" / ("l" * 120)).write_bytes(b"long name")
    (src / "f").write_bytes(b"x" * 1000)
    os.symlink("f", src / "s")
    os.link(src / "f", src / "h")
    os.utime(src / "f", ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321))
    os.utime(src / "d", ns=(1_600_000_001_000_000_000, 1_600_000_002_000_000_000))
    tar = tmp_path / "posix.tar"
    subprocess.run(["tar", "--format=posix", "--owner=4321", "--group=8765", "-cf", str(tar), "-C", str(src),
                    "."], check=True)
    data = tar.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        heads = [ti.pax_headers for ti in tf]
    assert all({"atime", "ctime"} <= h.keys() for h in heads)          # what this test is about
    assert any("mtime" in h for h in heads) and any("path" in h for h in heads)
    got = ours(data)
    assert got == ref(data)
    assert {g[3] for g in got} == {4321} and next(g[5] for g in got if g[0] == "./f") == 1_600_000_000.987654321


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_read_view_over_c_chunks_same_as_tarfile(fmt):
    """Content read with read_view over the C module's chunk reader (memoryviews into the decoded
    chunks where a read lies within one): the bytes tarfile gives, and after every member the same
    stream offset as plain reads (provenance is computed from it)."""
    native = pytest.importorskip("hpcconv._native")
    data = build(fmt)
    pieces = [data[i:i + 700] for i in range(0, len(data), 700)]       # reads cross chunk edges

    def run(view: bool):
        tr = TarReader(native.Chunks(iter(pieces)))
        out, offsets, kinds = [], [], set()
        for m in tr:
            body = b""
            if m.type in (b"0", b"\0", b"7"):
                c = tr.content(m)
                body = content(c, c.read_view if view else c.read, 300, kinds)
            out.append((m.name, hashlib.sha256(body).hexdigest()))
            offsets.append(tr.offset)
        return out, offsets, kinds

    got, offsets, kinds = run(True)
    assert got == [(r[0], r[11]) for r in ref(data)]
    assert offsets == run(False)[1]
    assert memoryview in kinds                   # the no-copy path was taken
    assert run(False)[2] == {bytes}
