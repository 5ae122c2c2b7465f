"""The per-layer header index cache: a second flatten of the same layers skips the index pass,
gives the same stream, and still verifies every blob it re-reads for content."""

from __future__ import annotations

import json

import pytest

from flattools import image_from_built, tree_of_entries
from hpcconv.errors import CorruptInput
from hpcconv.flatten import Flattener
from ocitools import T, build_image, make_tar


def _layers():
    return [
        make_tar([T("etc", "dir"), T("etc/a", data=b"a" * 3000), T("etc/b", data=b"bb"),
                  T("usr", "dir"), T("usr/lib", "dir"), T("lib", "sym", link="usr/lib"),
                  T("usr/lib/x.so", data=b"\x7fELF" + bytes(500)), T("usr/share/doc/d", data=b"doc")]),
        make_tar([T("etc/.wh.b"), T("usr/share/doc/.wh..wh..opq"), T("lib/y.so", data=b"y" * 700),
                  T("etc/h", "hard", link="etc/a"), T("big", data=bytes(range(256)) * 5000)]),
    ]


def _flatten(img, cache):
    f = Flattener(img, index_cache=cache)
    tree = tree_of_entries(f.entries())
    return tree, f


def test_second_flatten_uses_the_cache_and_gives_the_same_tree(tmp_path):
    img = image_from_built(build_image(_layers()))
    first, f1 = _flatten(img, tmp_path)
    assert f1.stats["layers_cached"] == 0
    assert len(list(tmp_path.rglob("*.json"))) == 2
    again, f2 = _flatten(img, tmp_path)
    assert f2.stats["layers_cached"] == 2
    assert again == first
    assert f2.stats["members"] == f1.stats["members"]
    no_cache, _ = _flatten(img, None)
    assert no_cache == first


def test_damaged_cache_is_ignored(tmp_path):
    img = image_from_built(build_image(_layers()))
    first, _ = _flatten(img, tmp_path)
    for p in tmp_path.rglob("*.json"):
        p.write_text("{not json")
    again, f = _flatten(img, tmp_path)
    assert f.stats["layers_cached"] == 0 and again == first


def test_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCCONV_INDEX_CACHE", "0")
    img = image_from_built(build_image(_layers()))
    _flatten(img, tmp_path)
    assert not list(tmp_path.rglob("*.json"))


def test_cache_written_by_someone_else_is_not_trusted(tmp_path):
    """In a store shared by many users anyone may write index-cache/: a cached index decides names,
    modes and links, so only the user's own, not group/other-writable, files are used. A poisoned
    entry (setuid bit, extra name) from another owner is ignored and the blob indexed instead."""
    import os

    img = image_from_built(build_image(_layers()))
    first, _ = _flatten(img, tmp_path)
    files = sorted(tmp_path.rglob("*.json"))
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files)
    doc = json.loads(files[0].read_text())
    for row in doc["members"]:
        if row[1] == "0":
            row[2] = 0o4777                     # poison: setuid, world-writable
    files[0].write_text(json.dumps(doc))
    os.chown(files[0], 4242, 4242)              # as if another user wrote it (tests run as root)
    again, f = _flatten(img, tmp_path)
    assert again == first and f.stats["layers_cached"] == 1
    os.chown(files[0], os.getuid(), os.getgid())
    os.chmod(files[0], 0o664)                   # group-writable: not trusted either
    again, f = _flatten(img, tmp_path)
    assert again == first and f.stats["layers_cached"] == 1
    tmp_sym = files[0].with_name("link.json")
    files[0].rename(tmp_sym)
    files[0].symlink_to(tmp_sym)                # a symlink is not followed
    again, f = _flatten(img, tmp_path)
    assert again == first and f.stats["layers_cached"] == 1


def _plain_layers():
    """Layers the single pass takes without falling back to two passes."""
    return [
        make_tar([T("etc", "dir"), T("etc/a", data=b"a" * 3000), T("etc/b", data=b"bb"),
                  T("usr", "dir"), T("usr/lib", "dir"), T("usr/lib/x.so", data=b"\x7fELF" + bytes(500))]),
        make_tar([T("etc/.wh.b"), T("etc/c", data=b"c"), T("etc/h", "hard", link="etc/c"),
                  T("big", data=bytes(range(256)) * 5000)]),
    ]


def _single(img, cache):
    f = Flattener(img, index_cache=cache, single_pass=True)
    return tree_of_entries(f.entries()), f


def _counting_hashers(monkeypatch) -> list[str]:
    from hpcconv import flatten

    calls: list[str] = []
    real = flatten.hasher_for
    monkeypatch.setattr(flatten, "hasher_for", lambda d: calls.append(d) or real(d))
    return calls


def test_a_verified_diff_id_is_recorded_and_a_later_read_of_the_blob_skips_that_hash(tmp_path, monkeypatch):
    import hashlib

    built = build_image(_plain_layers())
    img = image_from_built(built)
    first, f1 = _single(img, tmp_path)
    assert f1.stats["diff_ids_recorded"] == 0
    # the records: each layer's blob digest and diff_id, computed here from the blobs themselves
    import gzip

    want = set()
    for d in (l["digest"] for l in json.loads(built.manifest)["layers"]):
        blob = built.blobs[d]
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == d
        want.add(f"{d} sha256:{hashlib.sha256(raw).hexdigest()}")
    assert {p.read_text().strip() for p in tmp_path.rglob("*.diff_id")} == want
    calls = _counting_hashers(monkeypatch)
    again, f2 = _single(img, tmp_path)
    assert again == first and f2.stats["diff_ids_recorded"] == 2 and calls == []
    (layer_check,) = [c for c in f2.checks.items if c.name == "layer digests"]
    assert "diff_ids verified (2 layer read(s) matched by blob digest" in layer_check.detail


def test_a_recorded_diff_id_does_not_excuse_a_config_that_names_another(tmp_path):
    built = build_image(_plain_layers())
    _single(image_from_built(built), tmp_path)
    cfg = json.loads(built.config)
    cfg["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    built.config = json.dumps(cfg).encode()
    with pytest.raises(CorruptInput, match="does not match diff_id sha256:000"):
        _single(image_from_built(built), tmp_path)


@pytest.mark.parametrize("layers, flatten", [(_layers, _flatten), (_plain_layers, _single)],
                         ids=["index cache, two passes", "diff_id record, single pass"])
def test_a_cached_or_recorded_layer_blob_is_still_verified_when_reread(tmp_path, layers, flatten):
    built = build_image(layers())
    flatten(image_from_built(built), tmp_path)
    d = json.loads(built.manifest)["layers"][1]["digest"]
    blob = bytearray(built.blobs[d])
    blob[-9] ^= 0xFF                      # decompresses fine, digest differs
    built.blobs[d] = bytes(blob)
    with pytest.raises(CorruptInput, match="does not match"):
        flatten(image_from_built(built), tmp_path)


def test_diff_id_records_of_someone_else_are_not_trusted(tmp_path, monkeypatch):
    import os

    img = image_from_built(build_image(_plain_layers()))
    _single(img, tmp_path)
    recs = sorted(tmp_path.rglob("*.diff_id"))
    assert recs and all(p.stat().st_mode & 0o777 == 0o644 for p in recs)
    os.chown(recs[0], 4242, 4242)
    os.chmod(recs[1], 0o666)
    calls = _counting_hashers(monkeypatch)
    _, f = _single(img, tmp_path)
    assert f.stats["diff_ids_recorded"] == 0 and len(calls) == 2
