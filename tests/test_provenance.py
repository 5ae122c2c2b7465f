"""Content provenance: a file's bytes named by where they sit in a verified layer blob's decoded
stream (flatten._Named.provenance), and the SquashFS writer's block reuse keyed by it (emit/sqfs.py:
the hash an earlier image recorded for a span is taken instead of hashing the bytes again).

Oracles: the layer blobs decompressed here with gzip/zstandard and sliced at the offsets the
readers report; sha256 of those blobs computed here; the image written without any reuse (the
warm image must be byte for byte the same); the bytes handed to sha256 counted at hashlib."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import subprocess

import pytest

from flattools import image_from_built
from hpcconv.emit import sqfs
from hpcconv.entries import FILE
from hpcconv.flatten import Flattener
from hpcconv.rewrite.base import PassRunner, _TeeReader
from ocitools import T, build_image, make_tar

BIG = 3 * (1 << 20) + 12345           # several writer blocks and several decoder chunks


def _decoded(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(blob)


def _big(seed: int = 3) -> bytes:
    """Compressible (its blocks are stored compressed, not as they are) and unlike itself anywhere."""
    rnd = random.Random(seed)
    return b"".join(b"%08d %016x\n" % (i, rnd.getrandbits(64)) for i in range(BIG // 26 + 1))[:BIG]


def _image(top: bytes = b"top layer v1\n"):
    big = _big()
    lower = make_tar([T("usr", "dir"), T("usr/big", data=big), T("usr/small", data=b"small file\n" * 30),
                      T("usr/" + "n" * 150, data=b"long name (PAX path)\n"),
                      T("usr/replaced", data=b"lower copy, hidden by the top layer\n"),
                      T("usr/empty", data=b"")])
    upper = make_tar([T("usr", "dir"), T("usr/replaced", data=top), T("usr/again", data=big[:70000])])
    return build_image([lower, upper], compression="gzip"), build_image([lower, upper], compression="zstd")


@pytest.mark.parametrize("which", [0, 1], ids=["gzip", "zstd"])
def test_provenance_names_the_bytes_of_the_decoded_layer(which):
    """Every file read from a layer says which blob and which offset of its decoded stream the next
    byte comes from; the slice there, cut from the blob decompressed independently, is the content
    read (also after partial reads, and through the passes' tee, which replays the head it took)."""
    built = _image()[which]
    img = image_from_built(built)
    decoded = {bytes.fromhex(d.digest.split(":")[1]): _decoded(built.blobs[d.digest]) for d in img.manifest.layers}
    for raw in decoded:               # the key is the blob's own sha256
        assert hashlib.sha256(built.blobs["sha256:" + raw.hex()]).digest() == raw
    seen = {}
    for e in Flattener(img, single_pass=True).entries():
        if e.type != FILE or not e.size:
            continue
        blob, off = e.reader.provenance()
        first = e.reader.read(1000)
        assert e.reader.provenance() == (blob, off + len(first))
        rest = e.reader.read()
        assert decoded[blob][off:off + e.size] == first + rest
        assert e.reader.provenance() == (blob, off + e.size)
        seen[e.path] = blob
    assert set(seen) == {"usr/big", "usr/small", "usr/" + "n" * 150, "usr/replaced", "usr/again"}
    assert seen["usr/replaced"] != seen["usr/big"]          # the top layer's copy, from the top blob
    # through PassRunner's tee: it read a head first and replays it
    for e in PassRunner([], head_size=4096).transform(Flattener(img, single_pass=True).entries()):
        if e.type == FILE and e.size:
            assert isinstance(e.reader, _TeeReader)
            blob, off = e.reader.provenance()
            data = e.reader.read(10)
            assert e.reader.provenance() == (blob, off + len(data))
            data += e.reader.read()
            assert decoded[blob][off:off + e.size] == data


def test_sparse_members_and_replaced_content_have_no_provenance(tmp_path):
    """A sparse member's stored bytes are not its content (holes), and content a pass replaced is
    not the layer's: neither claims a place in a layer."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"end")
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "--owner=0", "--group=0", "-cf", str(tar), "-C",
                    str(src), "sparse"], check=True)
    img = image_from_built(build_image([tar.read_bytes()]))
    files = []
    for e in Flattener(img, single_pass=True).entries():
        if e.type == FILE:
            assert e.reader.provenance() is None
            assert e.reader.read() == (src / "sparse").read_bytes()
            files.append(e.path)
    assert files == ["sparse"]


class _CountingSha:
    """The writer's content key function, remembering the sha256 of every input it hashes."""

    def __init__(self):
        self.inputs: list[bytes] = []
        self._key_of = sqfs.key_of

    def __call__(self, data):
        self.inputs.append(hashlib.sha256(data).digest())
        return self._key_of(data)


def _write(img, out, where=None):
    reuse = sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, 1 << 16)) if where else None
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = sqfs.write(PassRunner([]).transform(Flattener(img, single_pass=True).entries()), fd,
                       compression="zstd", level=3, block_size=1 << 16, reuse=reuse)
    finally:
        os.close(fd)
        if reuse:
            reuse.close()
    if reuse:
        reuse.save(out, 0, w)
    return w


def test_reuse_by_provenance_hashes_only_what_changed(tmp_path, monkeypatch):
    """An image of the same layers again (another profile, another target) takes every content
    hash from the first image's index: none of the unchanged content is hashed (only the reused
    compressed blocks are, to check them), a layer rebuilt with other bytes is hashed, and each
    image is byte for byte the one written without reuse."""
    where = tmp_path / "reuse"
    v1 = image_from_built(_image()[0])
    v2_built = _image(top=b"top layer v2, rebuilt\n")[0]      # the same lower layer, another top one
    v2 = image_from_built(v2_built)
    _write(v1, tmp_path / "first.sqfs", where)
    _write(v2, tmp_path / "fresh.sqfs")
    counting = _CountingSha()
    monkeypatch.setattr(sqfs, "key_of", counting)
    w = _write(v2, tmp_path / "second.sqfs", where)
    monkeypatch.undo()
    assert (tmp_path / "second.sqfs").read_bytes() == (tmp_path / "fresh.sqfs").read_bytes()
    assert w.blocks_reused > BIG // (1 << 16)
    big = _big()
    # the lower layer's blocks (but the first, which the top layer's copy begins with): not hashed
    lower_blocks = {hashlib.sha256(big[i:i + (1 << 16)]).digest() for i in range(1 << 16, BIG, 1 << 16)}
    assert len(lower_blocks) > 40 and not lower_blocks & set(counting.inputs)
    # small files (hashed in batches for the fragments): the lower layer's not, the new top one's yes
    assert hashlib.sha256(b"small file\n" * 30).digest() not in counting.inputs
    assert hashlib.sha256(b"top layer v2, rebuilt\n").digest() in counting.inputs
    # the top layer's copy of 70000 bytes of it is another span: hashed (and then found by its hash)
    assert hashlib.sha256(big[:1 << 16]).digest() in counting.inputs
    # a third image of v2: nothing of the content is hashed any more
    _write(image_from_built(v2_built), tmp_path / "third.sqfs", where)     # records v2's spans
    counting = _CountingSha()
    monkeypatch.setattr(sqfs, "key_of", counting)
    _write(image_from_built(v2_built), tmp_path / "fourth.sqfs", where)
    monkeypatch.undo()
    assert (tmp_path / "fourth.sqfs").read_bytes() == (tmp_path / "fresh.sqfs").read_bytes()
    assert hashlib.sha256(big[:1 << 16]).digest() not in counting.inputs


def test_an_index_of_the_older_format_is_dropped(tmp_path):
    where = tmp_path / "reuse"
    d = where / sqfs.settings_name("zstd", 3, 1 << 16)
    d.mkdir(parents=True)
    img = tmp_path / "old.sqfs"
    img.write_bytes(b"x" * 4096)
    st = img.stat()
    old = d / ("a" * 32 + ".idx")
    old.write_bytes(b'hpcconv block-reuse 1\n{"path": "%s", "base": 0, "stat": [%d, %d, %d, %d]}\n'
                    % (str(img).encode(), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) + bytes(76))
    r = sqfs.BlockReuse(where, sqfs.settings_name("zstd", 3, 1 << 16))
    assert r.images == 0 and not r.blocks and not r.known and not old.exists()


def test_two_passes_give_provenance_only_where_the_emit_pass_verifies(tmp_path):
    """The two-pass flatten's emit pass reads a layer to its end and checks its digest only when the
    index pass took the layer's index from the cache (else the index pass verified it and the emit
    pass stops early, unverified): only those reads name their bytes' place in the layer."""
    built = _image()[0]
    decoded = {bytes.fromhex(d.split(":")[1]): _decoded(b) for d, b in built.blobs.items()
               if b[:2] == b"\x1f\x8b"}
    cache = tmp_path / "index-cache"

    def files(flat):
        out = {}
        for e in flat.entries():
            if e.type == FILE and e.size:
                p = e.reader.provenance()
                data = e.reader.read()
                if p is not None:
                    assert decoded[p[0]][p[1]:p[1] + e.size] == data
                out[e.path] = p
        return out
    first = files(Flattener(image_from_built(built), index_cache=cache))      # indexes the layers
    assert set(first.values()) == {None}
    again = files(Flattener(image_from_built(built), index_cache=cache))      # from the cache: verified
    assert set(again) == set(first) and None not in again.values()


def test_only_the_spans_of_the_layers_at_hand_are_loaded(tmp_path):
    """An index keeps its spans by layer blob: a conversion loads those of its own layers only (an
    index holds one span per file of its image), and a damaged span list costs the spans, not the
    blocks."""
    where = tmp_path / "reuse"
    built = _image()[0]
    _write(image_from_built(built), tmp_path / "first.sqfs", where)
    settings = sqfs.settings_name("zstd", 3, 1 << 16)
    digests = [d.digest for d in image_from_built(built).manifest.layers]
    every = sqfs.BlockReuse(where, settings)
    lower = sqfs.BlockReuse(where, settings, blobs=[digests[0]])
    none = sqfs.BlockReuse(where, settings, blobs=["sha256:" + "0" * 64])
    assert {k[:32] for k in every.known} == {bytes.fromhex(d.split(":")[1]) for d in digests}
    assert {k[:32] for k in lower.known} == {bytes.fromhex(digests[0].split(":")[1])}
    assert len(lower.known) < len(every.known) and not none.known
    assert {k: v[1:] for k, v in lower.blocks.items()} == {k: v[1:] for k, v in every.blocks.items()} != {}
    for r in (every, lower, none):
        r.close()
    idx = next((where / settings).glob("*.idx"))
    data = idx.read_bytes()
    head_end = data.index(b"\n", len(b"hpcconv block-reuse 2\n"))
    head = json.loads(data[len(b"hpcconv block-reuse 2\n"):head_end])
    head["spans"][0][1] += 10 ** 6                           # more records than the file holds
    idx.write_bytes(data[:len(b"hpcconv block-reuse 2\n")] + json.dumps(head).encode() + data[head_end:])
    os.chmod(idx, 0o644)
    damaged = sqfs.BlockReuse(where, settings)
    assert damaged.images == 1 and damaged.blocks and not damaged.known
    damaged.close()
