"""Gather what a bundle (or a push) carries for one SOURCE: the top document (index or manifest),
the selected platforms' manifests, configs and layers, each as a re-openable, verified stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import AuthError, NetworkError, SourceError
from ..image import Descriptor, Image, Index, Platform, VerifyingReader, digest_bytes, host_platform
from ..sources import SourceOptions, open_source, parse_source


@dataclass
class Blob:
    digest: str
    size: int
    media_type: str
    open: Callable[[], BinaryIO]      # a stream that checks digest and size as it is read


@dataclass
class ImagePlan:
    ref: str                              # the name it is tagged under (store, bundle index.json)
    source: str
    top: Descriptor                       # index or manifest
    platforms: list[str]                  # carried
    available: list[str]                  # all platforms the source offers
    children: list[Descriptor] = field(default_factory=list)   # carried manifests of an index
    blobs: dict[str, Blob] = field(default_factory=dict)       # documents first, then configs, layers

    complete: bool = True                 # every manifest its index lists is carried

    @property
    def partial(self) -> bool:
        return not self.complete


def _bytes_blob(raw: bytes, media_type: str, digest: str | None = None) -> Blob:
    import io

    d = digest or digest_bytes(raw)
    return Blob(d, len(raw), media_type, lambda: VerifyingReader(io.BytesIO(raw), d, len(raw)))


def _layer_blob(layer) -> Blob:
    def open_():
        s = layer.open()
        return s if isinstance(s, VerifyingReader) else VerifyingReader(s, layer.digest, layer.descriptor.size,
                                                                        "layer")

    return Blob(layer.digest, layer.descriptor.size, layer.media_type, open_)


def ref_name(spec: str, image: Image) -> str:
    """The name an image is recorded under: the normalised registry reference where there is one."""
    from ..reference import parse

    transport, rest = parse_source(spec)
    if transport in ("docker", "docker-daemon"):
        try:
            return parse(rest).canonical()
        except Exception:  # noqa: BLE001 - odd daemon names: keep what the source says
            return image.reference
    if transport == "bundle":
        return image.reference
    # oci:DIR[:TAG], docker-archive:PATH: a local name, podman-style, usable as `localhost/NAME:TAG`
    import re

    if transport == "oci":
        from ..sources.oci_layout import split_dir_tag

        d, tag = split_dir_tag(rest)
        base, tag = Path(d).name, tag or "latest"
    else:
        base, tag = Path(rest).stem, "latest"
    base = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-._") or "image"
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", tag)[:128] or "latest"
    return f"localhost/{base}:{tag}"


def probe_platforms(spec: str, opts: SourceOptions) -> list[Platform] | None:
    """The platforms of SOURCE's index without downloading layers (registry sources only), or None."""
    transport, rest = parse_source(spec)
    if transport != "docker":
        return None
    from ..image import manifest_kind, parse_json
    from ..reference import parse
    from ..registry.client import MAX_MANIFEST, RegistryClient
    from ..sources.registry import offline_descriptor
    from ..store import Store

    ref = parse(rest)
    store = Store.open(opts.store_path)
    raw = None
    if ref.digest and store.has(ref.digest):
        raw = store.read_blob(ref.digest, MAX_MANIFEST)
    else:
        try:
            with RegistryClient(ref, insecure=opts.insecure, ca_cert=opts.ca_cert, username=opts.username,
                                password=opts.password) as c:
                raw, _, _ = c.get_manifest(ref.reference)
        except NetworkError:
            d = offline_descriptor(ref, store)
            if d is None:
                raise
            raw = store.read_blob(d.digest, MAX_MANIFEST)
    if manifest_kind(parse_json(raw, f"manifest of {ref}")) != "index":
        return None
    return Index.parse(raw).platforms()


def collect(spec: str, platforms: list[Platform] | None, make_opts: Callable[[Platform | None], SourceOptions]
            ) -> ImagePlan:
    """Open SOURCE once per wanted platform. `platforms` None = every platform the source offers."""
    want = platforms
    if want is None:
        probed = probe_platforms(spec, make_opts(None))
        if probed is not None:
            want = _dedupe(probed)
    images: list[Image] = []
    if want is None:
        first = open_source(spec, make_opts(None))
        images.append(first)
        if first.index is not None:
            for p in _dedupe(first.index.platforms()):
                if not p.matches(first.platform):
                    images.append(open_source(spec, make_opts(p)))
    else:
        # a filter: each wanted platform the image has is carried; none at all is an error
        first_error = None
        for p in want:
            try:
                img = open_source(spec, make_opts(p))
            except SourceError as e:
                if isinstance(e, (NetworkError, AuthError)):
                    raise
                first_error = first_error or e
                continue
            if img.index is None and not img.platform.matches(p):
                first_error = first_error or SourceError(f"{spec} is a {img.platform} image, not {p}")
                continue
            if not any(i.digest == img.digest for i in images):
                images.append(img)
        if not images:
            raise first_error
    first = images[0]
    name = ref_name(spec, first)
    plan_blobs: dict[str, Blob] = {}
    if first.index is not None:
        idx = first.index
        for img in images[1:]:
            if img.index is None or img.index.raw != idx.raw:
                raise SourceError(f"{spec} changed while it was read (different indexes per platform)",
                                  hint="run the command again")
        top_blob = _bytes_blob(idx.raw, idx.media_type)
        top = Descriptor(idx.media_type, top_blob.digest, top_blob.size)
        plan_blobs[top.digest] = top_blob
        available = [str(p) for p in idx.platforms()]
        children = []
        for img in images:
            d = next((m for m in idx.manifests if m.digest == img.digest), None)
            if d is None:
                raise SourceError(f"{spec}: the manifest for {img.platform} is not listed in its index "
                                  "(nested indexes are not supported in bundles)")
            children.append(d)
    else:
        top = Descriptor(first.manifest.media_type, first.digest, len(first.manifest.raw))
        available, children = [str(first.platform)], []
    for img in images:
        m = img.manifest
        plan_blobs.setdefault(img.digest, _bytes_blob(m.raw, m.media_type, img.digest))
        plan_blobs.setdefault(m.config.digest, _bytes_blob(img.config.raw, m.config.media_type, m.config.digest))
    for img in images:
        for layer in img.layers:
            plan_blobs.setdefault(layer.digest, _layer_blob(layer))
    complete = first.index is None or {m.digest for m in first.index.manifests} <= {c.digest for c in children}
    return ImagePlan(name, spec, top, [str(i.platform) for i in images], available, children, plan_blobs,
                     complete)


def _dedupe(ps: list[Platform]) -> list[Platform]:
    out: list[Platform] = []
    for p in ps:
        if not any(q.matches(p) for q in out):
            out.append(p)
    return out


def default_platforms() -> list[Platform]:
    return [host_platform()]
