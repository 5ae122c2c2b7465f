"""OCI models: digests, platforms (containerd's matching rules), manifests and indexes."""

import hashlib
import io
import json

import pytest

from hpcconv.errors import CorruptInput, SourceError, UsageError
from hpcconv.image import (Descriptor, Index, Manifest, OffloadedHash, Platform, VerifyingReader, check_digest,
                           manifest_kind)

HEX = "a" * 64


def test_check_digest_accepts_sha256_and_sha512():
    assert check_digest("sha256:" + HEX) == ("sha256", HEX)
    assert check_digest("sha512:" + "b" * 128)[0] == "sha512"


@pytest.mark.parametrize("bad", ["sha256:" + "A" * 64, "sha256:abc", "sha256" + HEX, "", "sha256:" + HEX + "\n",
                                 "../../etc/passwd", "sha256:../" + HEX[3:]])
def test_check_digest_rejects_malformed(bad):
    with pytest.raises(CorruptInput, match="malformed digest"):
        check_digest(bad)


def test_unsupported_algorithm_is_named():
    with pytest.raises(CorruptInput, match="unsupported digest algorithm 'blake3'"):
        check_digest("blake3:" + HEX)


@pytest.mark.parametrize("text,expect", [
    ("linux/arm64", Platform("linux", "arm64", "")),
    ("linux/arm64/v8", Platform("linux", "arm64", "")),
    ("aarch64", Platform("linux", "arm64", "")),
    ("linux/aarch64", Platform("linux", "arm64", "")),
    ("x86_64", Platform("linux", "amd64", "")),
    ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
    ("linux/arm", Platform("linux", "arm", "v7")),
    ("linux/arm/6", Platform("linux", "arm", "v6")),
])
def test_platform_normalisation(text, expect):
    assert Platform.parse(text) == expect


def test_platform_parse_errors():
    with pytest.raises(UsageError):
        Platform.parse("linux//arm64")


def _index(entries):
    return Index.parse(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                   "manifests": entries}).encode())


def _entry(arch, variant=None, os_="linux", digest_char="1", annotations=None,
           mt="application/vnd.oci.image.manifest.v1+json"):
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    e = {"mediaType": mt, "digest": "sha256:" + digest_char * 64, "size": 10, "platform": p}
    if annotations:
        e["annotations"] = annotations
    return e


def test_index_select_arm64_variants_and_attestations():
    idx = _index([
        _entry("unknown", os_="unknown", digest_char="0",
               annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        _entry("amd64", digest_char="1"),
        _entry("arm64", "v8", digest_char="2"),
    ])
    for want in ("linux/arm64", "linux/arm64/v8", "aarch64"):
        assert idx.select(Platform.parse(want)).digest == "sha256:" + "2" * 64
    assert idx.select(Platform.parse("linux/amd64")).digest == "sha256:" + "1" * 64
    assert [str(p) for p in idx.platforms()] == ["linux/amd64", "linux/arm64"]
    with pytest.raises(SourceError, match=r"no image for platform linux/ppc64le .*available: linux/amd64, linux/arm64"):
        idx.select(Platform.parse("linux/ppc64le"))


def test_index_arm_falls_back_to_lower_variant():
    idx = _index([_entry("arm", "v6", digest_char="6")])
    assert idx.select(Platform.parse("linux/arm/v7")).digest == "sha256:" + "6" * 64


def test_schema1_is_refused_with_hint():
    with pytest.raises(SourceError) as e:
        manifest_kind({"schemaVersion": 1, "fsLayers": []},
                      "application/vnd.docker.distribution.manifest.v1+prettyjws")
    assert "schema 1" in e.value.message and "re-push" in e.value.hint


def test_manifest_with_empty_layers_is_an_empty_image_but_no_list_is_corrupt():
    # Docker loads an image whose layers list is empty (FROM scratch with only metadata): so do we
    # (flatten warns; tests/test_hardening_hostile.py compares the result with docker export)
    obj = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "x", "digest": "sha256:" + HEX, "size": 2}, "layers": []}
    assert Manifest.parse(json.dumps(obj).encode()).layers == []
    del obj["layers"]
    with pytest.raises(CorruptInput, match="no layers list"):
        Manifest.parse(json.dumps(obj).encode())


def test_descriptor_rejects_negative_size():
    with pytest.raises(CorruptInput, match="invalid size"):
        Descriptor.from_json({"digest": "sha256:" + HEX, "size": -1})


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offloaded"])
def test_verifying_reader_checks_digest_and_size(offload):
    data = b"hello" * 1000
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    r = VerifyingReader(io.BytesIO(data), good, len(data), offload=offload)
    while r.read(333):
        pass
    assert r.verified
    with pytest.raises(CorruptInput, match="does not match"):
        r = VerifyingReader(io.BytesIO(data[:-1] + b"X"), good, len(data), offload=offload)
        while r.read(4096):
            pass
    with pytest.raises(CorruptInput, match="truncated"):
        r = VerifyingReader(io.BytesIO(data[:-1]), good, len(data), offload=offload)
        while r.read(4096):
            pass
    with pytest.raises(CorruptInput, match="larger"):
        VerifyingReader(io.BytesIO(data + b"x"), good, len(data), offload=offload).read()


def test_offloaded_hashes_keep_each_ones_order_across_threads():
    """Several hashers fed from several threads share the one hash thread: each digest is that of
    its own pieces in its own order (the oracle: hashlib over the joined pieces); a piece that is a
    reused buffer is taken as it was when handed over; an error in an update comes out of the
    digest call."""
    import random
    import threading

    rnd = random.Random(5)
    jobs = [[rnd.randbytes(rnd.randrange(1, 300_000)) for _ in range(40)] for _ in range(6)]
    got = [None] * len(jobs)

    def feed(i):
        h = OffloadedHash(hashlib.sha256())
        buf = bytearray()
        for piece in jobs[i]:
            buf[:] = piece
            h.update(memoryview(buf))          # the same buffer, rewritten after every update
        got[i] = h.hexdigest()
    threads = [threading.Thread(target=feed, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [hashlib.sha256(b"".join(j)).hexdigest() for j in jobs]

    class Broken:
        def update(self, data):
            raise MemoryError("no room")
    h = OffloadedHash(Broken())
    h.update(b"x")
    with pytest.raises(MemoryError):
        h.hexdigest()
    ok = OffloadedHash(hashlib.sha256())               # the thread goes on for the others
    ok.update(b"abc")
    assert ok.hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_the_hash_thread_runs_at_the_lowest_priority():
    """The layer hashes wait for nothing but a layer's end: their thread yields the vCPUs to the
    conversion's other threads (nice 19, as the kernel reports it in /proc for that thread alone)."""
    import os
    import threading

    h = OffloadedHash(hashlib.sha256())
    h.update(b"abc")
    assert h.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    [t] = [t for t in threading.enumerate() if t.name == "hpcconv-hash"]
    stat = open(f"/proc/self/task/{t.native_id}/stat").read()
    assert int(stat.rsplit(")", 1)[1].split()[16]) == 19          # field 19: nice
    me = open(f"/proc/self/task/{threading.get_native_id()}/stat").read()
    assert int(me.rsplit(")", 1)[1].split()[16]) == os.getpriority(os.PRIO_PROCESS, 0) != 19
