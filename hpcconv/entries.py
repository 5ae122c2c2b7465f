"""The rootfs as a stream of entries, and writing such a stream as a tar archive.

Flatten produces an iterator of :class:`Entry`; rewrite passes map entries to entries; emitters
consume them. Contract of an entry stream:

* paths are relative to the root, normalised (no leading `/` or `./`, no `..`, no trailing `/`);
  the root itself is never an entry; names may hold any byte except NUL (non-UTF-8 bytes are kept
  as surrogate escapes, so `path.encode("utf-8", "surrogateescape")` gives the original bytes in
  any locale — `os.fsencode` does only where the filesystem encoding is UTF-8);
* every directory appears before anything inside it;
* a `hardlink` entry's `linkname` is the path of an entry already yielded earlier in the stream;
* a `file` entry's `reader` yields exactly `size` bytes and is valid only until the consumer asks
  for the next entry (content is streamed, never held for the whole image);
* a reader may have `provenance()`: (a layer blob's sha256, the offset in its decoded stream) of
  the next byte it returns, the rest following contiguously (flatten._Named). Block reuse and the
  ELF findings cache trust it in place of the bytes' own hash, so a wrapper that hands on the very
  same bytes may forward it (the passes' tee, the SIF probe) and one that changes them must not
  have it;
* a reader may have `read_view(n)`: as `read`, but the bytes may come as a read-only memoryview
  (of immutable bytes: a decoded layer chunk, no copy). Only for consumers that take any
  bytes-like object (hashing, compressing, writing, joining) and get it through `reader_of`; a
  wrapper that hands on the same bytes may forward it (the tee, the SIF probe).
"""

from __future__ import annotations

import io
import stat
import tarfile
from dataclasses import dataclass, field, fields
from typing import BinaryIO, Iterable, Iterator

from .speedups import native
from .tarread import byte_sum

FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "file", "dir", "symlink", "hardlink", "char", "block", "fifo"

_TAR_TYPES = {
    FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE, HARDLINK: tarfile.LNKTYPE,
    CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE, FIFO: tarfile.FIFOTYPE,
}
_FROM_TAR = {
    tarfile.REGTYPE: FILE, tarfile.AREGTYPE: FILE, tarfile.CONTTYPE: FILE, tarfile.GNUTYPE_SPARSE: FILE,
    tarfile.DIRTYPE: DIR, tarfile.SYMTYPE: SYMLINK, tarfile.LNKTYPE: HARDLINK,
    tarfile.CHRTYPE: CHAR, tarfile.BLKTYPE: BLOCK, tarfile.FIFOTYPE: FIFO,
}
_STAT_TYPES = {FILE: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, HARDLINK: stat.S_IFREG,
               CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


@dataclass
class Entry:
    path: str
    type: str
    mode: int = 0o644            # permission bits incl. setuid/setgid/sticky, no file-type bits
    uid: int = 0
    gid: int = 0
    mtime: float = 0
    size: int = 0
    linkname: str = ""           # symlink target as stored, or hardlink target path (root-relative)
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    uname: str = ""
    gname: str = ""
    reader: BinaryIO | None = None

    def with_(self, **kw) -> "Entry":
        """A copy with some fields changed (dataclasses.replace, without its per-call cost: this
        runs for every file of every image)."""
        d = self.__dict__.copy()
        d.update(kw)
        if len(d) != _NFIELDS:                   # a keyword that is no field added a key
            raise TypeError(f"Entry has no field(s) {sorted(kw.keys() - _FIELDS)}")
        new = object.__new__(Entry)
        new.__dict__ = d
        return new

    @property
    def st_mode(self) -> int:
        return _STAT_TYPES[self.type] | (self.mode & 0o7777)


def provenance_of(reader) -> tuple[bytes, int] | None:
    """A reader's provenance (see the contract above), None where it has none."""
    p = getattr(reader, "provenance", None)
    return p() if p is not None else None


def reader_of(reader):
    """A reader's `read_view` where it has one (see the contract above), else its `read`."""
    view = getattr(reader, "read_view", None)
    return view if view is not None else reader.read


def raw(name: str) -> bytes:
    """The bytes a path or name of the stream stands for (see the contract above), in any locale:
    what a sink hands to the OS or writes into an image."""
    return name.encode("utf-8", "surrogateescape")


_FIELDS = frozenset(f.name for f in fields(Entry))
_NFIELDS = len(_FIELDS)


def read_full(read, n: int) -> bytes:
    """n bytes from `read` (a reader's read method), in as many calls as it takes: readers may
    return less than asked. Fewer only where the content ends."""
    if n <= 0:
        return b""
    data = read(n)
    if len(data) >= n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def entry_type_of(ti: tarfile.TarInfo) -> str | None:
    return _FROM_TAR.get(ti.type)


def normalize_path(name: str) -> str | None:
    """Normalise a tar member name to the stream form. Returns None for the root itself and
    raises ValueError for names with a `..` component or a NUL byte."""
    if "\0" in name:
        raise ValueError("name contains a NUL byte")
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise ValueError("name contains a '..' component")
        parts.append(p)
    return "/".join(parts) or None


# Writing ---------------------------------------------------------------------------------------------
XATTR_PREFIX = "SCHILY.xattr."


def to_tarinfo(e: Entry, prefix: str = "") -> tarfile.TarInfo:
    name = prefix + e.path
    ti = tarfile.TarInfo(name + ("/" if e.type == DIR else ""))
    ti.type = _TAR_TYPES[e.type]
    ti.mode = e.mode & 0o7777
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname, ti.gname = e.uname, e.gname
    ti.mtime = e.mtime
    if e.type == FILE:
        ti.size = e.size
    elif e.type == HARDLINK:
        ti.linkname = prefix + e.linkname
    elif e.type == SYMLINK:
        ti.linkname = e.linkname
    elif e.type in (CHAR, BLOCK):
        ti.devmajor, ti.devminor = e.devmajor, e.devminor
    if e.xattrs:
        ti.pax_headers = {XATTR_PREFIX + k: v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
    return ti


class _Exact(io.RawIOBase):
    """Read exactly n bytes from a reader; a short source is an error, not silent zero padding."""

    def __init__(self, reader: BinaryIO, n: int, what: str):
        self._r, self._left, self._what = reader, n, what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._left <= 0:
            return 0
        data = self._r.read(min(len(b), self._left))
        if not data:
            raise OSError(f"content of {self._what} ended {self._left} bytes early")
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


_NUL = b"\0"
_RECORD = 20 * 512
_USTAR_MAGIC = b"ustar\x0000"
_TYPEFLAG = {FILE: b"0", DIR: b"5", SYMLINK: b"2", HARDLINK: b"1", CHAR: b"3", BLOCK: b"4", FIFO: b"6"}
_EMPTY_DEV = bytes(16)
_OCT7 = 8 ** 7
_OCT11 = 8 ** 11
_WBUF = 1 << 20


def _stn(s: str, length: int) -> bytes:
    b = s.encode("ascii", "replace")
    return b[:length] + bytes(length - len(b)) if len(b) < length else b[:length]


def _pax_records(pax: dict[str, str]) -> bytes:
    """A PAX extended header (`x`) and its records, as tarfile writes them (hdrcharset=BINARY when
    a value holds surrogate escapes)."""
    binary = False
    for v in pax.values():
        try:
            v.encode("utf-8", "strict")
        except UnicodeEncodeError:
            binary = True
            break
    recs = [b"21 hdrcharset=BINARY\n"] if binary else []
    for k, v in pax.items():
        kb = k.encode("utf-8")
        vb = v.encode("utf-8", "surrogateescape") if binary else v.encode("utf-8")
        n = len(kb) + len(vb) + 3
        p = 0
        while True:
            m = n + len(str(p))
            if m == p:
                break
            p = m
        recs.append(b"%d %s=%s\n" % (p, kb, vb))
    data = b"".join(recs)
    head = _header(b"././@PaxHeader", 0, 0, 0, len(data), 0, b"x", b"", b"", b"", _EMPTY_DEV)
    return head + data + bytes(-len(data) % BLOCK_SIZE_TAR)


BLOCK_SIZE_TAR = 512


def _ustar_py(name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, typeflag: bytes,
              linkname: bytes, uname: bytes, gname: bytes, dev: bytes) -> bytes:
    """One ustar header block (fields already range-checked and encoded); `native.ustar` formats
    the same block in C."""
    buf = b"".join((
        name[:100].ljust(100, _NUL),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0        " % (mode, uid, gid, size, mtime),
        typeflag,
        linkname[:100].ljust(100, _NUL),
        _USTAR_MAGIC,
        uname[:32].ljust(32, _NUL),
        gname[:32].ljust(32, _NUL),
        dev,
        bytes(167),
    ))
    return b"%s%06o\0%s" % (buf[:148], byte_sum(buf), buf[155:])


_header = native.ustar if native is not None else _ustar_py


def tar_header(e: Entry, prefix: str = "") -> bytes:
    """The PAX-format header block(s) of an entry, byte for byte what `tarfile` (PAX_FORMAT,
    utf-8, surrogateescape) writes for `to_tarinfo(e, prefix)`, without building a TarInfo."""
    name = prefix + e.path + ("/" if e.type == DIR else "")
    if e.type == HARDLINK:
        link = prefix + e.linkname
    elif e.type == SYMLINK:
        link = e.linkname
    else:
        link = ""
    pax: dict[str, str] = {}
    if e.xattrs:
        for k, v in e.xattrs.items():
            pax[XATTR_PREFIX + k] = v.decode("utf-8", "surrogateescape")
    for hname, val, length in (("path", name, 100), ("linkpath", link, 100), ("uname", e.uname, 32),
                               ("gname", e.gname, 32)):
        if hname in pax:
            continue
        if not val.isascii() or len(val) > length:
            pax[hname] = val
    nums = []
    for hname, val, limit in (("uid", e.uid, _OCT7), ("gid", e.gid, _OCT7),
                              ("size", e.size if e.type == FILE else 0, _OCT11), ("mtime", e.mtime, _OCT11)):
        is_float = isinstance(val, float)
        iv = round(val) if is_float else val
        if not 0 <= iv < limit:
            if hname not in pax:
                pax[hname] = str(val)
            iv = 0
        elif is_float and hname not in pax:
            pax[hname] = str(val)
        nums.append(iv)
    if e.type in (CHAR, BLOCK):
        if not (0 <= e.devmajor < _OCT7 and 0 <= e.devminor < _OCT7):
            raise ValueError("overflow in number field")
        dev = b"%07o\0%07o\0" % (e.devmajor, e.devminor)
    else:
        dev = _EMPTY_DEV
    head = _header(name.encode("ascii", "replace"), e.mode & 0o7777, nums[0], nums[1], nums[2], nums[3],
                   _TYPEFLAG[e.type], link.encode("ascii", "replace"), e.uname.encode("ascii", "replace"),
                   e.gname.encode("ascii", "replace"), dev)
    return _pax_records(pax) + head if pax else head


class TarWriter:
    """Write an entry stream as a PAX tar to a binary file object (a file, a pipe).

    Headers are formatted directly (:func:`tar_header`; the bytes are what `tarfile` writes, at a
    fraction of its per-entry cost) and small writes are gathered into 1 MiB writes. Nothing is
    kept per entry. The archive ends like tarfile's: two zero blocks, padded to a 10 KiB record."""

    def __init__(self, fileobj: BinaryIO, prefix: str = ""):
        self._f = fileobj
        self._prefix = prefix
        self._buf = bytearray()
        self._offset = 0
        self.count = 0
        self.closed = False

    def _put(self, data) -> None:
        self._buf += data
        if len(self._buf) >= _WBUF:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self._f.write(self._buf)
            self._offset += len(self._buf)
            self._buf = bytearray()

    def add(self, e: Entry) -> None:
        if self.closed:
            raise ValueError("tar writer is closed")
        self._put(tar_header(e, self._prefix))
        if e.type == FILE and e.size:
            assert e.reader is not None, f"file entry {e.path} has no reader"
            left = e.size
            read = e.reader.read
            while left > 0:
                data = read(min(left, _WBUF))
                if not data:
                    raise OSError(f"content of {e.path} ended {left} bytes early")
                if len(data) > left:
                    data = data[:left]
                left -= len(data)
                if len(data) >= 65536:
                    self._flush()
                    self._f.write(data)
                    self._offset += len(data)
                else:
                    self._put(data)
            pad = -e.size % BLOCK_SIZE_TAR
            if pad:
                self._put(bytes(pad))
        self.count += 1

    def write_all(self, entries: Iterable[Entry]) -> int:
        for e in entries:
            self.add(e)
        return self.count

    def abandon(self) -> None:
        """Give up (after an error): nothing more, no trailer, is written."""
        self.closed = True
        self._buf = bytearray()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._put(bytes(2 * BLOCK_SIZE_TAR))
        end = self._offset + len(self._buf)
        if end % _RECORD:
            self._buf += bytes(_RECORD - end % _RECORD)
        self._flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abandon()


def read_tar_entries(fileobj: BinaryIO) -> Iterator[Entry]:
    """Read a tar stream as entries (used for our own outputs and test oracles)."""
    with tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8", errors="surrogateescape") as tf:
        for ti in tf:
            t = entry_type_of(ti)
            path = normalize_path(ti.name)
            if t is None or path is None:
                continue
            xattrs = {k[len(XATTR_PREFIX):]: v.encode("utf-8", "surrogateescape")
                      for k, v in ti.pax_headers.items() if k.startswith(XATTR_PREFIX)}
            link = ti.linkname
            if t == HARDLINK:
                link = normalize_path(link) or ""
            yield Entry(path, t, ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime, ti.size if t == FILE else 0,
                        link, ti.devmajor, ti.devminor, xattrs, ti.uname, ti.gname,
                        tf.extractfile(ti) if t == FILE else None)
