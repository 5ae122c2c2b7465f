"""A small, fast, forward-only tar reader for layer streams.

`tarfile` costs ~40 µs per member (more than decompressing it); layers have up to ~10^5 members and
flatten reads headers twice. This reader parses ustar, GNU (long names `L`/`K`, old sparse `S`)
and PAX (local `x`, global `g`, `hdrcharset=BINARY`, GNU sparse 0.0/0.1/1.0) headers, exposes the
same fields flatten needs, and reads a member's content (expanded when sparse) only when asked.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator
from zlib import adler32

from .errors import CorruptInput
from .speedups import native

_native_fields = native.fields if native is not None else None

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

# Type flags (bytes of length 1)
REG, AREG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
GNU_SPARSE, GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX = b"S", b"L", b"K", b"x", b"g", b"X"
_META = (GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL, SOLARIS_PAX)
_HEADER_ONLY = (LNK, SYM, CHR, BLK, DIR, FIFO)      # never followed by data, whatever `size` says
_LOW = bytes(range(128))
_MAX_META = 16 << 20          # extended headers (PAX, long names) for one member beyond this are hostile
_MAX_SPARSE = 1 << 20         # sparse map entries for one member


def byte_sum(b: bytes) -> int:
    """sum(b) for a header block (at most 512 bytes), in C: adler32's low half is 1 + the byte sum
    modulo 65521, and 256 bytes sum to at most 65280, so each half of the block is exact."""
    return (adler32(b[:256]) & 0xFFFF) + (adler32(b[256:]) & 0xFFFF) - 2


def _str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _num(field: bytes) -> int:
    if field and not field[0] & 0x80:
        try:                                           # the common case: octal digits, NUL/space ended
            return int(field.rstrip(b"\0"), 8)
        except ValueError:
            pass                                       # garbage after a NUL, empty, bad: the slow path
    if field and field[0] & 0x80:                      # GNU base-256
        n = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            n -= 1 << (8 * (len(field) - 1))
        elif field[0] != 0x80:
            n += (field[0] & 0x7F) << (8 * (len(field) - 1))
        return n
    s = _cstr(field).strip(b" ")
    if not s:
        return 0
    try:
        return int(s, 8)
    except ValueError:
        raise CorruptInput(f"bad number {field!r} in a tar header") from None


class Member:
    __slots__ = ("name", "type", "mode", "uid", "gid", "mtime", "size", "linkname", "devmajor", "devminor",
                 "pax_headers", "sparse", "stored")

    def __init__(self):
        self.pax_headers: dict[str, str] = {}
        self.sparse: list[tuple[int, int]] | None = None
        self.linkname = ""

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.type!r}, size={self.size})"


_new_member = object.__new__


class _Content:
    """Reads one member's content; sparse holes read as zeros. Valid until the reader moves on."""

    def __init__(self, tr: "TarReader", m: Member):
        self._tr = tr
        self._gen = tr._gen
        self._left = m.size
        self._segs = list(m.sparse) if m.sparse is not None else None
        self._seg = 0                                   # current segment (sparse only)
        self._pos = 0                                   # logical position (sparse only)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._take(n, False)

    def read_view(self, n: int = -1):
        """As read, but the bytes may come as a read-only memoryview into the decoded layer (no
        copy; see entries.reader_of)."""
        return self._take(n, True)

    def _take(self, n: int, view: bool):
        if self._gen != self._tr._gen:
            raise ValueError("member content read after the tar reader moved on")
        if n is None or n < 0:
            n = self._left
        n = min(n, self._left)
        if n <= 0:
            return b""
        if self._segs is None:
            data = self._tr._read_data(n, view)
        else:
            # full reads, like a BufferedReader: some consumers take a short read for EOF
            parts = []
            got = 0
            while got < n:
                chunk = self._read_sparse(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        self._left -= len(data)
        return data

    def _read_sparse(self, n: int) -> bytes:
        segs = self._segs
        while self._seg < len(segs) and (segs[self._seg][1] == 0 or sum(segs[self._seg]) <= self._pos):
            self._seg += 1
        if self._seg >= len(segs):
            data = bytes(n)                              # trailing hole
        else:
            off, length = segs[self._seg]
            if self._pos < off:
                data = bytes(min(n, off - self._pos))
            else:
                k = min(n, length)
                data = self._tr._read_data(k)
                if not data:
                    raise CorruptInput("sparse map of a tar member asks for more data than is stored")
                segs[self._seg] = (off + len(data), length - len(data))
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


class TarReader:
    """Iterate the members of an uncompressed tar stream; `content(m)` reads the current member."""

    def __init__(self, stream: BinaryIO):
        self._s = stream
        self._drop = getattr(stream, "skip", None)   # skip without copying (the C module's reader)
        self._view = getattr(stream, "view", None)   # read without copying (ditto), else None
        self._data_left = 0          # stored data bytes of the current member not yet read
        self._pad = 0                # padding after them
        self._gen = 0
        self._global: dict[str, str] = {}
        self._global_size = 0
        self._meta = 0
        self.offset = 0              # bytes consumed

    # raw reading ---------------------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        data = self._s.read(n)
        self.offset += len(data)
        return data

    def _exact(self, n: int, what: str) -> bytes:
        data = self._read(n)
        if len(data) != n:
            raise CorruptInput(f"tar stream ends inside {what}")
        return data

    def _read_data(self, n: int, view: bool = False) -> bytes:
        n = min(n, self._data_left)
        if view and self._view is not None:
            data = self._view(n)
            self.offset += len(data)
        else:
            data = self._read(n)
        if len(data) != n:
            raise CorruptInput("tar stream ends inside a member's content")
        self._data_left -= n
        return data

    def _skip(self, n: int) -> None:
        if self._drop is not None and n > 0:
            done = self._drop(n)
            self.offset += done
            if done != n:
                raise CorruptInput("tar stream ends inside a member's content")
            return
        while n > 0:
            data = self._read(min(n, 1 << 20))
            if not data:
                raise CorruptInput("tar stream ends inside a member's content")
            n -= len(data)

    def _meta_data(self, size: int, what: str) -> bytes:
        self._meta += size
        if size > _MAX_META or self._meta > _MAX_META:
            raise CorruptInput(f"{what} header of {size} bytes ({self._meta} in all for one member)")
        data = self._exact(size, what)
        self._skip(-size % BLOCK)
        return data

    # iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Member]:
        while True:
            self._gen += 1
            left = self._data_left + self._pad
            if left:
                self._skip(left)
                self._data_left = self._pad = 0
            m = self._next()
            if m is None:
                return
            yield m

    def content(self, m: Member) -> _Content:
        return _Content(self, m)

    def _header(self) -> tuple[bytes, tuple | None] | tuple[None, None]:
        """The next header block and, where the C module parsed it, its fields (see _native.c);
        (None, None) at the end."""
        block = self._read(BLOCK)
        if not block or block == ZERO_BLOCK:
            return None, None                            # end of archive (or an empty stream)
        if len(block) != BLOCK:
            raise CorruptInput("tar stream ends inside a header")
        if _native_fields is not None:
            f = _native_fields(block)
            if f is not None:
                return block, f
        chk = block[148:156]
        stored = _num(chk)
        unsigned = byte_sum(block) - sum(chk) + 8 * 32
        if stored != unsigned:
            # some old tars summed signed chars
            high = len(block.translate(None, _LOW)) - len(chk.translate(None, _LOW))
            if stored != unsigned - 256 * high:
                raise CorruptInput(f"bad tar header checksum at offset {self.offset - BLOCK}")
        return block, None

    def _next(self) -> Member | None:
        pax: dict[str, str] = {}
        sparse00: list[int] = []
        longname = longlink = None
        self._meta = 0
        while True:
            block, f = self._header()
            if block is None:
                if pax or longname is not None or longlink is not None:
                    raise CorruptInput("tar stream ends after an extended header")
                return None
            t = block[156:157]
            size = f[1] if f else _num(block[124:136])
            if size < 0:
                raise CorruptInput("negative member size in a tar header")
            if t in _META:
                data = self._meta_data(size, "extended")
                if t == GNU_LONGNAME:
                    longname = _cstr(data)
                elif t == GNU_LONGLINK:
                    longlink = _cstr(data)
                elif t == PAX_GLOBAL:
                    self._global.update(_parse_pax(data, []))
                    self._global_size += size
                    if self._global_size > _MAX_META:
                        raise CorruptInput("global PAX headers too large")
                else:
                    pax.update(_parse_pax(data, sparse00))
                continue
            break
        m = _new_member(Member)                  # every slot is set below (no __init__ dict to discard)
        m.sparse = None
        if self._global:
            pax = {**self._global, **pax}
        if f and (not pax or pax.keys() <= _PAX_TIMES):   # the common cases, parsed in C (the same values)
            _, _, name, m.mode, m.uid, m.gid, m.mtime, link, m.devmajor, m.devminor = f
            if "mtime" in pax:
                m.mtime = _pax_float(pax["mtime"])
            m.name = _str(longname if longname is not None else name)
            m.linkname = _str(longlink if longlink is not None else link)
        else:
            name = _cstr(block[0:100])
            if block[257:263] == b"ustar\0":
                prefix = _cstr(block[345:500])
                if prefix:
                    name = prefix + b"/" + name
            m.name = pax["path"] if "path" in pax else _str(longname if longname is not None else name)
            m.mode = _num(block[100:108]) & 0o7777
            m.uid = int(pax["uid"]) if "uid" in pax else _num(block[108:116])
            m.gid = int(pax["gid"]) if "gid" in pax else _num(block[116:124])
            m.mtime = _pax_float(pax["mtime"]) if "mtime" in pax else _num(block[136:148])
            if "size" in pax:
                size = int(pax["size"])
            m.linkname = (pax["linkpath"] if "linkpath" in pax else
                          _str(longlink if longlink is not None else _cstr(block[157:257])))
            m.devmajor = _num(block[329:337]) if t in (CHR, BLK) else 0
            m.devminor = _num(block[337:345]) if t in (CHR, BLK) else 0
        m.type = t
        m.pax_headers = pax
        if t in _HEADER_ONLY or (t == AREG and m.name.endswith("/")):
            size = 0
        m.stored = size
        if t == AREG and m.name.endswith("/"):
            m.type = DIR
        if m.type == DIR:
            m.name = m.name.rstrip("/")
        if t == GNU_SPARSE:
            m.type = REG
            m.sparse, m.size = self._old_gnu_sparse(block)
        elif "GNU.sparse.major" in pax or "GNU.sparse.map" in pax or sparse00:
            m.size = size
            self._data_left, self._pad = size, -size % BLOCK
            m.sparse, m.size = self._pax_sparse(pax, sparse00)
            if "GNU.sparse.name" in pax:
                m.name = pax["GNU.sparse.name"]
            return m
        else:
            m.size = size if t in (REG, AREG, CONT) else 0
        self._data_left, self._pad = size, -size % BLOCK
        return m

    def _old_gnu_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        segs = _sparse_entries(block[386:482], 4)
        extended = block[482]
        realsize = _num(block[483:495])
        while extended:
            ext = self._exact(BLOCK, "a sparse header")
            segs += _sparse_entries(ext[:504], 21)
            extended = ext[504]
            if len(segs) > _MAX_SPARSE:
                raise CorruptInput("sparse map too large")
        return segs, realsize

    def _pax_sparse(self, pax: dict, sparse00: list[int]) -> tuple[list[tuple[int, int]], int]:
        realsize = int(pax.get("GNU.sparse.realsize") or pax.get("GNU.sparse.size") or 0)
        if pax.get("GNU.sparse.major") == "1":
            # 1.0: the map is at the start of the data, decimal numbers one per line, block padded
            nums: list[int] = []
            buf = b""
            count = None
            used = 0
            while count is None or len(nums) < 2 * count:
                if b"\n" not in buf:
                    if used > _MAX_META:
                        raise CorruptInput("sparse map too large")
                    chunk = self._read_data(BLOCK)
                    if len(chunk) != BLOCK:
                        raise CorruptInput("tar stream ends inside a sparse map")
                    used += BLOCK
                    buf += chunk
                    continue
                line, buf = buf.split(b"\n", 1)
                try:
                    v = int(line)
                except ValueError:
                    raise CorruptInput("bad sparse map in a tar member") from None
                if count is None:
                    count = v
                    if not 0 <= count <= _MAX_SPARSE:
                        raise CorruptInput("bad sparse map size in a tar member")
                else:
                    nums.append(v)
            segs = list(zip(nums[0::2], nums[1::2]))
        elif "GNU.sparse.map" in pax:
            vals = [int(x) for x in pax["GNU.sparse.map"].split(",") if x]
            segs = list(zip(vals[0::2], vals[1::2]))
        else:
            segs = list(zip(sparse00[0::2], sparse00[1::2]))
        if len(segs) > _MAX_SPARSE or any(o < 0 or n < 0 for o, n in segs):
            raise CorruptInput("bad or oversized sparse map")
        return segs, realsize


def _sparse_entries(area: bytes, n: int) -> list[tuple[int, int]]:
    out = []
    for i in range(n):
        off = area[i * 24: i * 24 + 12]
        length = area[i * 24 + 12: i * 24 + 24]
        if not off.strip(b"\0"):
            break
        out.append((_num(off), _num(length)))
    return out


# PAX records that only say times (GNU tar --format=posix writes atime and ctime for every member):
# the rest of such a member's header is the block's, which the C module parses
_PAX_TIMES = frozenset(("atime", "ctime", "mtime"))


def _pax_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise CorruptInput(f"bad PAX mtime {v[:40]!r}") from None


def _parse_pax(data: bytes, sparse00: list[int]) -> dict[str, str]:
    """PAX records `LEN KEY=VALUE\\n`. Values are UTF-8 unless `hdrcharset=BINARY`; both are kept
    as surrogate-escaped str. GNU sparse 0.0 offset/numbytes pairs repeat, so they are collected
    in order into `sparse00`."""
    out: dict[str, str] = {}
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise CorruptInput("bad PAX header record")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise CorruptInput("bad PAX header record length") from None
        if length <= 0 or pos + length > n:
            raise CorruptInput("bad PAX header record length")
        rec = data[sp + 1: pos + length - 1]
        eq = rec.find(b"=")
        if eq < 0 or data[pos + length - 1] != 0x0A:
            raise CorruptInput("bad PAX header record")
        key = rec[:eq].decode("utf-8", "surrogateescape")
        val = rec[eq + 1:].decode("utf-8", "surrogateescape")
        if key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
            sparse00.append(int(val))
        out[key] = val
        pos += length
    return out
