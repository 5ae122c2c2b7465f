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
        except CorruptInput:
            raise
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


def open_decompressed(raw: BinaryIO, what: str = "layer") -> BinaryIO:
    """Return a buffered reader yielding the uncompressed tar bytes of `raw`."""
    head = raw.read(4)
    kind = detect(head)
    src = io.BufferedReader(_Peek(head, raw), CHUNK)
    if kind == "gzip":
        from isal import igzip

        inner = igzip.IGzipFile(fileobj=src, mode="rb")
    elif kind == "zstd":
        import zstandard

        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        inner = dctx.stream_reader(src, read_size=CHUNK, read_across_frames=True, closefd=True)
    else:
        return src
    return io.BufferedReader(_Guard(inner, what), CHUNK)
