"""Test helpers for flattening: Images from crafted or `docker save`d images, and a path-by-path
comparison of our flattened rootfs with `docker export` (the oracle)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

from hpcconv.entries import DIR, FILE, HARDLINK, SYMLINK, Entry, TarWriter, read_tar_entries
from hpcconv.flatten import Flattener
from hpcconv.image import Descriptor, Image, ImageConfig, Layer, Manifest, digest_bytes

# What `docker create` adds to every container (runtime artefacts, not image content).
DOCKER_RUNTIME = {".dockerenv", "etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab"}
DOCKER_RUNTIME_TREES = ("dev", "proc", "sys")
# `etc` is re-created by the container's init layer (0755 root:root, mtime now) as the parent of
# etc/hosts & co; in the merged overlay view that upper directory's attributes win, so Docker's
# `etc` attributes say nothing about the image.
DOCKER_INIT_DIRS = {"etc"}


def image_from_built(b, *, opener_wrap=None) -> Image:
    """An Image over an ocitools.BuiltImage, blobs opened from memory."""
    man = Manifest.parse(b.manifest)
    cfg = ImageConfig.parse(b.config)
    layers = []
    for i, d in enumerate(man.layers):
        data = b.blobs[d.digest]
        op = (lambda data=data: io.BytesIO(data))
        if opener_wrap:
            op = opener_wrap(op, i)
        layers.append(Layer(d, op, i))
    return Image("test:crafted", man, cfg, layers)


def image_from_docker_save(archive: bytes) -> Image:
    """An Image from a classic `docker save` archive (manifest.json, config, <id>/layer.tar)."""
    tf = tarfile.open(fileobj=io.BytesIO(archive))
    files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    entry = json.loads(files["manifest.json"])[0]
    cfg_raw = files[entry["Config"]]
    descs = []
    blobs = {}
    for name in entry["Layers"]:
        data = files[name]
        d = digest_bytes(data)
        blobs[d] = data
        descs.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "digest": d, "size": len(data)})
    man_raw = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                          "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                     "digest": digest_bytes(cfg_raw), "size": len(cfg_raw)},
                          "layers": descs}).encode()
    man = Manifest.parse(man_raw)
    layers = [Layer(Descriptor.from_json(descs[i]), (lambda data=blobs[d.digest]: io.BytesIO(data)), i)
              for i, d in enumerate(man.layers)]
    return Image("test:docker-save", man, ImageConfig.parse(cfg_raw), layers)


@dataclass
class Rec:
    type: str
    mode: int
    uid: int
    gid: int
    mtime: int
    sha: str = ""
    link: str = ""
    dev: tuple = (0, 0)
    xattrs: dict | None = None
    group: frozenset = frozenset()


def tree_of_entries(entries) -> dict[str, Rec]:
    """path -> Rec; hardlinks resolved to their inode's record, `group` = all paths of the inode."""
    out: dict[str, Rec] = {}
    groups: dict[str, set] = {}
    for e in entries:
        if e.type == HARDLINK:
            assert e.linkname in out, f"hardlink {e.path} -> {e.linkname} before its target"
            t = out[e.linkname]
            out[e.path] = t
            groups[e.linkname].add(e.path)
            groups[e.path] = groups[e.linkname]
            continue
        sha = ""
        if e.type == FILE:
            h = hashlib.sha256()
            n = 0
            if e.size:
                while True:
                    chunk = e.reader.read(1 << 16)
                    if not chunk:
                        break
                    h.update(chunk)
                    n += len(chunk)
            assert n == e.size, f"{e.path}: reader gave {n} of {e.size} bytes"
            sha = h.hexdigest()
        out[e.path] = Rec(e.type, e.mode, e.uid, e.gid, int(e.mtime), sha,
                          e.linkname if e.type == SYMLINK else "", (e.devmajor, e.devminor), dict(e.xattrs))
        groups[e.path] = {e.path}
    return {p: _with_group(r, groups[p]) for p, r in out.items()}


def _with_group(r: Rec, g: set) -> Rec:
    return Rec(r.type, r.mode, r.uid, r.gid, r.mtime, r.sha, r.link, r.dev, r.xattrs, frozenset(g))


def tree_of_tar(data: bytes) -> dict[str, Rec]:
    return tree_of_entries(read_tar_entries(io.BytesIO(data)))


def _tree_through_tar(f: Flattener, parents_first: bool) -> dict[str, Rec]:
    seen: set[str] = set()
    buf = io.BytesIO()
    with TarWriter(buf) as w:
        for e in f.entries():
            check_contract(e, seen, parents_first)
            w.add(e)
    for p in seen:
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        assert not parent or parent in seen, f"{p!r} without its parent"
    return tree_of_tar(buf.getvalue())


def flatten_tree(img: Image, **kw) -> tuple[dict[str, Rec], Flattener]:
    """Flatten with the two passes, check the entry-stream contract, write with TarWriter and read it
    back; then flatten again in the single top-down pass (two passes again where it raises
    TwoPassNeeded, as the pipeline does) and require the same tree, warnings and counts. Returns the
    two-pass tree and flattener; `flattener.single_pass_fallback` is the reason the single pass gave
    up, or None when it did the job."""
    from hpcconv.flatten import TwoPassNeeded

    f = Flattener(img, **kw)
    tree = _tree_through_tar(f, True)
    f.single_pass_fallback = None
    one = Flattener(img, single_pass=True, **kw)
    try:
        again = _tree_through_tar(one, False)
    except TwoPassNeeded as e:
        f.single_pass_fallback = e.reason
        return tree, f
    assert again == tree, "the single pass flattened differently: " + "; ".join(compare(again, tree)[:10])
    assert sorted(one.warnings) == sorted(f.warnings)
    for k in ("members", "whiteouts", "opaque", "hardlinks", "expanded_bytes", "entries", "by_type", "warnings"):
        assert one.stats[k] == f.stats[k], (k, one.stats[k], f.stats[k])
    return tree, f


def check_contract(e: Entry, seen: set, parents_first: bool = True) -> None:
    """No duplicates, hardlinks after their targets; with `parents_first` (the two passes) every
    entry after its parent (the single pass yields a parent only a lower layer gives later)."""
    p = e.path
    assert p and not p.startswith("/") and not p.endswith("/") and "\0" not in p, p
    assert all(c not in ("", ".", "..") for c in p.split("/")), p
    assert p not in seen, f"duplicate entry {p!r}"
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    assert not parents_first or not parent or parent in seen, f"{p!r} before its parent"
    if e.type == HARDLINK:
        assert e.linkname in seen, f"hardlink {p!r} -> {e.linkname!r} not yet yielded"
    seen.add(p)


def docker_tree(export: bytes) -> dict[str, Rec]:
    tree = tree_of_tar(export)
    out = {}
    for p, r in tree.items():
        if p in DOCKER_RUNTIME or p.split("/")[0] in DOCKER_RUNTIME_TREES:
            continue
        out[p] = r
    return out


def compare(ours: dict[str, Rec], docker: dict[str, Rec], *, ignore: set = frozenset(),
            dir_attrs: bool = True) -> list[str]:
    """Differences between our tree and Docker's, one line each (empty list = same)."""
    diffs = []
    for p in sorted(set(ours) | set(docker)):
        if p in ignore:
            continue
        a, b = ours.get(p), docker.get(p)
        if p in DOCKER_INIT_DIRS:
            if a is None or (b is not None and a.type == b.type == DIR):
                continue
        if a is None:
            diffs.append(f"{p!r}: only in docker ({b.type})")
            continue
        if b is None:
            diffs.append(f"{p!r}: only in ours ({a.type})")
            continue
        fields = ["type", "uid", "gid", "sha", "link", "dev"]
        if a.type != DIR or dir_attrs:
            fields.append("mode")
        if a.type != DIR and a.type == b.type:
            # Directory mtimes are not compared: Docker gives implied parents (and dirs of its
            # container init layer) the time of `docker load`/`create`.
            fields.append("mtime")
        for f in fields:
            if getattr(a, f) != getattr(b, f):
                va, vb = getattr(a, f), getattr(b, f)
                if f == "mode":
                    va, vb = oct(va), oct(vb)
                diffs.append(f"{p!r}: {f} ours={va!r} docker={vb!r}")
        # docker export (moby 20.10) only writes security.capability xattrs
        xa = {k: v for k, v in (a.xattrs or {}).items() if k == "security.capability"}
        xb = {k: v for k, v in (b.xattrs or {}).items() if k == "security.capability"}
        if xa != xb:
            diffs.append(f"{p!r}: xattrs ours={xa!r} docker={xb!r}")
        ga = {x for x in a.group if x not in ignore}
        gb = {x for x in b.group if x not in ignore}
        if ga != gb:
            diffs.append(f"{p!r}: hardlink group ours={sorted(ga)} docker={sorted(gb)}")
    return diffs
