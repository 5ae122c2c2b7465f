"""How far a layer's decoder runs ahead of the reader (flatten.READ_AHEAD, flatten._Prefetch): two
chunks by default; further while the SquashFS writer takes that layer's blocks from an earlier
image (SquashWriter.read_ahead), never when that image turns out changed or the writer compresses
more than it reuses, so memory stays bounded as on a cold conversion.

Oracles: the chunks a producer made, counted and compared here; the images written without reuse
(warm images stay byte for byte the same); an earlier image damaged on disk here."""

from __future__ import annotations

import os
import time

import pytest

from flattools import image_from_built
from hpcconv import flatten
from hpcconv.emit import sqfs
from test_provenance import _image, _write

CH = 1000


def _settled(q, timeout: float = 5.0) -> int:
    """The queue's size once the producer stopped adding to it."""
    end = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < end:
        n = q.qsize()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return n
        time.sleep(0.01)
    raise AssertionError("the producer never settled")


@pytest.mark.parametrize("ahead", [None, 6], ids=["default", "deeper"])
def test_the_decoder_runs_as_far_ahead_as_it_is_let(ahead):
    chunks = [bytes([i]) * CH for i in range(40)]
    level = [ahead]
    pf = flatten._Prefetch(iter(chunks), ahead=(lambda: level[0]) if ahead else None)
    try:
        assert _settled(pf._q) == (ahead or flatten.PREFETCH_DEPTH)
        got = [pf.read(CH)]
        assert _settled(pf._q) == (ahead or flatten.PREFETCH_DEPTH)   # refilled to the same depth
        level[0] = None                                 # back to the default: drains to two, no more
        while len(got) < 10:
            got.append(pf.read(CH))
        assert _settled(pf._q) == flatten.PREFETCH_DEPTH
        while True:
            b = pf.read(CH)
            if not b:
                break
            got.append(b)
        assert got == chunks                            # every chunk, in order, whatever the depth
    finally:
        pf.close()


def test_a_deep_decoder_stops_when_closed():
    """A reader closed early (an error downstream) stops the thread even while it may run deep."""
    made = []

    def endless():
        while True:
            made.append(1)
            yield b"x" * CH
    pf = flatten._Prefetch(endless(), ahead=lambda: flatten.AHEAD_MAX)
    assert _settled(pf._q) == flatten.AHEAD_MAX
    pf.close()
    assert not pf._t.is_alive()
    assert len(made) <= flatten.AHEAD_MAX + 2


def _aheads(monkeypatch) -> dict[str, object]:
    """What each layer's decoder is allowed, asked when the layer is opened, by layer digest."""
    seen: dict[str, object] = {}
    real = flatten._ahead_of

    def spy(digest):
        ahead = real(digest)
        seen[digest] = ahead() if ahead is not None else "unset"
        return ahead
    monkeypatch.setattr(flatten, "_ahead_of", spy)
    return seen


def test_the_layers_an_earlier_image_was_made_of_are_decoded_further_ahead(tmp_path, monkeypatch):
    where = tmp_path / "reuse"
    v1 = _image()[0]
    v2 = _image(top=b"top layer v2, rebuilt\n")[0]      # the same lower layer, another top one
    lower, top1 = [d.digest for d in image_from_built(v1).manifest.layers]
    top2 = image_from_built(v2).manifest.layers[1].digest
    seen = _aheads(monkeypatch)
    _write(image_from_built(v1), tmp_path / "fresh.sqfs")               # no reuse at all
    assert seen == {lower: None, top1: None}
    seen.clear()
    _write(image_from_built(v1), tmp_path / "first.sqfs", where)        # nothing recorded yet
    assert seen == {lower: None, top1: None}
    seen.clear()
    w = _write(image_from_built(v2), tmp_path / "second.sqfs", where)
    assert seen == {lower: sqfs.READ_AHEAD_DEEP, top2: None}
    assert w.blocks_reused and not w.reuse.missed
    # outside the writer nothing is set: the decoder keeps to the default
    assert flatten.READ_AHEAD.get() is None
    assert (tmp_path / "first.sqfs").read_bytes() == (tmp_path / "fresh.sqfs").read_bytes()


def test_not_deeper_once_the_earlier_image_fails_or_the_writer_compresses_more(tmp_path, monkeypatch):
    where = tmp_path / "reuse"
    built = _image()[0]
    lower = image_from_built(built).manifest.layers[0].digest
    _write(image_from_built(built), tmp_path / "first.sqfs", where)
    _write(image_from_built(built), tmp_path / "fresh.sqfs")
    # the writer's own bookkeeping decides while the layers are read: compressed against reused
    w = _write(image_from_built(built), tmp_path / "second.sqfs", where)
    assert w.read_ahead(lower) == sqfs.READ_AHEAD_DEEP
    made, taken = w.data_blocks
    assert taken > 0 and made <= taken
    w.data_blocks = [taken + sqfs.DEEP_SLACK + 1, taken]
    assert w.read_ahead(lower) is None
    # the earlier image changed in place (same size, inode and time): a block fails to read back
    first = tmp_path / "first.sqfs"
    st = first.stat()
    with open(first, "r+b") as f:
        f.seek(200)
        b = f.read(64)
        f.seek(200)
        f.write(bytes(x ^ 0xFF for x in b))
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "second.sqfs").unlink()                   # (its index would serve the blocks)
    w = _write(image_from_built(built), tmp_path / "third.sqfs", where)
    assert w.reuse.missed and w.read_ahead(lower) is None
    assert 0 < w.blocks_reused < w.blocks_written
    assert (tmp_path / "third.sqfs").read_bytes() == (tmp_path / "fresh.sqfs").read_bytes()
