"""hpcconv's own SquashFS writer (emit/sqfs.py) against independent readers.

Oracles, none of them our code: `sqfs2tar` (squashfs-tools-ng's reader) read back with Python's
tarfile and compared with the stream; `sqfsdiff` against the image `tar2sqfs` builds from the same
stream as a tar (contents, owners, modes, times); `unsquashfs` (squashfs-tools, a second reader)
for the superblock and an extraction compared with os.lstat; the kernel's squashfs driver (loop
mount) and squashfuse where the machine allows.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import need

from hpcconv.emit import sinks, sqfs
from hpcconv.entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry, TarWriter
from hpcconv.errors import CorruptInput

BS = 4096          # small blocks: many blocks, fragments and metadata blocks from little data


def _f(path, data, **kw):
    return Entry(path, FILE, kw.pop("mode", 0o644), size=len(data), reader=io.BytesIO(data), **kw)


def rich_stream(seed: int = 1) -> list[tuple[Entry, bytes]]:
    """Every entry type, owners, xattrs, odd sizes around the block size, holes, duplicates,
    incompressible data, a directory of 3000 entries (a listing over 64 KiB), a deep path."""
    rnd = random.Random(seed)
    rand = lambda n: bytes(rnd.getrandbits(8) for _ in range(n))   # noqa: E731
    text = b"".join(b"line %d of some text\n" % i for i in range(4000))
    out: list[tuple[Entry, bytes]] = []

    def add(e: Entry, data: bytes = b""):
        out.append((e, data))

    add(Entry("etc", DIR, 0o755, mtime=1_700_000_000))
    add(_f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime=1_600_000_000.75), b"root:x:0:0::/root:/bin/sh\n")
    sizes = [0, 1, BS - 1, BS, BS + 1, 3 * BS, 3 * BS + 17, 70_000]
    add(Entry("data", DIR, 0o750, uid=1000, gid=1000))
    for i, n in enumerate(sizes):
        data = (text * 10)[:n]
        add(_f(f"data/text{i}", data, uid=1000 + i, gid=2000), data)
        noise = rand(n)
        add(_f(f"data/noise{i}", noise, mode=0o600), noise)
    holes = bytes(2 * BS) + b"tail" + bytes(BS) + b"x" * 5 + bytes(3 * BS)
    add(_f("data/holes", holes), holes)
    add(_f("data/zeros", bytes(5 * BS)), bytes(5 * BS))
    big = rand(2 * BS) + text[:3 * BS]
    add(_f("data/big", big), big)
    add(_f("data/big-copy", big, mtime=5), big)                     # whole-file duplicate
    add(_f("data/big-other-tail", big[:4 * BS] + b"different tail"), big[:4 * BS] + b"different tail")
    add(_f("data/small-copy", (text * 10)[:BS - 1]), (text * 10)[:BS - 1])   # fragment duplicate
    add(Entry("data/hard", HARDLINK, linkname="data/big"))
    add(Entry("data/hard2", HARDLINK, linkname="data/big"))
    add(Entry("bin", DIR, 0o755))
    add(_f("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755, xattrs={"security.capability": b"\x01\x00\x00\x02" + bytes(16)}),
        b"#!/bin/sh\necho hi\n")
    add(Entry("bin/sh", SYMLINK, 0o777, linkname="/bin/busybox"))
    add(Entry("bin/rel", SYMLINK, 0o777, linkname="../etc/passwd", xattrs={"user.note": b"on a link"}))
    add(Entry("bin/long", SYMLINK, 0o777, linkname="/" + "t" * 300))
    add(Entry("dev", DIR, 0o755, xattrs={"user.dir": b"yes", "trusted.x": b"\0\1\2"}))
    add(Entry("dev/null", CHAR, 0o666, devmajor=1, devminor=3))
    add(Entry("dev/nvme", BLOCK, 0o660, gid=6, devmajor=259, devminor=300_000))
    add(Entry("dev/fifo", FIFO, 0o644, uid=7))
    add(Entry("tmp", DIR, 0o1777))
    add(Entry("many", DIR, 0o755))
    for i in range(3000):
        name = f"many/{i:05d}-" + "n" * 20
        data = b"%d\n" % (i % 50)               # many identical small files
        add(_f(name, data, uid=i % 300), data)
    deep = "/".join(f"d{i}" for i in range(120))
    add(_f(deep + "/leaf", b"deep"), b"deep")   # parents the stream never names
    add(Entry("odd", DIR, 0o755))
    for name in [os.fsdecode(b"caf\xe9"), "sp ace\nnl", "x" * 255]:
        add(_f("odd/" + name, name.encode("utf-8", "surrogateescape")), name.encode("utf-8", "surrogateescape"))
    add(Entry("etc", DIR, 0o700, mtime=42))     # a directory met again: only its attributes change
    return out


def entries_of(items):
    for e, data in items:
        yield e.with_(reader=io.BytesIO(data)) if e.type == FILE else e


def tar_bytes(items) -> bytes:
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        w.write_all(entries_of(items))
    return buf.getvalue()


def tree_of_tar(data: bytes) -> dict:
    """path -> (kind, mode, uid, gid, mtime, link or device, content sha, xattrs) via tarfile."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            name = ti.name.lstrip("./").rstrip("/")
            if not name:
                continue
            if ti.isfile():
                extra = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()
            elif ti.isdev():
                extra = (ti.devmajor, ti.devminor)
            else:
                extra = ti.linkname
            xattrs = {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            kind = "hard" if ti.islnk() else ti.type
            out[name] = (kind, 0o777 if ti.issym() else ti.mode & 0o7777, ti.uid, ti.gid, int(ti.mtime), extra,
                         xattrs)
    return out


def expected_tree(items) -> dict:
    """What a reader must show: implicit parents 0755 root, time 0; hardlinks as sqfs2tar lists them
    (the second and later names of an inode as hardlinks to the first in its traversal order)."""
    t = tree_of_tar(tar_bytes(items))
    for e, _ in items:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            t.setdefault("/".join(parts[:i]), (tarfile.DIRTYPE, 0o755, 0, 0, 0, "", {}))
    return t


def write_native(items, out: Path, **kw) -> int:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return sqfs.write(entries_of(items), fd, kw.pop("base", 0), **kw).size
    finally:
        os.close(fd)


def sqfs2tar(img: Path) -> bytes:
    return subprocess.run([need("sqfs2tar"), str(img)], capture_output=True, check=True).stdout


def normalize_links(t: dict) -> dict:
    """Hardlinks compared as groups of names sharing content: which name a reader calls the first
    one is its own choice."""
    out = {}
    for k, v in t.items():
        if v[0] == "hard":
            v = t[v[5]][:5] + ("link-to:" + t[v[5]][5],) + (t[v[5]][6],)
        elif v[0] == tarfile.REGTYPE:
            v = v[:5] + ("link-to:" + v[5],) + (v[6],)
        out[k] = v
    return out


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_rich_stream_reads_back_as_written(tmp_path, compression):
    items = rich_stream()
    img = tmp_path / "a.sqfs"
    size = write_native(items, img, compression=compression, level=3, block_size=BS)
    assert size == img.stat().st_size and size % 4096 == 0
    got = tree_of_tar(sqfs2tar(img))
    assert normalize_links(got) == normalize_links(expected_tree(items))
    info = subprocess.run([need("unsquashfs"), "-s", str(img)], capture_output=True, text=True, check=True).stdout
    assert f"Compression {compression}" in info and f"Block size {BS}" in info
    assert "compression-level 3" in info and "Duplicates are removed" in info
    assert f"Number of inodes {len(got) + 1 - 2}" in info    # + root, - two hardlink names


def test_same_filesystem_as_tar2sqfs(tmp_path):
    """sqfsdiff finds no difference in contents, owners, modes or times between our image and
    tar2sqfs's of the same stream (the root aside: tar2sqfs gets it from --defaults)."""
    items = rich_stream(2)[:-1]                  # tar2sqfs refuses a directory named twice
    ours, theirs = tmp_path / "ours.sqfs", tmp_path / "theirs.sqfs"
    write_native(items, ours, compression="zstd", level=3, block_size=BS)
    cmd = sinks.squashfs_command(theirs, "zstd", 3, BS)
    assert os.path.basename(cmd[0]) == "tar2sqfs"
    subprocess.run(cmd, input=tar_bytes(items), check=True, capture_output=True)
    r = subprocess.run([need("sqfsdiff"), "-T", "-a", str(theirs), "-b", str(ours)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_unsquashfs_extracts_the_same_tree(tmp_path):
    """squashfs-tools' reader: every object with its type, mode, owner, time, size, target, device."""
    if os.geteuid() != 0:
        pytest.skip("device nodes and owners need root")
    items = rich_stream(3)
    img = tmp_path / "u.sqfs"
    write_native(items, img, compression="gzip", level=1, block_size=BS)
    root = tmp_path / "x"
    subprocess.run([need("unsquashfs"), "-q", "-n", "-no-xattrs", "-d", str(root), str(img)], check=True, capture_output=True)
    want = expected_tree(items)
    seen_inodes: dict[int, str] = {}
    for path, v in want.items():
        st = os.lstat(root / path)
        kind = v[0]
        if kind == "hard":
            assert os.path.samefile(root / path, root / v[5])
            continue
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == v[1:4] or stat.S_ISLNK(st.st_mode), path
        if not stat.S_ISLNK(st.st_mode):
            assert int(st.st_mtime) == v[4], path
        if kind == tarfile.REGTYPE:
            assert hashlib.sha256((root / path).read_bytes()).hexdigest() == v[5]
            seen_inodes.setdefault(st.st_ino, path)
        elif kind == tarfile.SYMTYPE:
            assert os.readlink(root / path) == v[5]
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == v[5]
            assert stat.S_ISCHR(st.st_mode) == (kind == tarfile.CHRTYPE)
        elif kind == tarfile.FIFOTYPE:
            assert stat.S_ISFIFO(st.st_mode)
    assert os.stat(root / "data/big").st_nlink == 3


def _mount(args: list[str], mnt: Path) -> bool:
    r = subprocess.run(args, capture_output=True)
    return r.returncode == 0 and os.path.ismount(mnt)


@pytest.mark.parametrize("reader", ["kernel", "squashfuse"])
def test_mounted_by_the_kernel_and_squashfuse(tmp_path, reader):
    items = rich_stream(4)
    img = tmp_path / "m.sqfs"
    write_native(items, img, compression="zstd", level=3, block_size=1 << 20)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = (["mount", "-t", "squashfs", "-o", "loop,ro", str(img), str(mnt)] if reader == "kernel"
            else [need("squashfuse"), str(img), str(mnt)])
    if not _mount(args, mnt):
        pytest.skip(f"cannot mount with the {reader} here")
    try:
        want = expected_tree(items)
        for path, v in want.items():
            p = mnt / path
            st = os.lstat(p)
            if v[0] == tarfile.REGTYPE:
                assert hashlib.sha256(p.read_bytes()).hexdigest() == v[5], path
                assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)) == v[1:5], path
            elif v[0] == tarfile.DIRTYPE:
                assert sorted(os.listdir(p)) == sorted(k.rpartition("/")[2] for k in want
                                                       if k.rpartition("/")[0] == path), path
        assert os.stat(mnt / "data/hard").st_nlink == 3
        if reader == "kernel":       # (squashfuse's high-level FUSE numbers inodes itself)
            assert os.stat(mnt / "data/hard").st_ino == os.stat(mnt / "data/big").st_ino
            assert os.getxattr(mnt / "bin/tool", "security.capability") == b"\x01\x00\x00\x02" + bytes(16)
            assert os.getxattr(mnt / "dev", "user.dir") == b"yes"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_at_an_offset(tmp_path):
    """Written at `base` (the SIF partition): the bytes before it are untouched, and the image read
    from there is the same as a plain one."""
    items = rich_stream(5)
    plain, inner = tmp_path / "p.sqfs", tmp_path / "o.bin"
    write_native(items, plain, compression="zstd", level=3, block_size=BS)
    inner.write_bytes(b"P" * 12288)
    fd = os.open(inner, os.O_WRONLY)
    try:
        size = sqfs.write(entries_of(items), fd, 12288, compression="zstd", level=3, block_size=BS).size
    finally:
        os.close(fd)
    data = inner.read_bytes()
    assert data[:12288] == b"P" * 12288 and len(data) == 12288 + size
    assert data[12288:] == plain.read_bytes()


def test_dedup_saves_the_copy(tmp_path):
    """A duplicate file costs no data: the image with 20 copies of a 300 KiB file is about the size
    of the one with one copy (the oracle is the file size, and sqfs2tar reads all 20 back)."""
    blob = random.Random(9).randbytes(300 << 10)
    one = [(_f("a/0", blob), blob)]
    many = [(_f(f"a/{i}", blob), blob) for i in range(20)]
    p1, p20 = tmp_path / "1.sqfs", tmp_path / "20.sqfs"
    write_native(one, p1, compression="zstd", level=3, block_size=1 << 16)
    write_native(many, p20, compression="zstd", level=3, block_size=1 << 16)
    assert p20.stat().st_size < p1.stat().st_size + 8192
    back = tree_of_tar(sqfs2tar(p20))
    assert {v[5] for k, v in back.items() if k != "a"} == {hashlib.sha256(blob).hexdigest()}


@pytest.mark.parametrize("bad,msg", [
    ([Entry("a", FILE, size=1, reader=io.BytesIO(b"x")), Entry("a", FILE, size=1, reader=io.BytesIO(b"y"))],
     "appears twice"),
    ([Entry("a", FILE, size=0, reader=io.BytesIO(b"")), Entry("a/b", FILE, size=0, reader=io.BytesIO(b""))],
     "not a directory"),
    ([Entry("h", HARDLINK, linkname="nowhere")], "not an earlier entry"),
    ([Entry("d", DIR), Entry("h", HARDLINK, linkname="d")], "names a directory"),
    ([Entry("n" * 256, FILE, size=0, reader=io.BytesIO(b""))], "longer than 255"),
    ([Entry("f", FILE, size=10, reader=io.BytesIO(b"short"))], "ended 5 bytes early"),
    ([Entry("f", FILE, uid=1 << 32, size=0, reader=io.BytesIO(b""))], "owner id"),
])
def test_bad_streams_are_one_line_errors(tmp_path, bad, msg):
    out = tmp_path / "bad.sqfs"
    with pytest.raises(CorruptInput, match=msg):
        sinks.write_squashfs(iter(bad), out, compression="zstd")
    assert os.listdir(tmp_path) == []        # no output, no temporary


def test_the_sink_uses_it_and_the_external_tools_on_request(tmp_path, monkeypatch):
    """write_squashfs picks our writer for gzip and zstd; HPCCONV_SQUASHFS_BUILDER=external picks
    tar2sqfs, which writes the same file system (sqfsdiff)."""
    items = rich_stream(6)[:-1]
    ours, theirs = tmp_path / "ours.sqfs", tmp_path / "theirs.sqfs"
    assert sinks.squashfs_builder("zstd") == "hpcconv"
    sinks.write_squashfs(entries_of(items), ours, compression="zstd", block_size=BS)
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", "external")
    sinks.write_squashfs(entries_of(items), theirs, compression="zstd", block_size=BS)
    r = subprocess.run([need("sqfsdiff"), "-T", "-a", str(theirs), "-b", str(ours)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert ours.read_bytes() != theirs.read_bytes()     # two different writers did write them
    monkeypatch.setenv("HPCCONV_SQUASHFS_BUILDER", "bogus")
    with pytest.raises(Exception, match="not a SquashFS builder"):
        sinks.write_squashfs(entries_of(items), tmp_path / "x.sqfs", compression="zstd")


def test_blocks_read_as_memoryviews_give_the_same_image(tmp_path):
    """Readers with read_view (the flatten's, over the decoded layer: no copy) hand the writer
    memoryviews: hashed, compressed, kept raw when incompressible, found all-zero, packed into
    fragments. The image is byte for byte the one written from bytes (which the other tests read
    back with sqfs2tar, unsquashfs and the kernel)."""
    from rewritetools import ViewReader

    viewed = []

    class Counting(ViewReader):
        def read_view(self, n=-1):
            viewed.append(n)
            return super().read_view(n)

    items = rich_stream()
    write_native(items, tmp_path / "bytes.sqfs", block_size=BS, compression="zstd", level=3)
    fd = os.open(tmp_path / "views.sqfs", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sqfs.write((e.with_(reader=Counting(data)) if e.type == FILE else e for e, data in items), fd, 0,
                   block_size=BS, compression="zstd", level=3)
    finally:
        os.close(fd)
    assert viewed                                # the writer asked for views
    assert (tmp_path / "views.sqfs").read_bytes() == (tmp_path / "bytes.sqfs").read_bytes()


def test_the_image_does_not_depend_on_thread_timing(tmp_path, monkeypatch):
    """Compression jobs finishing in any order, on any number of threads, give the same bytes."""
    items = rich_stream(7)
    real = sqfs.compressor
    rnd = random.Random(3)

    def jittery(name, level):
        c = real(name, level)

        def compress(data):
            import time
            time.sleep(rnd.random() * 0.004)
            return c(data)
        return compress
    monkeypatch.setattr(sqfs, "compressor", jittery)
    outs = []
    for jobs in (1, 3, 4):
        p = tmp_path / f"{jobs}.sqfs"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            sqfs.write(entries_of(items), fd, compression="zstd", level=3, block_size=BS, jobs=jobs)
        finally:
            os.close(fd)
        outs.append(p.read_bytes())
    assert outs[0] == outs[1] == outs[2]


# reuse of earlier images' blocks --------------------------------------------------------------------------
def _changed(items):
    """The rich stream with one small and one big file rewritten and a file added at the end."""
    out = []
    for e, data in items:
        if e.path in ("etc/passwd", "data/noise7"):
            data = data[:-3] + b"new"
            e = e.with_(size=len(data))
        out.append((e, data))
    extra = b"added by a second profile\n"
    out.append((_f("etc/site.conf", extra), extra))
    return out


def _write_reusing(items, out: Path, where: Path):
    reuse = sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, BS))
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = sqfs.write(entries_of(items), fd, compression="zstd", level=3, block_size=BS, reuse=reuse)
    finally:
        os.close(fd)
        reuse.close()
    reuse.save(out, 0, w)
    return w


def test_reuse_gives_the_same_image_with_fewer_compressions(tmp_path, monkeypatch):
    """The second image, made reusing the first one's blocks, is byte for byte the image made from
    scratch; only the blocks that changed were compressed (counted at the compressor)."""
    where = tmp_path / "reuse"
    items = rich_stream(8)
    first, second, fresh = tmp_path / "1.sqfs", tmp_path / "2.sqfs", tmp_path / "fresh.sqfs"
    _write_reusing(items, first, where)
    calls = []
    real = sqfs.compressor

    def counting(name, level):
        c = real(name, level)
        return lambda data: calls.append(len(data)) or c(data)
    monkeypatch.setattr(sqfs, "compressor", counting)
    write_native(_changed(items), fresh, compression="zstd", level=3, block_size=BS)
    from_scratch = len(calls)
    calls.clear()
    w = _write_reusing(_changed(items), second, where)
    assert second.read_bytes() == fresh.read_bytes()
    assert 0.8 * w.blocks_written < w.blocks_reused <= w.blocks_written
    # the metadata is compressed the same in both; of the data, only what was not reused
    assert from_scratch - len(calls) == w.compressions_saved >= w.blocks_reused


def test_reuse_never_takes_damaged_or_foreign_blocks(tmp_path):
    """A block of the earlier image changed on disk (same size, inode and time) is compressed afresh;
    an index another user could have written, or one whose image was replaced, is not used."""
    where = tmp_path / "reuse"
    items = rich_stream(9)
    first, second, fresh = tmp_path / "1.sqfs", tmp_path / "2.sqfs", tmp_path / "fresh.sqfs"
    _write_reusing(items, first, where)
    write_native(items, fresh, compression="zstd", level=3, block_size=BS)
    st = first.stat()
    with open(first, "r+b") as f:        # flip bytes in the data area, keep every stat field we check
        f.seek(200)
        b = f.read(64)
        f.seek(200)
        f.write(bytes(x ^ 0xFF for x in b))
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    w = _write_reusing(items, second, where)
    assert second.read_bytes() == fresh.read_bytes()
    assert 0 < w.blocks_reused < w.blocks_written
    indexes = sorted((where / sqfs.settings_name("zstd", 3, BS)).glob("*.idx"))
    assert len(indexes) == 2                                        # one per image
    # the recorded image replaced by another file: its index is dropped
    second.unlink()
    second.write_bytes(fresh.read_bytes())
    r = sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, BS))
    assert r.images == 1 and len(list(r.dir.glob("*.idx"))) == 1      # first's index stays, second's goes
    r.close()
    # a group-writable index (someone else may have written it): not used, and dropped
    for idx in r.dir.glob("*.idx"):
        os.chmod(idx, 0o664)
    assert sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, BS)).images == 0
    # other settings see nothing
    assert sqfs.BlockReuse(where, sqfs.settings_name("zstd", 4, BS)).images == 0


def test_without_blake3_the_keys_are_sha256_in_indexes_of_their_own(tmp_path, monkeypatch):
    """Content keys are BLAKE3 where the package is installed, else sha256: either way the image
    reads back as written (sqfs2tar), duplicates are found, blocks are reused, and an index written
    with one key hash is never read with the other (its keys would never match)."""
    import blake3

    where = tmp_path / "reuse"
    items = rich_stream(12)
    dup = random.Random(12).randbytes(3 * BS + 17)
    items += [(_f("d/one", dup), dup), (_f("d/two", dup), dup)]
    assert sqfs.KEY_HASH == "blake3" and sqfs.key_of(b"x") == blake3.blake3(b"x").digest()
    with_blake3 = sqfs.settings_name("zstd", 3, BS)
    first = tmp_path / "b3.sqfs"
    _write_reusing(items, first, where)
    monkeypatch.setattr(sqfs, "_blake3", None)
    monkeypatch.setattr(sqfs, "KEY_HASH", "sha256")
    assert sqfs.key_of(b"x") == hashlib.sha256(b"x").digest()
    with_sha = sqfs.settings_name("zstd", 3, BS)
    assert with_sha != with_blake3
    plain, again = tmp_path / "sha.sqfs", tmp_path / "sha-again.sqfs"
    w = _write_reusing(items, plain, where)
    assert w.blocks_reused == 0                  # the blake3 image's index is not in this directory
    assert normalize_links(tree_of_tar(sqfs2tar(plain))) == normalize_links(expected_tree(items))
    w = _write_reusing(items, again, where)
    assert again.read_bytes() == plain.read_bytes() and w.blocks_reused > 0.8 * w.blocks_written
    # the copy of the 3-block random file costs no data in either (a copy would add 3 blocks)
    without = tmp_path / "without.sqfs"
    write_native([(e, d) for e, d in items if e.path != "d/two"], without, compression="zstd", level=3,
                 block_size=BS)
    for img in (first, plain):
        assert img.stat().st_size < without.stat().st_size + BS


@pytest.mark.parametrize("alike", [False, True], ids=["sizes-vary", "sizes-alike"])
def test_reuse_survives_a_change_among_small_files(tmp_path, alike):
    """Small files changed and added near the start of the stream (a rebuilt top layer comes
    first): the fragment packing falls back into step, so most fragment blocks are still reused."""
    rnd = random.Random(11)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"epsilon", b"zeta", b"eta", b"theta"]

    def small(i):
        if alike:           # every file 2 KiB: only the hash-chosen cuts bring the packing back into step
            return (b"%d " % i * 400)[:2048]
        return b" ".join(rnd.choice(words) for _ in range(rnd.randrange(100, 600))) + b"%d\n" % i
    items = [(_f(f"s/{i:05d}", d), d) for i, d in ((i, small(i)) for i in range(3000))]
    changed = list(items)
    e, d = changed[5]
    changed[5] = (e.with_(size=len(d) + 4), d + b"new\n")
    added = small(99999)
    changed.insert(3, (_f("s/00002-added", added), added))      # shifts everything after it
    where = tmp_path / "reuse"

    def write(items, out):
        reuse = sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, 1 << 16))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            w = sqfs.write(entries_of(items), fd, compression="zstd", level=3, block_size=1 << 16, reuse=reuse)
        finally:
            os.close(fd)
            reuse.close()
        reuse.save(out, 0, w)
        return w
    write(items, tmp_path / "1.sqfs")
    w = write(changed, tmp_path / "2.sqfs")
    assert w.blocks_written > 50                       # all of it fragments
    assert w.blocks_reused >= 0.9 * w.blocks_written, (w.blocks_reused, w.blocks_written)
    back = tree_of_tar(sqfs2tar(tmp_path / "2.sqfs"))
    assert back["s/00005"][5] == hashlib.sha256(d + b"new\n").hexdigest()
    assert back["s/00002-added"][5] == hashlib.sha256(added).hexdigest()


def test_a_file_thousands_of_directories_deep_first(tmp_path):
    """The flatten may name a deep file before the parents it implies (they come at the end)."""
    deep = "/".join(["d"] * 3000)
    items = [(_f(deep + "/f", b"deep"), b"deep"), (Entry("d", DIR, 0o700), b"")]
    img = tmp_path / "deep.sqfs"
    write_native(items, img, compression="zstd", level=3, block_size=BS)
    back = tree_of_tar(sqfs2tar(img))
    assert back[deep + "/f"][5] == hashlib.sha256(b"deep").hexdigest()
    assert back["d"][1] == 0o700 and back["d/d"][1] == 0o755 and len(back) == 3001


def test_names_do_not_depend_on_the_locale(tmp_path):
    """The stream's names are the layer's bytes (decoded as UTF-8 with surrogate escapes whatever
    the locale): written under an ASCII filesystem encoding (C locale, UTF-8 mode off) the image is
    byte for byte the one written here, non-UTF-8 bytes, non-ASCII names, link targets and xattrs
    included (os.fsencode raised UnicodeEncodeError there, and gave Latin-1 bytes in a Latin-1
    locale)."""
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_sqfs_writer import write_native, rich_stream, BS
from hpcconv.entries import Entry, SYMLINK
items = [(e, d) for e, d in rich_stream() if e.path.startswith(("odd", "bin"))]
items.append((Entry("odd/l\\u00e9", SYMLINK, 0o777, linkname="caf\\u00e9/\\udce9"), b""))
print(sys.getfilesystemencoding())
write_native(items, __import__("pathlib").Path(sys.argv[1]), block_size=BS)
"""
    for name, env, encoding in [("c.sqfs", {"PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"},
                                 "ascii"), ("u.sqfs", {"PYTHONUTF8": "1"}, "utf-8")]:
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], env={**os.environ, **env},
                           capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == [encoding], r.stderr
    assert (tmp_path / "c.sqfs").read_bytes() == (tmp_path / "u.sqfs").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(sqfs2tar(tmp_path / "c.sqfs")), encoding="utf-8",
                      errors="surrogateescape") as tf:       # sqfs2tar: the independent reader
        got = {ti.name.lstrip("./"): ti for ti in tf}
    assert "odd/caf\udce9" in got                              # the byte 0xE9 itself
    assert got["odd/l\xe9"].linkname == "caf\xe9/\udce9"       # é as UTF-8, then 0xE9


def test_write_back_behind_the_writer_changes_no_byte(tmp_path, monkeypatch):
    """With flush_behind (the SIF sink, which fsyncs at the end) the write-back of the data written
    so far is started every FLUSH_STEP bytes, on the ranges in order, and the image is the same
    bytes as without (duplicates cut off after a range was handed over included)."""
    if sqfs._sync_range is None:
        pytest.skip("the C module is not built")
    items = rich_stream(13)
    dup = random.Random(13).randbytes(5 * BS)
    items += [(_f("d/one", dup), dup), (_f("d/two", dup), dup)]
    plain, behind = tmp_path / "plain.sqfs", tmp_path / "behind.sqfs"
    write_native(items, plain, compression="zstd", level=3, block_size=BS)
    calls = []
    real = sqfs._sync_range
    monkeypatch.setattr(sqfs, "_sync_range", lambda fd, off, n: calls.append((off, n)) or real(fd, off, n))
    monkeypatch.setattr(sqfs, "FLUSH_STEP", 3 * BS)
    write_native(items, behind, compression="zstd", level=3, block_size=BS, flush_behind=True)
    assert behind.read_bytes() == plain.read_bytes()
    calls.sort()                                     # (they run on the pool: in any order)
    assert len(calls) > 3
    assert all(b[0] == a[0] + a[1] for a, b in zip(calls, calls[1:]))      # contiguous, no overlap
    assert calls[0][0] == 96 + 6 and all(n >= 3 * BS for _, n in calls)    # from the first data byte
