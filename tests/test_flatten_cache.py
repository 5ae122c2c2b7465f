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


def test_cached_layer_blob_is_still_verified_when_reread(tmp_path):
    built = build_image(_layers())
    _flatten(image_from_built(built), tmp_path)
    d = json.loads(built.manifest)["layers"][1]["digest"]
    blob = bytearray(built.blobs[d])
    blob[-9] ^= 0xFF                      # decompresses fine, digest differs
    built.blobs[d] = bytes(blob)
    with pytest.raises(CorruptInput) as ei:
        _flatten(image_from_built(built), tmp_path)
    assert "does not match" in str(ei.value)


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
