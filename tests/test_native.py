"""The optional C module (hpcconv/_native.c) against the pure-Python code it stands in for.

* `fields`: a tar stream parsed with the C fast path and without it gives the same members, or the
  same error, for headers written by tarfile (ustar, GNU, PAX; long names, devices, big numbers)
  and for generated blocks with odd number fields and checksums (spaces, NULs, garbage, base-256,
  the signed-char sum, a wrong sum); the C path must take the plain headers (not defer them all).
* `ustar`: the same bytes as `entries._ustar_py` for any field contents, and tarfile reads back
  what was formatted (an independent reader).

CI builds the module (setup.py); under HPCCONV_REQUIRE_ALL=1 a missing build is a failure.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from hpcconv import entries, tarread
from hpcconv.errors import CorruptInput
from hpcconv.speedups import native

if native is None:
    if os.environ.get("HPCCONV_REQUIRE_ALL") == "1" and not os.environ.get("HPCCONV_NO_NATIVE"):
        pytest.fail("hpcconv._native is not built (pip install -e . with gcc and the Python headers)",
                    pytrace=False)
    pytest.skip("hpcconv._native is not built (or HPCCONV_NO_NATIVE is set)", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

N = int(os.environ.get("HPCCONV_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=N, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def _members(data: bytes, use_native: bool, monkeypatch):
    """[(name, type, mode, uid, gid, mtime, size, linkname, devmajor, devminor, pax)] or the error."""
    monkeypatch.setattr(tarread, "_native_fields", native.fields if use_native else None)
    out = []
    try:
        for m in tarread.TarReader(io.BytesIO(data)):
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.devmajor,
                        m.devminor, dict(m.pax_headers), m.sparse))
    except CorruptInput as e:
        out.append(("error", e.message))
    return out


def _tar(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.type, ti.size = kind, len(data)
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)
        add("etc/passwd", data=b"root:x:0:0\n", mode=0o644, uid=0, gid=0, mtime=1700000000)
        add("usr", tarfile.DIRTYPE, mode=0o755)
        add("usr/" + "d" * 90 + "/" + "f" * 60, data=b"x")               # ustar prefix split / long name
        if fmt != tarfile.USTAR_FORMAT:
            add("a" * 130, data=b"long")                                    # GNU longname or PAX path
            add("lnk", tarfile.SYMTYPE, linkname="t" * 120)
        add("hard", tarfile.LNKTYPE, linkname="etc/passwd")
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("fifo", tarfile.FIFOTYPE)
        add("setuid", data=b"s", mode=0o4755, uid=1000, gid=1000)
        add("bigid", data=b"b", uid=0o7777777, gid=3, mtime=0o77777777777)
        add("caf\u00e9/na\u00efve", data=b"u")
        if fmt != tarfile.USTAR_FORMAT:
            add("huge-uid", data=b"h", uid=1 << 40, mtime=1.5)              # base-256 (GNU) or PAX
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_tarfile_streams_parse_the_same_with_and_without_c(fmt, monkeypatch):
    data = _tar(fmt)
    fast = _members(data, True, monkeypatch)
    slow = _members(data, False, monkeypatch)
    assert fast == slow
    assert all(m[0] != "error" for m in fast)
    # and the fast path really takes the plain headers
    blocks = [data[i:i + 512] for i in range(0, 512 * 4, 512)]
    assert native.fields(blocks[0]) is not None
    assert native.fields(blocks[0])[2] == b"etc/passwd"


# a plain octal field, or one of the forms the C path must defer (or get exactly right)
def _field(width: int):
    digits = st.integers(0, 8 ** (width - 1) - 1).map(lambda v: b"%o" % v)
    plain = st.builds(lambda sp, d, tail: (b" " * sp + d + tail)[:width].ljust(width, b"\0"),
                      st.integers(0, 3), digits, st.sampled_from([b"\0", b" ", b" \0", b"\0 ", b"", b"\0\0"]))
    odd = st.sampled_from([b"", b" ", b"\0 7", b"7\x01", b"1\0\x01", b"1_0", b"0o17", b"+7", b"-1", b"8", b"7 7", b"\t7", b"7\n",
                           b"\x80" + bytes(width - 2) + b"\x01", b"\xff" * width, b"\x80\xff",
                           b"\x00" * width, b"abc"]).map(lambda b: b[:width].ljust(width, b"\0"))
    return st.one_of(plain, plain, plain, odd)


def _block(name, mode, uid, gid, size, mtime, typeflag, link, magic, prefix, major, minor, chk_kind, high):
    b = bytearray(512)
    b[0:100] = name[:100].ljust(100, b"\0")
    b[100:108], b[108:116], b[116:124], b[124:136], b[136:148] = mode, uid, gid, size, mtime
    b[156:157] = typeflag
    b[157:257] = link[:100].ljust(100, b"\0")
    b[257:265] = magic
    b[329:337], b[337:345] = major, minor
    b[345:500] = prefix[:155].ljust(155, b"\0")
    if high:
        b[500] = 0xE9                    # a byte >= 0x80: signed and unsigned sums differ
    b[148:156] = b" " * 8
    unsigned = sum(b)
    signed = unsigned - 256 * sum(1 for x in b if x >= 128)
    chk = {"ok": unsigned, "signed": signed, "bad": unsigned + 1}[chk_kind]
    b[148:156] = (b"%06o\0 " % chk) if chk >= 0 else b"-00001\0 "
    return bytes(b)


names = st.binary(max_size=110) | st.sampled_from([b"a/b", b"dir/", b"x" * 100, b"\xff\xfe", b""])
blocks = st.builds(
    _block, names, _field(8), _field(8), _field(8), _field(12), _field(12),
    st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"x", b"L", b"g", b"Z"]),
    names, st.sampled_from([b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"ustar\0xx"]), names,
    _field(8), _field(8), st.sampled_from(["ok", "ok", "ok", "signed", "bad"]), st.booleans())


@FUZZ
@given(blocks, st.binary(max_size=600))
def test_generated_headers_parse_the_same_with_and_without_c(monkeypatch, block, rest):
    data = block + rest + bytes(-len(rest) % 512) + bytes(1024)
    assert _members(data, True, monkeypatch) == _members(data, False, monkeypatch)


@FUZZ
@given(blocks)
def test_c_fields_are_the_python_values_or_none(block):
    f = native.fields(block)
    if f is None:
        return
    t, size, name, mode, uid, gid, mtime, link, major, minor = f
    num = tarread._num
    assert t == block[156:157]
    assert (size, mode, uid, gid, mtime) == (num(block[124:136]), num(block[100:108]) & 0o7777,
                                              num(block[108:116]), num(block[116:124]), num(block[136:148]))
    dev = t in (b"3", b"4")
    assert (major, minor) == ((num(block[329:337]), num(block[337:345])) if dev else (0, 0))
    stored = num(block[148:156])
    assert stored == tarread.byte_sum(block) - sum(block[148:156]) + 256
    cstr = tarread._cstr
    prefix = cstr(block[345:500]) if block[257:263] == b"ustar\0" else b""
    assert name == (prefix + b"/" if prefix else b"") + cstr(block[:100])
    assert link == cstr(block[157:257])


def test_c_fields_defers_what_it_does_not_parse():
    good = _block(b"f", b"0000644\0", b"0000000\0", b"0000000\0", b"00000000001\0", b"00000000000\0", b"0",
                  b"", b"ustar\x0000", b"", bytes(8), bytes(8), "ok", False)
    assert native.fields(good) == (b"0", 1, b"f", 0o644, 0, 0, 0, b"", 0, 0)
    signed = _block(b"f", b"0000644\0", b"0000000\0", b"0000000\0", b"00000000001\0", b"00000000000\0", b"0",
                    b"", b"ustar\x0000", b"", bytes(8), bytes(8), "signed", True)
    assert native.fields(signed) is None                       # Python accepts it (old tars)
    base256 = _block(b"f", b"0000644\0", b"\x80" + bytes(6) + b"\x01", b"0000000\0", b"00000000001\0",
                     b"00000000000\0", b"0", b"", b"ustar\x0000", b"", bytes(8), bytes(8), "ok", False)
    assert native.fields(base256) is None
    with pytest.raises(ValueError):
        native.fields(good[:511])


texts = st.binary(max_size=140)


@FUZZ
@given(texts, st.integers(0, 0o7777), st.integers(0, 8 ** 7 - 1), st.integers(0, 8 ** 7 - 1),
       st.integers(0, 8 ** 11 - 1), st.integers(0, 8 ** 11 - 1),
       st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"x"]), texts, texts, texts,
       st.sampled_from([bytes(16), b"0000001\x000000003\x00"]))
def test_c_ustar_is_the_python_block(name, mode, uid, gid, size, mtime, t, link, uname, gname, dev):
    args = (name, mode, uid, gid, size, mtime, t, link, uname, gname, dev)
    block = native.ustar(*args)
    assert block == entries._ustar_py(*args)
    ti = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")        # an independent reader
    assert (ti.mode, ti.uid, ti.gid, ti.size if t != b"x" else size, ti.mtime) == (mode, uid, gid, size, mtime)


def test_c_ustar_refuses_numbers_that_do_not_fit():
    ok = (b"n", 0o644, 0, 0, 0, 0, b"0", b"", b"root", b"root", bytes(16))
    native.ustar(*ok)
    for i, bad in ((2, 8 ** 7), (4, 8 ** 11), (5, -1)):
        args = list(ok)
        args[i] = bad
        with pytest.raises(ValueError, match="overflow"):
            native.ustar(*args)
    with pytest.raises(ValueError):
        native.ustar(*ok[:6], b"00", *ok[7:])


# x86 scan patterns: bytes rich in the encodings' lead bytes, so matches overlap and crowd
x86_bytes = st.lists(st.sampled_from([0x62, 0xC4, 0xC5, 0x01, 0x02, 0x05, 0x7C, 0xE1, 0xFD, 0x48, 0x10, 0xD0, 0x00,
                                      0xFF, 0x77, 0x94]), max_size=300).map(bytes) | st.binary(max_size=300)


@FUZZ
@given(x86_bytes, st.integers(0, 310), st.integers(0, 310), st.integers(0, 310))
def test_c_match_starts_are_the_regex_matches(buf, lo_evex, lo_vex, limit):
    from hpcconv.rewrite import x86scan

    evex, vex = native.match_starts(buf, limit, ((lo_evex, x86scan._EVEX_TABLES), (lo_vex, x86scan._VEX_TABLES)))
    assert evex == [m.start() for m in x86scan.EVEX_RE.finditer(buf, lo_evex) if m.start() < limit]
    assert vex == [m.start() for m in x86scan.VEX_RE.finditer(buf, lo_vex) if m.start() < limit]
    (only_vex,) = native.match_starts(buf, limit, ((lo_vex, x86scan._VEX_TABLES),))
    assert only_vex == vex


def test_c_match_starts_refuses_bad_tables():
    for kinds in (((0, (b"x" * 255,)),), ((0, ()),), ((0, (b"",)),), ((0, ("s" * 256,)),), ((0,),)):
        with pytest.raises((ValueError, TypeError)):
            native.match_starts(b"abc", 3, kinds)
    assert native.match_starts(b"", 10, ()) == ()


byte_sets = st.sets(st.sampled_from([d * 17 for d in range(16)]), min_size=1, max_size=8)   # the buffer's alphabet


@FUZZ
@given(st.lists(st.lists(byte_sets, min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 15), max_size=200), st.integers(0, 210), st.integers(0, 210))
def test_c_match_starts_any_patterns_are_the_regex_matches(alts, data, lo, limit):
    """Any fixed-length byte-class alternation (more than 4 possible first bytes included: the scan
    then goes byte by byte) against the same alternation as a regex."""
    import re

    from hpcconv.rewrite import x86scan

    # a small alphabet that the sets hit often
    buf = bytes(d * 17 for d in data)
    regex = re.compile(b"|".join(b"".join(x86scan._cls(s.__contains__) for s in alt) for alt in alts), re.S)
    tables = tuple(x86scan._table(*(s.__contains__ for s in alt)) for alt in alts)
    (got,) = native.match_starts(buf, limit, ((lo, tables),))
    assert got == [m.start() for m in regex.finditer(buf, lo) if m.start() < limit]


def test_c_match_starts_with_many_first_bytes_misses_none():
    """More first bytes than the 8-at-a-time skip takes: the scan goes byte by byte, and a match
    that starts with the last of them, alone in its 8 bytes, is found."""
    from hpcconv.rewrite import x86scan

    firsts = {0x11 * k for k in range(1, 7)}
    tables = (x86scan._table(firsts.__contains__),)
    for at in range(0, 24):
        buf = bytearray(32)
        buf[at] = 0x66
        assert native.match_starts(bytes(buf), 32, ((0, tables),)) == ([at],)
    few = (x86scan._table({0x11, 0x66}.__contains__),)
    assert native.match_starts(bytes(16) + b"\x66" + bytes(15), 32, ((0, few),)) == ([16],)


# -- Chunks: the flatten's reader over the decoded chunks ---------------------------------------------
@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=8),
       st.lists(st.tuples(st.sampled_from(["read", "skip", "view"]), st.integers(0, 70)), max_size=12))
def test_c_chunks_reads_what_a_buffered_reader_reads(chunks, ops):
    """Any chunking (empty chunks too), any mix of read(n)/skip(n)/view(n): the same bytes, in the
    same pieces, as io.BufferedReader over compression.ChunkReader (the reader it replaces); skip(n)
    drops what read(n) would have returned; view(n) gives them too, as a read-only memoryview where
    they lie within one chunk (the chunk's own memory), else as bytes."""
    from hpcconv.compression import ChunkReader

    ours = native.Chunks(iter(chunks))
    ref = io.BufferedReader(ChunkReader(iter(chunks)), 16)
    for op, n in ops:
        want = ref.read(n)
        if op == "skip":
            assert ours.skip(n) == len(want)
        elif op == "view":
            got = ours.view(n)
            assert bytes(got) == want
            if isinstance(got, memoryview):
                assert got.readonly and any(got.obj is c for c in chunks)
            else:
                assert type(got) is bytes
        else:
            assert ours.read(n) == want
    assert ours.read(1 << 20) == ref.read(1 << 20)
    assert ours.read(5) == b"" and ours.skip(5) == 0


def test_c_chunks_hands_a_whole_chunk_on_without_copying():
    big = os.urandom(1 << 16)
    c = native.Chunks([big, b"tail"])
    assert c.read(len(big)) is big               # no copy of an 8 MiB decoded chunk
    assert c.read(2) == b"ta" and c.read(10) == b"il"
    # view: a piece of a chunk without a copy; across chunks, bytes
    c = native.Chunks([big, b"tail"])
    v = c.view(1000)
    assert type(v) is memoryview and v.obj is big and v == memoryview(big)[:1000]
    w = c.view(len(big) - 1000)
    assert type(w) is memoryview and w.obj is big and bytes(w) == big[1000:]
    c = native.Chunks([big, b"tail"])
    assert c.view(len(big)) is big               # the whole chunk: itself
    c = native.Chunks([big, b"tail"])
    c.skip(10)
    x = c.view(len(big))                         # crosses into the next chunk: joined bytes
    assert type(x) is bytes and x == big[10:] + b"tail"[:10]


def test_c_adjoin_makes_one_view_of_adjacent_pieces_of_one_bytes_object_only():
    big = os.urandom(1 << 16)
    m = memoryview(big)
    one = native.adjoin(m[100:200], m[200:5000])
    assert type(one) is memoryview and one.obj is big and bytes(one) == big[100:5000] and one.readonly
    assert bytes(native.adjoin(m[0:0], m[0:10])) == big[:10]
    assert native.adjoin(m[100:200], m[201:300]) is None                     # a gap
    assert native.adjoin(m[200:300], m[100:200]) is None                     # the wrong order
    assert native.adjoin(m[:10], memoryview(bytes(bytearray(big)))[10:20]) is None   # another object
    assert native.adjoin(m[0:10:2], m[10:20]) is None                        # strided
    ba = bytearray(big)
    assert native.adjoin(memoryview(ba)[:10], memoryview(ba)[10:20]) is None  # not immutable bytes
    assert native.adjoin(big[:10], m[10:20]) is None                         # bytes, not a view
    assert native.adjoin(m[:10], m[10:20].cast("B", (2, 5))) is None         # not 1-D


def test_c_chunks_passes_iterator_errors_and_refuses_non_bytes():
    def broken():
        yield b"abc"
        raise CorruptInput("layer 1/1: truncated")

    c = native.Chunks(broken())
    assert c.read(2) == b"ab"
    with pytest.raises(CorruptInput, match="truncated"):
        c.read(5)
    c = native.Chunks(broken())
    with pytest.raises(CorruptInput, match="truncated"):
        c.skip(10)
    with pytest.raises(TypeError, match="bytearray, not bytes"):
        native.Chunks([bytearray(b"x")]).read(1)
    with pytest.raises(ValueError):
        native.Chunks([b"x"]).read(-1)


def test_flatten_reads_layers_the_same_through_c_chunks(monkeypatch):
    """Layers flattened through the C reader and through the BufferedReader (two passes and the
    single pass): the same tree and content hashes, and a truncated layer gives the same one-line
    error naming the layer."""
    from flattools import flatten_tree, image_from_built
    from ocitools import build_image

    from hpcconv import flatten

    def layer(seed: int, n: int) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(n):
                data = bytes([seed + i & 0xFF]) * (i * 997) + os.urandom(i % 5)
                ti = tarfile.TarInfo(f"d{i % 3}/f{i}" + "x" * (i * 7))     # long names: PAX headers
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    layers = [layer(1, 40), layer(2, 25)]

    def run(chunks_type, tars):
        monkeypatch.setattr(flatten, "_Chunks", chunks_type)
        try:
            tree, f = flatten_tree(image_from_built(build_image(tars)))
        except CorruptInput as e:
            return e.message
        return tree, f.stats["members"]

    ours = run(native.Chunks, layers)
    assert ours == run(None, layers) and ours[1] == 65
    cut = [layers[0], layers[1][:len(layers[1]) // 2]]
    a = run(native.Chunks, cut)
    assert isinstance(a, str) and "layer 2/2" in a and a == run(None, cut)

    # the single pass's readers with read_view (what the SquashFS writer reads through): the same
    # content as read() gives, and the same one-line error naming the layer and entry when cut short
    from hpcconv.entries import FILE, reader_of

    def contents(tars, view: bool):
        monkeypatch.setattr(flatten, "_Chunks", native.Chunks)
        out, kinds = {}, set()
        try:
            for e in flatten.Flattener(image_from_built(build_image(tars)), single_pass=True).entries():
                if e.type == FILE:
                    read = reader_of(e.reader) if view else e.reader.read
                    parts = []
                    while len(b := read(3000)):
                        kinds.add(type(b))
                        parts.append(bytes(b))
                    out[e.path] = hashlib.sha256(b"".join(parts)).hexdigest()
        except CorruptInput as e:
            return e.message, kinds
        return out, kinds

    (viewed, kinds), (plain, _) = contents(layers, True), contents(layers, False)
    assert viewed == plain and len(viewed) == 40 and memoryview in kinds     # 25 of 65 replaced above
    err = contents(cut, True)[0]
    assert isinstance(err, str) and err == contents(cut, False)[0]
    assert err.startswith("layer 2/2") and " entry 'd" in err and "ends inside" in err


# -- sqfs_tables: the SquashFS writer's inode and directory tables ------------------------------------
@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_c_sqfs_tables_write_the_same_image_as_python(tmp_path, monkeypatch, compression):
    """Every entry type, xattrs on files, links and directories, hardlinks, devices, a directory of
    3000 entries (a listing over 64 KiB: the extended directory inode; runs of 256 entries),
    duplicate files: byte for byte the image the Python tables give (test_sqfs_writer reads both
    kinds back with sqfs2tar, unsquashfs and the kernel)."""
    from test_sqfs_writer import BS, rich_stream, write_native

    from hpcconv.emit import sqfs

    assert sqfs._native_tables is native.sqfs_tables
    items = rich_stream()
    write_native(items, tmp_path / "c.sqfs", block_size=BS, compression=compression)
    monkeypatch.setattr(sqfs, "_native_tables", None)
    write_native(items, tmp_path / "py.sqfs", block_size=BS, compression=compression)
    assert (tmp_path / "c.sqfs").read_bytes() == (tmp_path / "py.sqfs").read_bytes()


def test_c_sqfs_tables_defers_what_it_does_not_store(tmp_path, monkeypatch):
    """More than 65536 owner ids: None from C, and the Python code names the error; a node with a
    value out of its field's range: None as well."""
    from hpcconv.emit import sqfs
    from hpcconv.entries import FILE, Entry

    items = [(Entry(f"f{i}", FILE, 0o644, uid=i, gid=0), b"") for i in range(65537)]
    from test_sqfs_writer import write_native

    with pytest.raises(CorruptInput, match="more than 65536 distinct owner ids"):
        write_native(items, tmp_path / "ids.sqfs")

    class Node:
        type, mode, uid, gid, mtime, number, nlink, xattrs = sqfs.T_FILE, 0o644, 0, 0, 1 << 40, 1, 1, None

    assert native.sqfs_tables([Node()], [0], lambda b: b) is None       # mtime beyond 32 bits
