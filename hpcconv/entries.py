"""The rootfs as a stream of entries, and writing such a stream as a tar archive.

Flatten produces an iterator of :class:`Entry`; rewrite passes map entries to entries; emitters
consume them. Contract of an entry stream:

* paths are relative to the root, normalised (no leading `/` or `./`, no `..`, no trailing `/`);
  the root itself is never an entry; names may hold any byte except NUL (non-UTF-8 bytes are kept
  as surrogate escapes, so `os.fsencode(path)` gives the original bytes);
* every directory appears before anything inside it;
* a `hardlink` entry's `linkname` is the path of an entry already yielded earlier in the stream;
* a `file` entry's `reader` yields exactly `size` bytes and is valid only until the consumer asks
  for the next entry (content is streamed, never held for the whole image).
"""

from __future__ import annotations

import io
import stat
import tarfile
from dataclasses import dataclass, field, replace
from typing import BinaryIO, Iterable, Iterator

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
        return replace(self, **kw)

    @property
    def st_mode(self) -> int:
        return _STAT_TYPES[self.type] | (self.mode & 0o7777)


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


class TarWriter:
    """Write an entry stream as a PAX tar to a binary file object (a file, a pipe)."""

    def __init__(self, fileobj: BinaryIO, prefix: str = ""):
        self._tf = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT,
                                encoding="utf-8", errors="surrogateescape", bufsize=1 << 20)
        self._prefix = prefix
        self.count = 0

    def add(self, e: Entry) -> None:
        ti = to_tarinfo(e, self._prefix)
        if e.type == FILE and e.size:
            assert e.reader is not None, f"file entry {e.path} has no reader"
            self._tf.addfile(ti, _Exact(e.reader, e.size, e.path))
        else:
            self._tf.addfile(ti)
        self.count += 1

    def write_all(self, entries: Iterable[Entry]) -> int:
        for e in entries:
            self.add(e)
        return self.count

    def close(self) -> None:
        self._tf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


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
