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


@pytest.mark.parametrize("how,bound", [("gzip", 8 << 20), ("zstd", 64 << 20)])
def test_output_per_chunk_is_bounded(how, bound):
    """A decompression bomb comes out in bounded chunks (the expansion cap and the memory bound of
    the flatten rely on it): gzip at most 8 MiB (CHUNK) per chunk; zstd, whose RLE blocks expand 32768:1,
    at most 64 MiB (2 KiB pieces of input per call)."""
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
