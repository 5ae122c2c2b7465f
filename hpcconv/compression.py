"""Layer decompression: gzip (ISA-L, multi-member), zstd (multi-frame), or none, chosen by magic bytes.

The media type is a hint only: registries and tools mislabel layers, so the first bytes decide.

`decoded_chunks` is the one decoder: it pulls compressed bytes through a `read(n)` function and
yields the uncompressed bytes in bounded chunks (gzip: at most CHUNK, 4 MiB; zstd: at most CHUNK and
one block, 128 KiB), one copy each, with no stream wrappers in between: the flatten's
prefetch thread runs it directly, `open_decompressed` wraps it in a file object.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Callable, Iterator

from .errors import CorruptInput

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
# Not 1 MiB: the thread that decodes hands each chunk over and must take the GIL back after every
# call that released it, which can take a switch interval while the main thread runs Python (5 ms
# by default; 1 MiB 9.0-9.4 s, 4 MiB 8.1-8.4 s, 8 MiB 7.2-8.0 s warm then). With the interval at
# 1 ms (cli.main) 4 MiB is best: against 8 MiB, 6 interleaved pairs on the benchmark image, cold
# -1 %, warm -6 % (-0.36 CPU-s: fewer fresh pages), and a cold conversion's peak RSS 209-219
# instead of 250-281 MB (a memoryview of a file's content keeps its whole chunk alive); 2 MiB:
# +1 % cold, +2.5 % warm, 193 MB.
CHUNK = 4 << 20

Read = Callable[[int], bytes]


def detect(head: bytes) -> str:
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC or (len(head) >= 4 and int.from_bytes(head[:4], "little") in ZSTD_SKIPPABLE):
        return "zstd"
    return "none"


def _more(read: Read, inside: bool, cut_short: str) -> bytes:
    """The next compressed chunk, or b"" at the end of the stream; an end `inside` a member or
    frame is an error (`cut_short` says which)."""
    data = read(CHUNK)
    if not data and inside:
        raise EOFError(cut_short)
    return data


def _gzip_chunks(data: bytes, read: Read) -> Iterator[bytes]:
    """Concatenated gzip members (zero padding between and after them accepted, as gzip readers
    do); each member's CRC and length are checked by the decoder; a member cut short is an error.

    ISA-L's `IgzipDecompressor` keeps unconsumed input itself and releases the GIL once per call;
    `isal_zlib.decompressobj` copies the unconsumed tail back each call and takes the GIL again for
    every block of output it grows, which costs a switch interval each time while another thread
    runs Python: on the flatten's prefetch thread beside a busy main thread the benchmark image's
    big layer decoded 4-5x slower that way, 1.7x with this one (8 MiB reads, alone and beside a
    thread spinning in Python)."""
    from isal import igzip_lib

    d = None                                    # None: between members
    while True:
        if d is None:
            if not data:
                data = read(CHUNK)
                if not data:
                    return
            data = data.lstrip(b"\0")
            if not data:
                continue
            if len(data) < 2:
                data += read(CHUNK)
            if data[:2] != GZIP_MAGIC:
                raise ValueError("data after the last gzip member is neither gzip nor zero padding")
            d = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
        elif d.needs_input:
            data = _more(read, True, "the gzip stream ends in the middle of a member")
        out = d.decompress(data, CHUNK)         # output pending past CHUNK stays in d (needs_input False)
        data = b""
        if d.eof:
            data, d = d.unused_data, None
        if out:
            yield out


_ZSTD_FRAME = int.from_bytes(ZSTD_MAGIC, "little")
_ZSTD_BLOCK_MAX = 128 << 10                     # what a compressed block regenerates at most


def _zstd_chunks(data: bytes, read: Read) -> Iterator[bytes]:
    """Concatenated zstd frames, skippable frames skipped; a frame cut short is an error.

    The frame and block headers are walked here, and the decoder is fed spans of the stream whose
    blocks regenerate at most about CHUNK: 4 bytes of zstd can stand for a 128 KiB block (RLE), so
    a call on a blind piece of input could return gigabytes (a bomb, before any cap sees it). Tiny
    blind pieces (2 KiB, as before) cost a GIL release and re-take per call, which beside a busy
    main thread made a zstd layer decode up to 40x slower. zstandard's `stream_reader` bounds its
    output but ends silently on a truncated frame; here a stream that ends inside a frame is an
    error, and the decoder must agree that each frame ended where its last block did."""
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
    buf = data          # buffered input; buf[start:] not yet fed to the decoder, headers walked to pos
    start = pos = 0

    def extend(upto: int) -> bool:
        """Read on until the buffer reaches `upto` (a position in it); False at the end of the
        stream. What was fed already is dropped (positions shift)."""
        nonlocal buf, start, pos
        while len(buf) < upto:
            more = read(max(CHUNK, upto - len(buf)))
            if not more:
                return False
            upto -= start
            buf, pos, start = buf[start:] + more, pos - start, 0
        return True

    while True:
        if not extend(pos + 4):
            if len(buf) > pos:
                raise EOFError("the zstd stream ends inside a frame header")
            return
        magic = int.from_bytes(buf[pos:pos + 4], "little")
        if magic in ZSTD_SKIPPABLE:
            if not extend(pos + 8):
                raise EOFError("the zstd stream ends in a skippable frame")
            pos += 8 + int.from_bytes(buf[pos + 4:pos + 8], "little")
            while len(buf) < pos:                # skip without holding it
                pos -= len(buf)
                buf, start = read(CHUNK), 0
                if not buf:
                    raise EOFError("the zstd stream ends in a skippable frame")
            start = pos
            continue
        if magic != _ZSTD_FRAME:
            raise ValueError("data after the last zstd frame is not a zstd frame")
        if not extend(pos + 5):
            raise EOFError("the zstd stream ends inside a frame header")
        fhd = buf[pos + 4]
        single = fhd >> 5 & 1
        pos += 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]
        obj = dctx.decompressobj(write_size=CHUNK)
        bound = 0       # what the walked, unfed blocks can regenerate
        block = 0       # ... the last of them
        last = False
        while True:
            if not last and bound < CHUNK and pos + 3 <= len(buf):
                bh = int.from_bytes(buf[pos:pos + 3], "little")
                last = bool(bh & 1)
                btype, bsize = bh >> 1 & 3, bh >> 3
                block = bsize if btype in (0, 1) else _ZSTD_BLOCK_MAX
                bound += block
                pos += 3 + (1 if btype == 1 else bsize if btype in (0, 2) else 0)
                if last and fhd & 4:
                    pos += 4                     # the content checksum (the decoder checks it)
                continue
            fed = min(pos, len(buf))
            if fed > start:
                out = obj.decompress(buf[start:fed])
                start = fed
                if out:
                    yield out
            if pos > len(buf):
                bound = block                    # the rest of that block is still to come
            elif last:
                break
            else:
                bound = 0
            if not extend(pos + (0 if last else 3)):
                raise EOFError("the zstd stream ends in the middle of a frame")
        if not obj.eof:
            raise ValueError("a zstd frame does not end where its last block does")


def decoded_chunks(read: Read, what: str = "layer") -> Iterator[bytes]:
    """The uncompressed bytes of the stream behind `read`, read to its end (so a verifying reader
    sees every byte). A CorruptInput or OSError of the stream itself (`read`) passes through;
    decoder errors (bad data, CRC or length mismatch, a stream cut short) become a CorruptInput
    naming `what`."""
    head = read(CHUNK)
    while 0 < len(head) < 4:
        more = read(CHUNK)
        if not more:
            break
        head += more
    kind = detect(head)
    if kind == "none":
        while head:
            yield head
            head = read(CHUNK)
        return
    chunks = (_gzip_chunks if kind == "gzip" else _zstd_chunks)(head, read)
    while True:
        try:
            out = next(chunks)
        except StopIteration:
            return
        except CorruptInput:
            raise
        except (EOFError, ValueError, MemoryError) as e:
            raise CorruptInput(f"{what}: cannot decompress: {e}") from None
        except Exception as e:
            # isal_zlib.error (IsalError), zstandard.ZstdError: bad data, a CRC or length mismatch
            if type(e).__name__ in ("IsalError", "ZstdError", "error"):
                raise CorruptInput(f"{what}: cannot decompress {kind}: {e}") from None
            raise
        yield out


class ChunkReader(io.RawIOBase):
    """A readable raw stream over an iterator of bytes chunks."""

    def __init__(self, chunks: Iterator[bytes], on_close: Callable[[], None] | None = None):
        self._chunks = chunks
        self._on_close = on_close
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = next(self._chunks, None)
            if data is None:
                return 0
            self._buf = memoryview(data)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            try:
                close = getattr(self._chunks, "close", None)
                if close is not None:
                    close()
                if self._on_close is not None:
                    self._on_close()
            finally:
                super().close()


def open_decompressed(raw: BinaryIO, what: str = "layer") -> BinaryIO:
    """Return a buffered reader yielding the uncompressed tar bytes of `raw` (closing it closes `raw`)."""
    return io.BufferedReader(ChunkReader(decoded_chunks(raw.read, what), raw.close), CHUNK)
