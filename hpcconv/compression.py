"""Layer decompression: gzip (ISA-L, multi-member), zstd (multi-frame), or none, chosen by magic bytes.

The media type is a hint only: registries and tools mislabel layers, so the first bytes decide.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from .errors import CorruptInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
CHUNK = 1 << 20


class _Peek(io.RawIOBase):
    """Put back peeked bytes in front of a stream."""

    def __init__(self, head: bytes, raw: BinaryIO):
        self._head = head
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._raw.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def detect(head: bytes) -> str:
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (len(head) >= 4 and int.from_bytes(head[:4], "little") in ZSTD_SKIPPABLE):
        return "zstd"
    return "none"


class _Guard(io.RawIOBase):
    """Turn decoder errors into CorruptInput naming what was being read."""

    def __init__(self, inner, what: str):
        self._inner = inner
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._inner.read(len(b))
        except CorruptInput as e:
            raise CorruptInput(f"{self._what}: cannot decompress: {e.message}") from None
        except (OSError, EOFError, ValueError) as e:
            raise CorruptInput(f"{self._what}: cannot decompress: {e}") from None
        except Exception as e:  # zstd.ZstdError and friends
            if type(e).__name__ in ("ZstdError",):
                raise CorruptInput(f"{self._what}: cannot decompress: {e}") from None
            raise
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            super().close()


class _ZstdFrames(io.RawIOBase):
    """Decode concatenated zstd frames (and skip skippable ones); a frame cut short is an error.

    zstandard's `stream_reader` ends silently on a truncated frame, so frames are decoded one
    `decompressobj` at a time and the last one must reach its end."""

    def __init__(self, src: BinaryIO):
        import zstandard

        self._src = src
        self._dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._obj = None
        self._pending = b""
        self._out = memoryview(b"")
        self._eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self._out and not self._eof:
            data = self._pending or self._src.read(CHUNK)
            self._pending = b""
            if not data:
                if self._obj is not None:
                    raise CorruptInput("zstd stream ends in the middle of a frame")
                self._eof = True
                return
            if self._obj is None:
                if len(data) < 8 and int.from_bytes(data[:4].ljust(4, b"\0"), "little") in ZSTD_SKIPPABLE:
                    data += self._src.read(8)
                magic = int.from_bytes(data[:4], "little")
                if magic in ZSTD_SKIPPABLE and len(data) >= 8:
                    skip = 8 + int.from_bytes(data[4:8], "little")
                    while len(data) < skip:
                        more = self._src.read(skip - len(data))
                        if not more:
                            raise CorruptInput("zstd stream ends in a skippable frame")
                        data += more
                    self._pending = data[skip:]
                    continue
                self._obj = self._dctx.decompressobj()
            self._out = memoryview(self._obj.decompress(data))
            if self._obj.eof:
                self._pending = self._obj.unused_data
                self._obj = None

    def readinto(self, b) -> int:
        self._fill()
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def close(self) -> None:
        try:
            self._src.close()
        finally:
            super().close()


def open_decompressed(raw: BinaryIO, what: str = "layer") -> BinaryIO:
    """Return a buffered reader yielding the uncompressed tar bytes of `raw`."""
    head = raw.read(4)
    kind = detect(head)
    src = io.BufferedReader(_Peek(head, raw), CHUNK)
    if kind == "gzip":
        from isal import igzip

        inner = igzip.IGzipFile(fileobj=src, mode="rb")
    elif kind == "zstd":
        inner = _ZstdFrames(src)
    else:
        return src
    return io.BufferedReader(_Guard(inner, what), CHUNK)
