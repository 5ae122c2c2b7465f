"""`oci:DIR[:TAG]`: an OCI image layout directory (image-spec `image-layout.md`).

* TAG matches the `org.opencontainers.image.ref.name` annotation of an `index.json` entry (containerd's
  `io.containerd.image.name` is accepted too). Without a tag, a layout with one entry uses it; a layout
  whose entries carry platforms is treated as an index and the platform is selected.
* Nested indexes are resolved with `Index.select(opts.platform or host_platform())`.
* Manifests, indexes and configs are read whole (size-capped) and checked against their digests;
  layers are opened straight from `blobs/` and wrapped in `VerifyingReader` (digest and size checked
  as they are read).

`load_image()` is shared with the docker-archive and docker-daemon sources, which resolve an image
in the hpcconv store (itself an OCI layout) the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import CorruptInput, SourceError
from ..image import (INDEX_TYPES, Descriptor, Image, ImageConfig, Index, Layer, Manifest, VerifyingReader,
                     check_digest, host_platform, manifest_kind, parse_json, verify_bytes)
from . import SourceOptions

REF_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
MAX_INDEX = 4 << 20        # index.json / nested index / manifest
MAX_CONFIG = 32 << 20      # image config (history of huge images can be large)
MAX_NESTING = 4


class Blobs:
    """Read-only access to `blobs/<alg>/<hex>` of a layout directory."""

    def __init__(self, root: Path, what: str):
        self.root = Path(root)
        self.what = what

    def path(self, digest: str) -> Path:
        algo, hexd = check_digest(digest)
        return self.root / "blobs" / algo / hexd

    def stat_size(self, desc: Descriptor) -> int:
        try:
            st = os.stat(self.path(desc.digest))
        except FileNotFoundError:
            raise SourceError(f"{self.what}: blob {desc.digest} is missing",
                              hint="the layout is incomplete; copy it again with all blobs") from None
        return st.st_size

    def read(self, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise CorruptInput(f"{what} {desc.digest} is {desc.size} bytes, over the {limit}-byte limit")
        try:
            with open(self.path(desc.digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise SourceError(f"{self.what}: {what} {desc.digest} is missing",
                              hint="the layout is incomplete; copy it again with all blobs") from None
        if len(data) != desc.size:
            raise CorruptInput(f"{what} {desc.digest} has {len(data)} bytes, its descriptor says {desc.size}")
        verify_bytes(data, desc.digest, what)
        return data

    def opener(self, desc: Descriptor, what: str) -> Callable:
        path = self.path(desc.digest)

        def open_():
            try:
                raw = open(path, "rb")
            except FileNotFoundError:
                raise SourceError(f"{self.what}: {what} {desc.digest} is missing") from None
            return VerifyingReader(raw, desc.digest, desc.size, what)

        return open_


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SourceError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SourceError(f"{what} is a directory: {path}") from None
    except PermissionError:
        raise SourceError(f"cannot read {what} {path}: permission denied") from None
    if len(data) > limit:
        raise CorruptInput(f"{what} {path} is larger than the {limit}-byte limit")
    return data


def pick_from_index_json(index: Index, tag: str | None, where: str, opts: SourceOptions) -> tuple[Descriptor, bool]:
    """Choose the entry of a layout's index.json. Returns (descriptor, selected_by_platform)."""
    entries = index.manifests
    if tag is not None:
        hits = [d for d in entries if d.annotations.get(REF_ANNOTATION) == tag]
        if not hits:
            hits = [d for d in entries if d.annotations.get(CONTAINERD_NAME) == tag]
        if not hits:
            tags = sorted({d.annotations.get(REF_ANNOTATION, "") for d in entries} - {""})
            raise SourceError(f"tag {tag!r} not found in {where}",
                              hint=f"available tags: {', '.join(tags) or 'none'}")
        if len(hits) > 1 and any(d.platform for d in hits):
            sub = Index(index.raw, index.media_type, hits)
            return sub.select(opts.platform or host_platform()), True
        return hits[0], False
    if len(entries) == 1:
        return entries[0], False
    if not entries:
        raise SourceError(f"{where} lists no images")
    if any(d.platform for d in entries):
        return index.select(opts.platform or host_platform()), True
    tags = sorted({d.annotations.get(REF_ANNOTATION, "") for d in entries} - {""})
    raise SourceError(f"{where} holds {len(entries)} images; name one with :TAG",
                      hint=f"available tags: {', '.join(tags) or 'none'}")


def load_image(blobs: Blobs, top: Descriptor, reference: str, opts: SourceOptions,
               chosen_from: Index | None = None) -> Image:
    """Resolve `top` (an index or a manifest) to an Image whose layers open from `blobs`."""
    desc, index = top, chosen_from
    for _ in range(MAX_NESTING + 1):
        if desc.media_type in INDEX_TYPES:
            raw = blobs.read(desc, MAX_INDEX, "image index")
            index = Index.parse(raw, desc.media_type)
            desc = index.select(opts.platform or host_platform())
            continue
        raw = blobs.read(desc, MAX_INDEX, "image manifest")
        kind = manifest_kind(parse_json(raw, "image manifest"), desc.media_type)
        if kind == "index":
            index = Index.parse(raw, desc.media_type)
            desc = index.select(opts.platform or host_platform())
            continue
        manifest = Manifest.parse(raw, desc.media_type)
        break
    else:
        raise CorruptInput(f"{reference}: indexes nested more than {MAX_NESTING} deep")

    config = ImageConfig.parse(blobs.read(manifest.config, MAX_CONFIG, "image config"))
    if index is None and opts.platform is not None and not config.platform.matches(opts.platform):
        raise SourceError(f"{reference} is a {config.platform} image, not {opts.platform.normalized()}",
                          hint="this image has a single platform; drop --platform or pick another image")
    layers = []
    for i, ld in enumerate(manifest.layers):
        what = f"layer {i + 1}"
        if ld.urls and not os.path.exists(blobs.path(ld.digest)):
            raise SourceError(f"{reference}: {what} {ld.digest} is a foreign layer that is not in the layout",
                              hint="fetch it with the registry source first")
        size = blobs.stat_size(ld)
        if size != ld.size:
            raise CorruptInput(f"{what} {ld.digest} has {size} bytes, its descriptor says {ld.size}")
        layers.append(Layer(ld, blobs.opener(ld, what), i))
    return Image(reference=reference, manifest=manifest, config=config, layers=layers, index=index)


def split_dir_tag(rest: str) -> tuple[Path, str | None]:
    """`DIR[:TAG]`: the whole string when it is a directory, else split at the last colon."""
    if os.path.isdir(rest) or ":" not in rest:
        return Path(rest), None
    d, tag = rest.rsplit(":", 1)
    if not tag:
        return Path(d), None
    return Path(d), tag


def open_image(rest: str, opts: SourceOptions) -> Image:
    root, tag = split_dir_tag(rest)
    if not root.is_dir():
        raise SourceError(f"OCI layout directory {root} does not exist")
    if not (root / "oci-layout").is_file() or not (root / "index.json").is_file():
        raise SourceError(f"{root} is not an OCI image layout (no oci-layout or index.json)")
    layout = parse_json(read_small_file(root / "oci-layout", 64 << 10, "oci-layout"), "oci-layout")
    version = str(layout.get("imageLayoutVersion", ""))
    if not version.startswith("1."):
        raise SourceError(f"{root}: unsupported imageLayoutVersion {version!r}")
    index = Index.parse(read_small_file(root / "index.json", MAX_INDEX, "index.json"))
    desc, by_platform = pick_from_index_json(index, tag, f"{root}/index.json", opts)
    ref = f"oci:{root}" + (f":{tag}" if tag else "")
    return load_image(Blobs(root, f"OCI layout {root}"), desc, ref, opts, index if by_platform else None)
