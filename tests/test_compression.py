"""Layer decompression by magic bytes, checked against the stdlib/zstd reference encoders."""

import gzip
import io
import os

import pytest
import zstandard

from hpcconv.compression import open_decompressed
from hpcconv.errors import CorruptInput

DATA = os.urandom(1 << 16) * 20


def test_gzip_multi_member():
    blob = gzip.compress(DATA[:5000]) + gzip.compress(DATA)
    assert open_decompressed(io.BytesIO(blob)).read() == DATA[:5000] + DATA


def test_zstd_multi_frame_and_skippable():
    c = zstandard.ZstdCompressor(level=3)
    skippable = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip"
    blob = c.compress(DATA[:100]) + skippable + c.compress(DATA)
    assert open_decompressed(io.BytesIO(blob)).read() == DATA[:100] + DATA


def test_zstd_long_window():
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=28, enable_ldm=True)
    blob = zstandard.ZstdCompressor(compression_params=params).compress(DATA)
    assert open_decompressed(io.BytesIO(blob)).read() == DATA


def test_uncompressed_passthrough():
    assert open_decompressed(io.BytesIO(DATA)).read() == DATA


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_truncated_is_corrupt(how):
    blob = (gzip.compress(DATA) if how == "gzip" else zstandard.ZstdCompressor().compress(DATA))[:-100]
    with pytest.raises(CorruptInput, match="cannot decompress"):
        open_decompressed(io.BytesIO(blob), "layer 1").read()


def _bomb_chunks(compressobj, size: int):
    zeros = bytes(1 << 20)
    parts = [compressobj.compress(zeros) for _ in range(size >> 20)]
    return b"".join(parts) + compressobj.flush()


@pytest.mark.parametrize("how,bound", [("gzip", 8 << 20), ("zstd", (8 << 20) + (128 << 10))])
def test_output_per_chunk_is_bounded(how, bound):
    """A decompression bomb comes out in bounded chunks (the expansion cap and the memory bound of
    the flatten rely on it): gzip at most 8 MiB (CHUNK) per chunk; zstd, whose RLE blocks expand 32768:1,
    at most a block more (its block headers are walked to feed the decoder about 8 MiB of output at a time)."""
    import zlib

    from hpcconv.compression import decoded_chunks

    size = 1 << 30
    co = zlib.compressobj(1, zlib.DEFLATED, 31) if how == "gzip" else zstandard.ZstdCompressor(level=1).compressobj()
    blob = _bomb_chunks(co, size if how == "zstd" else size >> 2)
    assert len(blob) < (2 << 20 if how == "gzip" else 64 << 10)
    total = biggest = 0
    for chunk in decoded_chunks(io.BytesIO(blob).read):
        total += len(chunk)
        biggest = max(biggest, len(chunk))
    assert total == (size if how == "zstd" else size >> 2)
    assert biggest <= bound, biggest


def _zstd_stream():
    """Frames of every shape the header walk meets: with and without a content checksum, single
    segment (size known) and streamed (size unknown, window descriptor), raw blocks (random data),
    RLE blocks (zeros), an empty frame, skippable frames between and at the end."""
    rnd = os.urandom(300_000)
    mixed = rnd + bytes(400_000) + DATA[:200_000]
    skip = (0x184D2A5F).to_bytes(4, "little") + (70_000).to_bytes(4, "little") + os.urandom(70_000)
    parts = [
        zstandard.ZstdCompressor(level=3, write_checksum=True).compress(mixed),
        skip,
        zstandard.ZstdCompressor(level=1, write_content_size=False).compress(bytes(3 << 20)),
        zstandard.ZstdCompressor(level=3).compress(b""),
    ]
    co = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()   # streamed: no content size
    parts.append(co.compress(rnd) + co.compress(DATA[:500_000]) + co.flush())
    parts.append(skip)
    out = mixed + bytes(3 << 20) + rnd + DATA[:500_000]
    return parts, out


class _Trickle(io.RawIOBase):
    """Returns at most `n` bytes per read: every header and block straddles reads somewhere."""

    def __init__(self, data: bytes, n: int):
        self._b, self._n = io.BytesIO(data), n

    def read(self, size=-1):
        return self._b.read(min(self._n, size if size is not None and size >= 0 else self._n))


@pytest.mark.parametrize("piece", [1 << 30, 65536, 4099, 7])
def test_zstd_frames_of_every_shape_whatever_the_reads(piece):
    """The walk of frame and block headers gives the reference decoder's bytes, however the
    compressed stream is split into reads (down to a few bytes at a time)."""
    from hpcconv.compression import decoded_chunks

    parts, want = _zstd_stream()
    blob = b"".join(parts)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(parts[0]) == want[:900_000]
    src = _Trickle(blob, piece) if piece < len(blob) else io.BytesIO(blob)
    got = b"".join(decoded_chunks(src.read))
    assert got == want


def test_zstd_cut_anywhere_inside_a_frame_is_an_error():
    """A stream cut inside a frame header, a block header, a block, a content checksum or a
    skippable frame is corrupt; cut between frames it is the frames before the cut (as gzip members)."""
    parts, _ = _zstd_stream()
    blob = b"".join(parts)
    bounds = set()
    off = 0
    for p in parts:
        off += len(p)
        bounds.add(off)
    ref = zstandard.ZstdDecompressor()
    # (from 4 bytes on: fewer cannot be told from an uncompressed layer)
    cuts = sorted(set(range(4, 40)) | set(range(4, len(blob), 997)) | {b - d for b in bounds for d in (1, 2, 3, 4, 5)})
    for cut in cuts:
        if cut in bounds or cut >= len(blob):
            continue
        with pytest.raises(CorruptInput, match="cannot decompress"):
            open_decompressed(io.BytesIO(blob[:cut]), "layer 1").read()
    for b in sorted(bounds):
        got = open_decompressed(io.BytesIO(blob[:b])).read()
        want = b"".join(ref.decompressobj().decompress(p) if p[:4] != parts[1][:4] else b""
                        for p in parts[:sum(1 for x in sorted(bounds) if x <= b)])
        assert got == want, b


def test_zstd_garbage_after_a_frame_is_an_error():
    blob = zstandard.ZstdCompressor().compress(DATA) + b"not zstd at all"
    with pytest.raises(CorruptInput, match="cannot decompress"):
        open_decompressed(io.BytesIO(blob), "layer 1").read()


@pytest.mark.parametrize("how", ["gzip", "zstd"])
def test_big_streams_come_out_in_few_big_chunks(how):
    """Each chunk is a decoder call and a GIL hand-over of the prefetch thread, which costs up to a
    switch interval while the main thread runs Python: 64 MiB must come out in a handful of chunks
    (zstd fed blind 2 KiB pieces gave thousands), whatever the compressed stream's size."""
    from hpcconv.compression import CHUNK, decoded_chunks

    data = (DATA * 5)[: 64 << 20]
    data += os.urandom(len(data) // 8)                  # some raw blocks too
    blob = gzip.compress(data, 1) if how == "gzip" else zstandard.ZstdCompressor(level=1).compress(data)
    sizes = [len(c) for c in decoded_chunks(io.BytesIO(blob).read)]
    assert sum(sizes) == len(data)
    assert len(sizes) <= 2 * (len(data) // CHUNK + 1), (len(sizes), sizes[:10])
