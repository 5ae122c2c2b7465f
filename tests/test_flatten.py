"""Flattener unit tests without the Docker engine: hostile and corrupt input, cases Docker refuses
(where we follow the layer spec), the entry-stream contract and the streaming properties."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from flattools import flatten_tree, image_from_built
from hpcconv.entries import FILE
from hpcconv.errors import CorruptInput, UnsafeInput
from hpcconv.flatten import Flattener
from ocitools import T, build_image, make_tar, sha256


def flat(layers, **kw):
    img = build_image([l if isinstance(l, bytes) else make_tar(l) for l in layers], **kw)
    return flatten_tree(image_from_built(img))


def h(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


# -- hostile input -----------------------------------------------------------------------------------
def test_dotdot_escaping_root_is_unsafe():
    # Docker clamps `../../evil` to `/evil` (its applier is chrooted); we refuse it, naming layer and entry
    with pytest.raises(UnsafeInput) as ei:
        flat([[T("ok", data=b"1")], [T("a/../../evil", data=b"x")]])
    msg = str(ei.value)
    assert "layer 2/2 (sha256:" in msg and "'a/../../evil'" in msg and "\n" not in msg
    assert ei.value.exit_code == 4


def test_dotdot_inside_root_is_cleaned():
    tree, _ = flat([[T("a/b/../c", data=b"c")]])
    assert set(tree) == {"a", "a/c"}


def test_hardlink_outside_root_is_unsafe():
    with pytest.raises(UnsafeInput, match=r"layer 1/1 .*entry 'h'"):
        flat([[T("a", data=b"A"), T("h", "hard", link="../../etc/shadow")]])


def test_absolute_names_and_link_targets_are_made_relative():
    tree, _ = flat([[T("/abs/f", data=b"f"), T("/abs/h", "hard", link="/abs/f")]])
    assert tree["abs/h"].group == {"abs/f", "abs/h"}


def test_symlinked_parent_cannot_escape_root():
    # layer 1 plants esc -> ../../../../tmp; layer 2 writes through it: resolved inside the root
    tree, _ = flat([[T("tmp", "dir"), T("esc", "sym", link="../../../../tmp"), T("abs", "sym", link="/../tmp/")],
                    [T("esc/x", data=b"x"), T("abs/y", data=b"y")]])
    assert tree["tmp/x"].sha == h(b"x") and tree["tmp/y"].sha == h(b"y")
    assert tree["esc"].type == tree["abs"].type == "symlink"


def test_symlink_loop_in_parent_becomes_a_directory():
    tree, f = flat([[T("a", "sym", link="b"), T("b", "sym", link="a")], [T("a/x", data=b"x")]])
    assert tree["a"].type == "dir" and tree["a/x"].sha == h(b"x") and tree["b"].type == "symlink"
    assert "symlink not leading to a directory" in f.warnings[0]


def test_hardlink_to_directory_is_corrupt():
    with pytest.raises(CorruptInput, match="directory"):
        flat([[T("d", "dir"), T("h", "hard", link="d")]])


# -- corrupt input -----------------------------------------------------------------------------------
def test_corrupted_blob_digest_mismatch():
    img = build_image([make_tar([T("a", data=b"a" * 1000)])])
    d = json.loads(img.manifest)["layers"][0]["digest"]
    blob = bytearray(img.blobs[d])
    blob[-9] ^= 0xFF                   # gzip CRC/ISIZE trailer area: decompresses, digest differs
    img.blobs[d] = bytes(blob)
    with pytest.raises(CorruptInput) as ei:
        flat_img(img)
    assert str(ei.value).startswith("layer 1/1 (sha256:") and "does not match" in str(ei.value)


def test_truncated_blob():
    img = build_image([make_tar([T("a", data=bytes(range(256)) * 400)])])
    d = json.loads(img.manifest)["layers"][0]["digest"]
    img.blobs[d] = img.blobs[d][: len(img.blobs[d]) // 2]
    with pytest.raises(CorruptInput):
        flat_img(img)


def test_diff_id_mismatch():
    img = build_image([make_tar([T("a", data=b"a")]), make_tar([T("b", data=b"b")])])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"][1] = sha256(b"something else")
    img.config = json.dumps(cfg).encode()
    with pytest.raises(CorruptInput, match=r"layer 2/2 .*diff_id"):
        flat_img(img)


def test_diff_id_count_mismatch():
    img = build_image([make_tar([T("a", data=b"a")])])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"].append(sha256(b"x"))
    img.config = json.dumps(cfg).encode()
    with pytest.raises(CorruptInput, match="diff_ids"):
        flat_img(img)


def test_garbage_layer_is_corrupt():
    img = build_image([make_tar([T("a", data=b"a")])], compression="none")
    d = json.loads(img.manifest)["layers"][0]["digest"]
    img.blobs[d] = b"\x1f\x8b" + b"not gzip at all" * 10
    man = json.loads(img.manifest)
    man["layers"][0].update(digest=sha256(img.blobs[d]), size=len(img.blobs[d]))
    img.blobs[sha256(img.blobs[d])] = img.blobs[d]
    img.manifest = json.dumps(man).encode()
    with pytest.raises(CorruptInput, match="layer 1/1"):
        flat_img(img)


def test_decompression_bomb_cap():
    layer = make_tar([T("zeros", data=bytes(4 << 20))])
    img = build_image([layer])
    assert len(img.blobs[json.loads(img.manifest)["layers"][0]["digest"]]) < 100_000
    with pytest.raises(CorruptInput, match="decompression bomb"):
        Flattener(image_from_built(img), max_expanded=1 << 20).index()
    Flattener(image_from_built(img), max_expanded=8 << 20).index()


def flat_img(img, **kw):
    return flatten_tree(image_from_built(img), **kw)


# -- spec cases Docker (20.10, overlay2) refuses -----------------------------------------------------
def test_cross_layer_hardlink_follows_spec():
    # `docker load` fails: "link /a /b: no such file or directory" (overlay2 extracts each layer into
    # an empty diff dir). The spec allows cross-layer hardlinks; we share the lower inode.
    tree, _ = flat([[T("a", data=b"lower", uid=3)], [T("b", "hard", link="a", uid=9)], [T(".wh.a")]])
    assert "a" not in tree and tree["b"].sha == h(b"lower") and tree["b"].uid == 9


def test_cross_layer_hardlink_then_target_overwritten():
    tree, _ = flat([[T("a", data=b"old")], [T("b", "hard", link="a")], [T("a", data=b"new")]])
    assert tree["b"].sha == h(b"old") and tree["a"].sha == h(b"new")
    assert tree["a"].group == {"a"} and tree["b"].group == {"b"}


def test_whiteout_after_same_layer_entry_is_kept_with_warning():
    # Docker refuses the layer ("failed to mknod ... file exists"); the spec says whiteouts apply
    # to lower layers only, so the same-layer file stays and we warn.
    tree, f = flat([[T("x", data=b"lower")], [T("x", data=b"upper"), T(".wh.x")]])
    assert tree["x"].sha == h(b"upper")
    assert any(c.status == "warn" and c.name == "repairs" for c in f.checks.items)


def test_duplicate_entry_refused_unless_allowed(monkeypatch):
    # `docker load` refuses duplicates ("duplicates of file paths not supported"): so do we (issue 8);
    # HPCCONV_ALLOW_DUPLICATES=1 lets the last one win, with a warning
    with pytest.raises(CorruptInput, match=r"layer 1/1 .* entry 'a': 'a' appears twice"):
        flat([[T("a", data=b"1"), T("a", data=b"2")]])
    monkeypatch.setenv("HPCCONV_ALLOW_DUPLICATES", "1")
    tree, f = flat([[T("a", data=b"1"), T("a", data=b"2")]])
    assert tree["a"].sha == h(b"2") and "twice" in f.warnings[0]


def test_hardlink_missing_target_warns_and_makes_empty_file():
    tree, f = flat([[T("h", "hard", link="nowhere", mode=0o600)]])
    assert tree["h"].type == FILE and tree["h"].sha == h(b"") and tree["h"].mode == 0o600
    assert f.stats["warnings"] == 1 and "nowhere" in f.warnings[0]


def test_aufs_metadata_is_ignored():
    # Docker's overlay2 Unpack turns `.wh..wh.plnk` into a whiteout of `.wh.plnk` and keeps the
    # plnk directory's files; we drop AUFS metadata entirely and never read `.wh..wh.plnk` as a
    # whiteout of `plnk` (moby/go-archive #54, container-inspector #39).
    tree, f = flat([[T("plnk", data=b"p"), T("aufs", data=b"a")],
                    [T(".wh..wh.plnk", "dir"), T(".wh..wh.plnk/123", data=b"q"), T(".wh..wh.aufs")]])
    assert set(tree) == {"plnk", "aufs"}
    assert f.stats["whiteouts"] == 0


def test_whiteout_as_hardlink_still_whites_out():
    # cmssw/el9: a whiteout stored as a hardlink to another file (smolvm #401, cvmfs #4286)
    tree, _ = flat([[T("tmp/key", data=b"k"), T("tmp/CERN.repo", data=b"r")],
                    [T("tmp/.wh.key", "hard", link="tmp/CERN.repo")]])
    assert set(tree) == {"tmp", "tmp/CERN.repo"}


def test_no_whiteout_names_left_and_checks():
    tree, f = flat([[T("d/a", data=b"a"), T("d/b", data=b"b")], [T("d/.wh.a"), T("e/.wh..wh..opq")]])
    assert not any(p.rsplit("/", 1)[-1].startswith(".wh.") for p in tree)
    names = {c.name: c.status for c in f.checks.items}
    assert names["whiteouts"] == "pass" and names["layer digests"] == "pass" and names["entries"] == "pass"
    assert f.stats["whiteouts"] == 1 and f.stats["opaque"] == 1


def test_opaque_with_implied_subdir_hides_lower_content():
    # marker after a same-layer file in a subdir whose dir entry the layer omits
    tree, _ = flat([[T("d/sub/old", data=b"o"), T("d/top", data=b"t")],
                    [T("d/sub/new", data=b"n"), T("d/.wh..wh..opq")]])
    assert set(tree) == {"d", "d/sub", "d/sub/new"}


def test_user_xattrs_kept():
    # docker export drops user.* xattrs (moby 20.10 writes only security.capability), so this is
    # checked here rather than against Docker
    tree, _ = flat([[T("f", data=b"x", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.trusted.b": "\x00\udcff"}),
                     T("d", "dir", pax={"SCHILY.xattr.user.d": "dir"})]])
    assert tree["f"].xattrs == {"user.a": b"1", "trusted.b": b"\x00\xff"}
    assert tree["d"].xattrs == {"user.d": b"dir"}


def test_non_utf8_name_round_trips_bytes():
    import os

    tree, _ = flat([[T("caf\udce9", data=b"x")]])
    assert [os.fsencode(p) for p in tree] == [b"caf\xe9"]


def test_parent_that_is_a_file_becomes_a_directory():
    tree, f = flat([[T("p", data=b"file")], [T("p/child", data=b"c")]])
    assert tree["p"].type == "dir" and tree["p/child"].sha == h(b"c")
    assert f.stats["warnings"] == 1


# -- streaming properties ----------------------------------------------------------------------------
def _counting_opens(img):
    """The Image of a built image, and the list of layer indexes in the order they are opened."""
    opens = []

    def wrap(op, i):
        def counted():
            opens.append(i)
            return op()
        return counted

    return image_from_built(img, opener_wrap=wrap), opens


def test_layers_without_needed_content_are_not_reread():
    img = build_image([make_tar([T("a", data=b"a" * 100), T("b", data=b"b")]),
                       make_tar([T("a", data=b"A"), T("b", data=b"B")]),
                       make_tar([T("d", "dir"), T("empty", data=b""), T("s", "sym", link="a")])])
    image, opens = _counting_opens(img)
    f = Flattener(image)
    out = {e.path: (e.reader.read() if e.type == FILE else None) for e in f.entries()}
    assert out["a"] == b"A" and out["b"] == b"B" and out["empty"] == b""
    assert opens == [0, 1, 2, 1]
    assert f.stats["layers_reread"] == 1


def test_single_pass_reads_each_layer_once_top_first():
    img = build_image([make_tar([T("usr", "dir"), T("usr/a", data=b"a" * 100), T("usr/b", data=b"b"),
                                 T("etc", "dir", mode=0o700), T("etc/x", data=b"x")]),
                       make_tar([T("usr", "dir", mode=0o750), T("usr/a", data=b"A"), T(".wh.etc")]),
                       make_tar([T("usr", "dir"), T("usr/c", "sym", link="a")])])
    image, opens = _counting_opens(img)
    f = Flattener(image, single_pass=True)
    out = {e.path: (e.type, e.mode, e.reader.read() if e.type == FILE else e.linkname) for e in f.entries()}
    assert opens == [2, 1, 0] and f.stats["layers_reread"] == 0
    # what the two passes give (each read twice but layer 3, which holds no content)
    image2, opens2 = _counting_opens(img)
    two = {e.path: (e.type, e.mode, e.reader.read() if e.type == FILE else e.linkname)
           for e in Flattener(image2).entries()}
    assert opens2 == [0, 1, 2, 0, 1] and out == two
    assert out == {"usr": ("dir", 0o755, ""), "usr/a": ("file", 0o644, b"A"), "usr/b": ("file", 0o644, b"b"),
                   "usr/c": ("symlink", 0o777, "a")}


def test_single_pass_relinks_a_hardlink_whose_first_name_is_replaced_above():
    # layer 1: a and its hardlink b; layer 2 replaces a: b keeps the old content. The single pass
    # has skipped a's content when it meets b, so it reads layer 1 again for it, at the end.
    img = build_image([make_tar([T("d", "dir"), T("d/a", data=b"old", mode=0o640), T("d/b", "hard", link="d/a"),
                                 T("d/c", "hard", link="d/b")]),
                       make_tar([T("d", "dir"), T("d/a", data=b"new")])])
    image, opens = _counting_opens(img)
    f = Flattener(image, single_pass=True)
    seen, out = set(), {}
    for e in f.entries():
        assert e.type != "hardlink" or e.linkname in seen
        seen.add(e.path)
        out[e.path] = (e.type, e.reader.read() if e.type == FILE else e.linkname)
    assert out == {"d": ("dir", ""), "d/a": ("file", b"new"), "d/b": ("file", b"old"), "d/c": ("hardlink", "d/b")}
    assert opens == [1, 0, 0] and f.stats["layers_reread"] == 1


@pytest.mark.parametrize("layers,why", [
    ([[T("lib", "sym", link="usr/lib"), T("usr/lib", "dir")], [T("lib/x", data=b"x")]], "symlink"),
    ([[T("a", data=b"f")], [T("a/x", data=b"x")]], "is a file"),
    ([[T("a", data=b"f")], [T("b", "hard", link="a")]], "hardlink"),
    ([[T("a", data=b"f", uid=1), T("b", "hard", link="a", uid=2)]], "changes the attributes"),
    ([[T("s", "sym", link="d"), T("d", "dir"), T("s/x", data=b"x")]], "not a directory"),
    ([[T("d", "dir"), T("d/x", data=b"x"), T("d", data=b"f")]], None),      # duplicate: refused either way
])
def test_single_pass_gives_up_where_the_order_matters(layers, why):
    from hpcconv.flatten import TwoPassNeeded

    image = image_from_built(build_image([make_tar(l) for l in layers]))
    if why is None:
        with pytest.raises(CorruptInput, match="appears twice"):
            list(Flattener(image, single_pass=True).entries())
        return
    with pytest.raises(TwoPassNeeded, match=why):
        for e in Flattener(image, single_pass=True).entries():
            if e.type == FILE:
                e.reader.read()


@pytest.mark.parametrize("layers,present,absent", [
    # a higher layer deletes the symlink the middle layer wrote through: what it wrote stays
    ([[T("t", "dir"), T("s", "sym", link="t")], [T("s/x", data=b"x")], [T(".wh.s")]], ["t/x"], ["s"]),
    # a whiteout written through a symlink a higher layer deletes still deletes below it
    ([[T("t", "dir"), T("t/y", data=b"y"), T("s", "sym", link="t")], [T("s/.wh.y")], [T(".wh.s")]],
     ["t"], ["t/y", "s"]),
    # an opaque marker after an entry written through a lower symlink
    ([[T("t", "dir"), T("d", "dir"), T("d/x", "sym", link="../t")], [T("d/x/y", data=b"y"), T("d/.wh..wh..opq")]],
     ["t/y", "d"], ["d/x"]),
    # the leaf deleted above, its implied parents stay
    ([[T("z", data=b"z")], [T("a/b/f", data=b"f")], [T("a/b/.wh.f")]], ["a", "a/b", "z"], ["a/b/f"]),
    ([[T("z", data=b"z")], [T("a/b/f", data=b"f")], [T("a/b/f", data=b"g")]], ["a/b/f"], []),
])
def test_single_pass_agrees_where_symlinks_and_hidden_entries_meet(layers, present, absent):
    # flat() flattens both ways and requires the same tree (the single pass may hand over to two)
    tree, _ = flat(layers)
    assert all(p in tree for p in present) and not any(p in tree for p in absent), sorted(tree)


def test_single_pass_names_the_layer_of_content_it_cannot_read():
    # the content is read by the consumer (a sink): a truncated layer still says which one
    body = make_tar([T("big", data=bytes(range(256)) * 4000)])
    img = build_image([make_tar([T("a", data=b"a")]), body[:600_000]])
    f = Flattener(image_from_built(img), single_pass=True)
    with pytest.raises(CorruptInput, match=r"layer 2/2 .*entry 'big'"):
        for e in f.entries():
            if e.type == FILE:
                while e.reader.read(1 << 16):
                    pass


@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_consumer_may_skip_content(single_pass):
    img = build_image([make_tar([T(f"f{i}", data=bytes([i]) * (1000 + i)) for i in range(20)])])
    f = Flattener(image_from_built(img), single_pass=single_pass)
    got = {}
    for e in f.entries():
        if e.path in ("f3", "f17"):
            got[e.path] = e.reader.read()
    assert got == {"f3": b"\x03" * 1003, "f17": b"\x11" * 1017}


def test_gzip_multimember_and_zstd_multiframe_layers():
    import zstandard

    tar = make_tar([T("a", data=b"x" * 50_000), T("b", data=b"y" * 50_000)])
    half = len(tar) // 2
    gz = gzip.compress(tar[:half]) + gzip.compress(tar[half:])
    c = zstandard.ZstdCompressor()
    zs = c.compress(tar[:half]) + c.compress(tar[half:])
    for blob in (gz, zs):
        img = build_image([tar], compression="none")
        man = json.loads(img.manifest)
        man["layers"][0].update(digest=sha256(blob), size=len(blob))
        img.blobs[sha256(blob)] = blob
        img.manifest = json.dumps(man).encode()
        tree, _ = flat_img(img)
        assert tree["a"].sha == h(b"x" * 50_000) and tree["b"].sha == h(b"y" * 50_000)


@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_hardlinks_yielded_after_their_file(single_pass):
    img = build_image([make_tar([T("z", data=b"content"), T("a", "hard", link="z"), T("m/n", "hard", link="z")])])
    entries = [(e.path, e.type, e.linkname) for e in Flattener(image_from_built(img), single_pass=single_pass).entries()]
    files = [e for e in entries if e[1] == FILE]
    assert len(files) == 1
    first = files[0][0]
    links = [e for e in entries if e[1] == "hardlink"]
    assert sorted(p for p, _, _ in links) == sorted({"a", "z", "m/n"} - {first})
    assert all(l == first for _, _, l in links)


# -- through the CLI -----------------------------------------------------------------------------------
def _export(tmp_path, img, *opts):
    import os
    import subprocess
    import sys

    from ocitools import image_layout

    layout = image_layout(tmp_path / "layout", img)
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *opts, "export", f"oci:{layout}", "-o",
                           str(tmp_path / "out.tar"), "--raw"], capture_output=True, text=True,
                          env={**os.environ, "HPCCONV_STORE": str(tmp_path / "store")})


def test_cli_export_unsafe_layer_exits_4_naming_layer_and_entry(tmp_path):
    r = _export(tmp_path, build_image([make_tar([T("ok", data=b"1")]), make_tar([T("../../etc/evil", data=b"x")])]))
    assert r.returncode == 4, r.stderr
    first = r.stderr.strip().splitlines()[0]
    assert "layer 2/2 (sha256:" in first and "'../../etc/evil'" in first
    assert not (tmp_path / "out.tar").exists()


def test_cli_export_diff_id_mismatch_exits_4(tmp_path):
    img = build_image([make_tar([T("a", data=b"a")])])
    cfg = json.loads(img.config)
    cfg["rootfs"]["diff_ids"][0] = sha256(b"other")
    raw = json.dumps(cfg).encode()
    man = json.loads(img.manifest)
    del img.blobs[man["config"]["digest"]]
    man["config"].update(digest=sha256(raw), size=len(raw))
    img.blobs[sha256(raw)] = raw
    img.config, img.manifest = raw, json.dumps(man).encode()
    r = _export(tmp_path, img)
    assert r.returncode == 4 and "diff_id" in r.stderr, r.stderr


def test_cli_export_writes_flattened_tar(tmp_path):
    import tarfile

    r = _export(tmp_path, build_image([make_tar([T("d/a", data=b"a"), T("d/b", data=b"b")]),
                                       make_tar([T("d/.wh.a"), T("d/h", "hard", link="d/b")])], compression="zstd"))
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "out.tar") as tf:
        names = {m.name.rstrip("/"): m for m in tf}
    assert set(names) == {"d", "d/b", "d/h"} and names["d/h"].islnk() != names["d/b"].islnk()


def test_cli_starts_over_with_two_passes_where_the_single_pass_gives_up(tmp_path):
    # layer 2's files are yielded (and written) before layer 1 shows that `lib` is a symlink, which
    # bottom-up application follows: the partial output goes, the two passes write the tar
    import os

    from flattools import tree_of_tar

    img = build_image([make_tar([T("usr", "dir"), T("usr/lib", "dir"), T("usr/lib/one", data=b"1"),
                                 T("lib", "sym", link="usr/lib")]),
                       make_tar([T("big", data=bytes(range(256)) * 2000), T("lib/two", data=b"2")])])
    r = _export(tmp_path, img, "--json")
    assert r.returncode == 0, r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert "'lib' is a symlink, and a higher layer writes into it; reading the layers again" in \
        checks["single pass"]["detail"]
    tree = tree_of_tar((tmp_path / "out.tar").read_bytes())
    assert tree["lib"].type == "symlink" and tree["usr/lib/two"].sha == h(b"2") and "lib/two" not in tree
    assert tree["big"].sha == h(bytes(range(256)) * 2000)
    assert sorted(os.listdir(tmp_path)) == ["layout", "out.tar"]         # no partial output left


@pytest.mark.parametrize("fmt", ["squashfs", "tar"])
def test_cli_outputs_take_parents_that_come_after_their_children(tmp_path, fmt):
    # the single pass yields layer 2's usr/lib/x before layer 1's usr and usr/lib, and opt, opt/new
    # (no layer gives them) at the end: tar2sqfs and tar extraction must still give every directory
    # its attributes (read back with sqfs2tar and GNU tar, not with hpcconv)
    import os
    import subprocess
    import sys

    from conftest import need
    from ocitools import image_layout
    from siftools import squashfs_tree

    need("tar2sqfs")
    img = build_image([make_tar([T("usr", "dir", mode=0o750, mtime=1000), T("usr/lib", "dir", mode=0o711, mtime=2000),
                                 T("usr/lib/a", data=b"a")]),
                       make_tar([T("usr/lib/x", data=b"x"), T("opt/new/y", data=b"y")])])
    layout = image_layout(tmp_path / "layout", img)
    out = tmp_path / ("out.sqfs" if fmt == "squashfs" else "out.tar")
    r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "convert", f"oci:{layout}", "-t", "charliecloud",
                        "--format", fmt, "--compression", "gzip", "-o", str(out)], capture_output=True, text=True,
                       env={**os.environ, "HPCCONV_STORE": str(tmp_path / "store")})
    assert r.returncode == 0, r.stderr
    if fmt == "squashfs":
        tree = squashfs_tree(out)
        got = {p: (tree[p]["mode"], tree[p]["mtime"]) for p in ("usr", "usr/lib", "opt", "opt/new")}
    else:
        root = tmp_path / "x"
        root.mkdir()
        subprocess.run(["tar", "-xzf", str(out), "-C", str(root)], check=True)
        got = {p: ((root / p).stat().st_mode & 0o7777, int((root / p).stat().st_mtime))
               for p in ("usr", "usr/lib", "opt", "opt/new")}
    # Charliecloud makes directories u+rwx (0o711 -> 0o711, 0o750 stays)
    assert got == {"usr": (0o750, 1000), "usr/lib": (0o711, 2000), "opt": (0o755, 0), "opt/new": (0o755, 0)}


@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_memory_stays_bounded_by_chunks(single_pass):
    # a 96 MiB file (compresses to ~100 KiB) is streamed through, never held
    import tracemalloc

    big = make_tar([T("big", data=bytes(96 << 20)), T("small", data=b"s")])
    img = build_image([big])
    del big
    image = image_from_built(img)
    tracemalloc.start()
    try:
        f = Flattener(image, single_pass=single_pass)
        n = 0
        for e in f.entries():
            if e.type == FILE:
                while chunk := e.reader.read(1 << 20):
                    n += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == (96 << 20) + 1
    from hpcconv.compression import CHUNK

    from hpcconv.image import _HashWorker

    # the prefetch queue's 2 chunks, the one being decoded, the one in hand (and a copy being
    # sliced), and the pieces waiting for the hash thread (zeros decode faster than they hash):
    # well under the 96 MiB file (measured 18-26 MiB with 8 MiB chunks, 32-34 with the hash queue)
    assert peak < (5 + _HashWorker.DEPTH) * CHUNK, f"peak {peak >> 20} MiB"


def test_deep_tree_under_opaque_dir():
    deep = "/".join(["d"] * 3000)
    tree, _ = flat([[T(deep + "/old", data=b"o")], [T("d/.wh..wh..opq"), T("d/new", data=b"n")]])
    assert set(tree) == {"d", "d/new"}
    tree, _ = flat([[T(deep + "/f", data=b"f")]])
    assert len(tree) == 3001 and tree[deep + "/f"].sha == h(b"f")


@pytest.mark.parametrize("single_pass", [False, True], ids=["two-pass", "single-pass"])
def test_no_threads_left_behind_on_error_or_abandon(single_pass):
    import threading
    import time as _time

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "hpcconv-prefetch" and t.is_alive()]

    img = build_image([make_tar([T(f"f{i}", data=bytes([i]) * 300_000) for i in range(40)]),
                       make_tar([T("../../x", data=b"x")])])
    with pytest.raises(UnsafeInput):
        for _ in Flattener(image_from_built(img), single_pass=single_pass).entries():
            pass
    img = build_image([make_tar([T(f"f{i}", data=bytes([i]) * 300_000) for i in range(40)])])
    gen = Flattener(image_from_built(img), single_pass=single_pass).entries()
    for e in gen:
        if e.type == FILE:
            break                                  # abandon mid-layer
    gen.close()
    deadline = _time.monotonic() + 5
    while prefetchers() and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert prefetchers() == []
