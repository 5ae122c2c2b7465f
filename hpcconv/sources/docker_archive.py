"""`docker-archive:PATH[:REF]`: a `docker save` archive, read as one stream straight into the store.

Two layouts are understood (registry-layers-airgap.md §d.2):

* classic (Docker ≤ 24, and skopeo's variant): `manifest.json` = `[{"Config": "<hex>.json",
  "RepoTags": [...], "Layers": ["<v1id>/layer.tar", ...]}]`, layers uncompressed (any of them may be
  gzip/zstd in other writers; we sniff), skopeo writes `<v1id>/layer.tar` as symlinks to `<hex>.tar`.
  These layers have no distribution digest, so each member is hashed *while* it is streamed into the
  store, and an OCI manifest is built from the results (uncompressed layers are checked against the
  config's `rootfs.diff_ids`). The manifest JSON is deterministic, so the same archive always gives
  the same manifest digest.
* OCI-hybrid (Docker 25+, and Docker with the containerd store): `oci-layout` + `index.json` +
  `blobs/sha256/*` (+ a compatibility `manifest.json`). Blobs are checked against their names on the
  way in; the image is then resolved from `index.json` like an `oci:` layout (nested indexes and
  platform selection included). `index.json` wins when both are present.

The archive is never unpacked to a temporary directory and never held in memory: `tarfile` reads it
in stream mode (`r|*`, so a gzip/xz-compressed archive works too), member by member. Blob members are
written to `STORE/tmp/` while being hashed and then renamed into `blobs/` (an already present blob is
not written twice), so later conversions of the same image reuse them. The image is tagged in the
store as `docker-archive:ABSPATH[:REF]` (and `docker-daemon:NAME` by the daemon source).

REF picks an image from an archive that holds several: a `RepoTags` entry / `io.containerd.image.name`
/ `org.opencontainers.image.ref.name` (docker.io/library/ prefixes are ignored when comparing), or
`@N` for the N-th `manifest.json` entry (containers-transports(5) spelling).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..compression import detect
from ..errors import CorruptInput, SourceError
from ..image import (OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_MANIFEST, Descriptor, Image,
                     ImageConfig, Index)
from ..progress import NULL, Reporter
from ..store import Store, StoreError
from . import SourceOptions
from .oci_layout import CONTAINERD_NAME, MAX_CONFIG, MAX_INDEX, REF_ANNOTATION, Blobs, load_image, \
    pick_from_index_json

CHUNK = 1 << 20
_META = {"manifest.json", "index.json", "oci-layout", "repositories"}
_LAYER_TYPES = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
_BLOB_NAME = re.compile(r"^blobs/(sha256|sha512)/([a-f0-9]+)$")


@dataclass
class Ingested:
    digest: str
    size: int
    kind: str          # compression sniffed from the first bytes: none | gzip | zstd


@dataclass
class ArchiveContents:
    files: dict[str, Ingested] = field(default_factory=dict)     # member name -> blob in the store
    links: dict[str, str] = field(default_factory=dict)          # member name -> member name it points to
    meta: dict[str, bytes] = field(default_factory=dict)         # manifest.json, index.json, oci-layout

    def resolve(self, name: str, what: str) -> Ingested:
        name = _clean(name)
        for _ in range(16):
            if name in self.files:
                return self.files[name]
            if name not in self.links:
                raise CorruptInput(f"archive lists {what} {name!r}, which the archive does not contain")
            name = self.links[name]
        raise CorruptInput(f"archive member {name!r} is a symlink loop")


def _clean(name: str) -> str:
    """Member name as a plain relative path (`./x` -> `x`)."""
    return posixpath.normpath("/" + name).lstrip("/")


def ingest_stream(store: Store, stream: BinaryIO, algo: str = "sha256", progress=None) -> Ingested:
    """Copy a stream into the store, hashing it on the way; return its digest, size and compression."""
    h = hashlib.new(algo)
    tmpdir = store.root / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix="ingest-", suffix=".partial")
    n, head = 0, b""
    try:
        with os.fdopen(fd, "wb") as f:
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                if len(head) < 4:
                    head += chunk[:4]
                h.update(chunk)
                f.write(chunk)
                n += len(chunk)
                if progress is not None:
                    progress.advance(len(chunk))
            digest = f"{algo}:{h.hexdigest()}"
            if not store.has(digest):
                f.flush()
                os.fsync(f.fileno())
        if store.has(digest):
            os.unlink(tmp)
        else:
            os.chmod(tmp, 0o644)
            dest = store.blob_path(digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing into the store {store.root}",
                             hint="free space or point HPCCONV_STORE at a larger file system") from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Ingested(digest, n, detect(head))


def read_archive(stream: BinaryIO, store: Store, what: str, reporter: Reporter = NULL,
                 total: int | None = None) -> ArchiveContents:
    """Stream a docker-save tar (optionally compressed) into the store."""
    out = ArchiveContents()
    task = reporter.task(f"reading {what}", total=total)
    counted = _Counting(stream, task)
    try:
        tf = tarfile.open(fileobj=counted, mode="r|*", bufsize=CHUNK)
    except tarfile.TarError as e:
        raise CorruptInput(f"{what} is not a tar archive: {e}") from None
    try:
        with tf:
            for ti in tf:
                name = _clean(ti.name)
                if not name:
                    continue
                if ti.issym():
                    out.links[name] = _clean(posixpath.join(posixpath.dirname(name), ti.linkname))
                elif ti.islnk():
                    out.links[name] = _clean(ti.linkname)
                elif not ti.isfile():
                    continue
                elif name in _META:
                    if ti.size > MAX_INDEX:
                        raise CorruptInput(f"{what}: {name} is larger than the {MAX_INDEX}-byte limit")
                    out.meta[name] = tf.extractfile(ti).read()
                elif name.endswith("/json") or name.endswith("/VERSION"):
                    continue  # legacy v1 metadata, not needed
                else:
                    m = _BLOB_NAME.match(name)
                    got = ingest_stream(store, tf.extractfile(ti), m.group(1) if m else "sha256")
                    if m and got.digest != f"{m.group(1)}:{m.group(2)}":
                        raise CorruptInput(f"{what}: blob {m.group(1)}:{m.group(2)} does not match its content "
                                           f"(got {got.digest})")
                    out.files[name] = got
    except (tarfile.TarError, EOFError) as e:
        raise CorruptInput(f"{what} is truncated or not a valid tar archive: {e}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing into the store {store.root}") from None
        if e.errno is None:  # gzip.BadGzipFile and friends
            raise CorruptInput(f"{what} is truncated or not a valid archive: {e}") from None
        raise SourceError(f"cannot read {what}: {e.strerror or e}") from None
    task.done()
    return out


class _Counting(io.RawIOBase):
    def __init__(self, raw: BinaryIO, task):
        self._raw, self._task = raw, task

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._raw.read(len(b))
        b[: len(data)] = data
        self._task.advance(len(data))
        return len(data)

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._task.advance(len(data))
        return data


# choosing and building the image ------------------------------------------------------------------
def normalize_name(ref: str) -> str:
    """`busybox` -> `busybox:latest`, `docker.io/library/x:t` -> `x:t` (for comparisons only)."""
    ref = ref.strip()
    for p in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if ref.startswith(p):
            ref = ref[len(p):]
            break
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        ref += ":latest"
    return ref


def _pick_classic(entries: list, ref: str | None, what: str) -> dict:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise CorruptInput(f"{what}: manifest.json is not a list of images")
    if ref is None:
        if len(entries) > 1:
            names = [t for e in entries for t in (e.get("RepoTags") or [])]
            raise SourceError(f"{what} holds {len(entries)} images; name one with :REF or :@N",
                              hint=f"tags in the archive: {', '.join(names) or 'none'}")
        return entries[0]
    if ref.startswith("@") and ref[1:].isdigit():
        i = int(ref[1:])
        if i >= len(entries):
            raise SourceError(f"{what} has no image @{i} (it holds {len(entries)})")
        return entries[i]
    want = normalize_name(ref)
    for e in entries:
        if any(normalize_name(str(t)) == want for t in (e.get("RepoTags") or [])):
            return e
    names = [t for e in entries for t in (e.get("RepoTags") or [])]
    raise SourceError(f"{ref!r} is not in {what}", hint=f"tags in the archive: {', '.join(names) or 'none'}")


def classic_manifest(contents: ArchiveContents, entry: dict, store: Store, what: str) -> Descriptor:
    """Build (and store) an OCI manifest for a classic docker-save image entry."""
    cfg_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(cfg_name, str) or not isinstance(layer_names, list) or not layer_names:
        raise CorruptInput(f"{what}: manifest.json entry lacks Config or Layers")
    cfg = contents.resolve(cfg_name, "config")
    if cfg.size > MAX_CONFIG:
        raise CorruptInput(f"{what}: image config is larger than the {MAX_CONFIG}-byte limit")
    config = ImageConfig.parse(store.read_blob(cfg.digest, MAX_CONFIG))
    diff_ids = config.diff_ids
    if diff_ids and len(diff_ids) != len(layer_names):
        raise CorruptInput(f"{what}: the config lists {len(diff_ids)} layers, manifest.json {len(layer_names)}")
    layers = []
    for i, ln in enumerate(layer_names):
        lay = contents.resolve(str(ln), f"layer {i + 1}")
        if lay.kind == "none" and diff_ids and diff_ids[i] != lay.digest:
            raise CorruptInput(f"{what}: layer {i + 1} ({ln}) does not match the config's diff_id "
                               f"{diff_ids[i]} (got {lay.digest})")
        layers.append({"mediaType": _LAYER_TYPES[lay.kind], "digest": lay.digest, "size": lay.size})
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
           "layers": layers}
    raw = json.dumps(man, sort_keys=True, separators=(",", ":")).encode()
    digest = store.put_bytes(raw)
    return Descriptor(OCI_MANIFEST, digest, len(raw))


def image_from_contents(contents: ArchiveContents, store: Store, ref: str | None, reference: str,
                        tags: list[str], opts: SourceOptions, what: str) -> Image:
    blobs = Blobs(store.root, f"store {store.root}")
    if "index.json" in contents.meta and "oci-layout" in contents.meta:
        index = Index.parse(contents.meta["index.json"])
        want = ref
        if ref is not None and not any(d.annotations.get(REF_ANNOTATION) == ref
                                       or d.annotations.get(CONTAINERD_NAME) == ref for d in index.manifests):
            norm = normalize_name(ref)
            for d in index.manifests:
                if normalize_name(d.annotations.get(CONTAINERD_NAME, "") or "x") == norm:
                    want = d.annotations[CONTAINERD_NAME]
                    break
        desc, by_platform = pick_from_index_json(index, want, what, opts)
        image = load_image(blobs, desc, reference, opts, index if by_platform else None)
        top = desc
    elif "manifest.json" in contents.meta:
        try:
            entries = json.loads(contents.meta["manifest.json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptInput(f"{what}: manifest.json is not valid JSON: {e}") from None
        entry = _pick_classic(entries, ref, what)
        top = classic_manifest(contents, entry, store, what)
        image = load_image(blobs, top, reference, opts)
    else:
        raise SourceError(f"{what} is not a docker save archive (no manifest.json or index.json)")
    if image.index is not None:
        # record the image actually chosen, not the whole index
        top = Descriptor(image.manifest.media_type, image.manifest.digest, len(image.manifest.raw))
    for t in tags:
        store.tag(t, top)
    return image


def split_path_ref(rest: str) -> tuple[Path, str | None]:
    """`PATH[:REF]`: the longest prefix (up to a colon) that names an existing file is the path."""
    if os.path.exists(rest):
        return Path(rest), None
    i = rest.find(":")
    while i != -1:
        if os.path.exists(rest[:i]):
            return Path(rest[:i]), rest[i + 1:] or None
        i = rest.find(":", i + 1)
    raise SourceError(f"docker archive {rest.split(':')[0]!r} does not exist")


def open_image(rest: str, opts: SourceOptions) -> Image:
    path, ref = split_path_ref(rest)
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a docker save archive",
                          hint="for an OCI layout directory use oci:DIR")
    store = Store.open(opts.store_path)
    what = f"docker archive {path}"
    try:
        f = open(path, "rb")
    except OSError as e:
        raise SourceError(f"cannot open {what}: {e.strerror or e}") from None
    with f:
        st = os.fstat(f.fileno())
        total = st.st_size if stat.S_ISREG(st.st_mode) else None   # a pipe works too: it is streamed
        contents = read_archive(f, store, what, opts.reporter, total=total)
    regular = total is not None
    reference = f"docker-archive:{path.resolve() if regular else path}" + (f":{ref}" if ref else "")
    # a pipe has no name worth recording in the store; its blobs are kept all the same
    return image_from_contents(contents, store, ref, reference, [reference] if regular else [], opts, what)
