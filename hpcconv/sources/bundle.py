"""`bundle:PATH[:IMAGE]`: an image straight out of an hpcconv offline bundle (no import needed).

PATH is the bundle file, its part000, or its base name when split. IMAGE picks one image of a
multi-image bundle: its full reference, a suffix of it (`test/multi:latest`) or its digest. The
manifest seal (and, with $HPCCONV_BUNDLE_KEY, its signature) is checked when the bundle is opened;
every document and layer is checked against its digest as it is read. Parts are not re-hashed here:
`hpcconv bundle verify` does that.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SourceError
from ..image import (INDEX_TYPES, Descriptor, Image, ImageConfig, Index, Layer, Manifest, host_platform,
                     manifest_kind, parse_json)
from . import SourceOptions

MAX_DOC = 8 << 20
MAX_CONFIG = 32 << 20


def _split(rest: str) -> tuple[str, str | None]:
    if os.path.exists(rest) or os.path.exists(rest + ".part000"):
        return rest, None
    i = len(rest)
    while True:
        i = rest.rfind(":", 0, i)
        if i <= 0:
            return rest, None
        head = rest[:i]
        if os.path.isfile(head) or os.path.isfile(head + ".part000"):
            return head, rest[i + 1:] or None


def _pick(images: list[dict], sel: str | None, where: str) -> dict:
    if sel is None:
        if len(images) == 1:
            return images[0]
        raise SourceError(f"{where} holds {len(images)} images; name one with bundle:PATH:IMAGE",
                          hint="images: " + ", ".join(i["ref"] for i in images))
    for test in (lambda i: i["ref"] == sel, lambda i: i["digest"] == sel,
                 lambda i: i["ref"].endswith("/" + sel) or i["ref"].endswith("/library/" + sel)):
        hits = [i for i in images if test(i)]
        if len(hits) == 1:
            return hits[0]
    raise SourceError(f"no image {sel!r} in {where}", hint="images: " + ", ".join(i["ref"] for i in images))


def open_image(rest: str, opts: SourceOptions) -> Image:
    from ..bundle import fmt
    from ..bundle.reader import Bundle

    path, sel = _split(rest)
    keys = [fmt.load_public_key(Path(k)) for k in os.environ.get("HPCCONV_BUNDLE_KEY", "").split(os.pathsep) if k]
    b = Bundle.open(path, keys, check_parts=False)
    where = f"bundle {b.loc.display}"
    img = _pick(b.doc.get("images", []), sel, where)
    store = None

    def blob_opener(digest: str):
        """From the bundle, or for an incremental bundle's base blobs, from the store."""
        nonlocal store
        if digest in b.blob_entries:
            return b.open_blob(digest)
        from ..image import VerifyingReader
        from ..store import Store

        need = {r["digest"]: r["size"] for r in b.doc.get("requires", [])}
        store = store or Store.open(opts.store_path)
        if digest not in need or not store.has(digest):
            return b.open_blob(digest)                      # raises: not carried, base not imported
        return VerifyingReader(store.open_blob(digest), digest, need[digest], "blob")

    def read(digest: str, limit: int) -> bytes:
        with blob_opener(digest) as s:
            data = s.read(limit + 1)
            s.read()
        if len(data) > limit:
            raise SourceError(f"blob {digest} is over the {limit}-byte limit")
        return data

    want = opts.platform or host_platform()
    desc = Descriptor(img["mediaType"], img["digest"], img["size"])
    index = None
    raw = read(desc.digest, MAX_DOC)
    if desc.media_type in INDEX_TYPES or manifest_kind(parse_json(raw, "manifest")) == "index":
        index = Index.parse(raw, desc.media_type)
        desc = index.select(want)
        if desc.digest not in b.blob_entries and desc.digest not in {r["digest"] for r in b.doc.get("requires", [])}:
            raise SourceError(f"{where} does not carry the {want} image of {img['ref']}",
                              hint="carried: " + ", ".join(img.get("platforms", [])))
        raw = read(desc.digest, MAX_DOC)
    manifest = Manifest.parse(raw, desc.media_type)
    config = ImageConfig.parse(read(manifest.config.digest, MAX_CONFIG))
    if index is None and opts.platform is not None and not config.platform.matches(opts.platform):
        raise SourceError(f"{img['ref']} in {where} is a {config.platform} image, not {opts.platform}")
    layers = [Layer(d, (lambda dg=d.digest: blob_opener(dg)), i) for i, d in enumerate(manifest.layers)]
    return Image(img["ref"], manifest, config, layers, index=index, source="bundle")
