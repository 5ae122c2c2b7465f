"""The content-addressed store: only verified blobs land, partial downloads resume, processes share it."""

import hashlib
import io
import multiprocessing
import os

import pytest

from hpcconv.errors import CorruptInput
from hpcconv.image import Descriptor
from hpcconv.store import Store


def _d(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_put_stream_verifies_and_publishes(tmp_path):
    s = Store.open(tmp_path / "s")
    data = os.urandom(3 << 20)
    p = s.put_stream(io.BytesIO(data), _d(data), len(data))
    assert p == tmp_path / "s" / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(p.read_bytes()).hexdigest() == _d(data).split(":")[1]
    assert (tmp_path / "s" / "oci-layout").exists()


def test_mismatch_leaves_no_trace(tmp_path):
    s = Store.open(tmp_path / "s")
    data = b"x" * 1000
    with pytest.raises(CorruptInput, match="does not match"):
        s.put_stream(io.BytesIO(data + b"!"), _d(data + b"?"), len(data) + 1)
    assert not list((tmp_path / "s" / "blobs").rglob("*")) or not any(
        p.is_file() for p in (tmp_path / "s" / "blobs").rglob("*"))
    assert not list((tmp_path / "s" / "tmp").glob("*.partial"))


def test_wrong_size_is_rejected(tmp_path):
    s = Store.open(tmp_path / "s")
    data = b"y" * 100
    with pytest.raises(CorruptInput, match="larger than its declared size"):
        s.put_stream(io.BytesIO(data), _d(data), 50)
    with pytest.raises(CorruptInput, match="expected 200"):
        s.put_stream(io.BytesIO(data), _d(data), 200)
    assert not s.has(_d(data))


def test_partial_download_resumes(tmp_path):
    s = Store.open(tmp_path / "s")
    data = os.urandom(100_000)
    d = _d(data)
    with s.writer(d, len(data)) as w:
        w.write(data[:40_000])
        # interrupted here: no commit
    with s.writer(d, len(data)) as w:
        assert w.offset == 40_000          # what a Range request resumes from
        w.write(data[40_000:])
        w.commit()
    assert s.blob_path(d).read_bytes() == data


def test_corrupt_partial_is_discarded_at_commit(tmp_path):
    s = Store.open(tmp_path / "s")
    data = os.urandom(10_000)
    d = _d(data)
    with s.writer(d, len(data)) as w:
        w.write(b"\0" * 4000)
    with pytest.raises(CorruptInput):
        with s.writer(d, len(data)) as w:
            w.write(data[4000:])
            w.commit()
    assert not s.has(d) and not list((tmp_path / "s" / "tmp").glob("*.partial"))


def _put(args):
    root, data = args
    Store.open(root).put_stream(io.BytesIO(data), _d(data), len(data))
    return True


def test_concurrent_writers_share_one_store(tmp_path):
    data = [os.urandom(200_000) for _ in range(4)]
    work = [(str(tmp_path / "s"), data[i % 4]) for i in range(16)]
    with multiprocessing.get_context("fork").Pool(8) as pool:
        assert all(pool.map(_put, work))
    s = Store.open(tmp_path / "s")
    for blob in data:
        assert s.blob_path(_d(blob)).read_bytes() == blob


def test_tags_replace_and_resolve(tmp_path):
    s = Store.open(tmp_path / "s")
    d1 = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "1" * 64, 10)
    d2 = Descriptor("application/vnd.oci.image.manifest.v1+json", "sha256:" + "2" * 64, 11)
    s.tag("example.org/a:1", d1)
    s.tag("example.org/a:1", d2)
    s.tag("example.org/b:1", d1)
    assert s.resolve("example.org/a:1").digest == d2.digest
    assert set(s.refs()) == {"example.org/a:1", "example.org/b:1"}


class _Finished:
    """Stands in for sources.registry.Downloads, whose only part a follower asks here is whether
    the download is over (it is: the test drives the BlobWriter itself)."""

    def wait(self, digest):
        pass

    def poll(self, digest, timeout):
        return True


@pytest.mark.parametrize("case", ["whole", "restarted", "short", "not-committed"])
def test_a_follower_is_vouched_for_only_by_its_own_unchanged_writer(tmp_path, case):
    """A reader following a blob this process downloads (sources/registry._Following) takes the
    download's check for its own only when it read every byte from that writer's file and the
    writer never started over (BlobWriter.generation) and published the blob."""
    from hpcconv.sources.registry import _Following

    store = Store.open(tmp_path / "s")
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert _Following(_Finished(), store, digest, len(data)).vouchable is False    # nobody writing it
    with store.writer(digest, len(data)) as w:
        assert store.writing(digest) is w
        w.write(data[:100_000])
        f = _Following(_Finished(), store, digest, len(data))
        assert f.vouchable and not f.changed()
        got = f.read(100_000)
        if case == "restarted":
            w.restart()
            assert f.changed()
        w.write(data[100_000:] if case != "restarted" else data)
        w._f.flush()
        if case != "short":
            got += f.read()
        if case != "not-committed":
            w.commit()
    assert store.writing(digest) is None
    assert got == (data if case not in ("short",) else data[:100_000])
    assert f.vouch() == (case == "whole")
    f.close()
