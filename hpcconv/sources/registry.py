"""`docker://` source: pull an image from a registry into the store and return it as an Image.

Flow: parse and normalise the reference; if it names a digest whose manifest, config and layers
are all in the store, use them without touching the network. Otherwise resolve the tag (HEAD, so a
known digest costs no GET), fetch the manifest or index by digest and verify the raw bytes, select
the platform, download config and layers in parallel into the store (resumable, verified before
they are published), then store the manifest (and index) and tag the normalised reference.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from ..errors import CorruptInput, NetworkError, SourceError
from ..image import (DOCKER_LAYER_FOREIGN, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, SCHEMA1_TYPES,
                     Descriptor, Image, ImageConfig, Index, Layer, Manifest, Platform, check_digest, digest_bytes,
                     host_platform, manifest_kind, parse_json, verify_bytes)
from ..reference import Reference, parse
from ..registry.client import MAX_MANIFEST, RegistryClient
from ..store import Store
from . import SourceOptions

MAX_CONFIG = 8 << 20
MAX_NESTING = 2


def open_image(rest: str, opts: SourceOptions) -> Image:
    ref = parse(rest)
    store = Store.open(opts.store_path)
    want = opts.platform or host_platform()
    if ref.digest:
        img = from_store(ref, store, want, opts)
        if img is not None:
            return img
    if os.environ.get("HPCCONV_OFFLINE") == "1":       # never the network: store only
        if ref.digest:
            raise SourceError(f"{ref} is not (completely) in the store and HPCCONV_OFFLINE=1",
                              hint="import the bundle that carries it (hpcconv bundle import)")
        return _from_tag_offline(ref, store, want, opts, store.resolve(ref.canonical()), "HPCCONV_OFFLINE=1")
    try:
        with RegistryClient(ref, insecure=opts.insecure, ca_cert=opts.ca_cert, username=opts.username,
                            password=opts.password, warn=lambda m: opts.reporter.log("warning", m)) as client:
            return pull(client, ref, store, want, opts)
    except NetworkError as e:
        # a tag imported from an hpcconv bundle stays usable while its registry is unreachable;
        # tags pulled from a registry never fall back (they may be stale)
        desc = None if ref.digest else offline_descriptor(ref, store)
        if desc is None:
            raise
        opts.reporter.log("warning", f"{ref.registry} unreachable ({e.message}); using {ref.canonical()} as "
                                     f"imported from bundle {desc.annotations.get(BUNDLE_ANNOTATION)}")
        return _from_tag_offline(ref, store, want, opts, desc, "the registry is unreachable")


BUNDLE_ANNOTATION = "dev.hpcconv.bundle.id"


def offline_descriptor(ref: Reference, store: Store) -> Descriptor | None:
    """The store's entry for a tag imported by `hpcconv bundle import` (annotated with the bundle id)."""
    d = store.resolve(ref.canonical())
    if d is None or not d.annotations.get(BUNDLE_ANNOTATION) or not store.has(d.digest):
        return None
    return d


def _from_tag_offline(ref: Reference, store: Store, want: Platform, opts: SourceOptions,
                      desc: Descriptor | None, why: str) -> Image:
    if desc is None:
        raise SourceError(f"{ref.canonical()} is not in the store and {why}",
                          hint="import the bundle that carries it (hpcconv bundle import) or use bundle:PATH")
    img = from_store(ref.with_digest(desc.digest), store, want, opts)
    if img is None:
        raise SourceError(f"{ref.canonical()} in the store lacks the image for {want} and {why}",
                          hint="pick a platform the bundle carried with --platform")
    img.reference = ref.canonical()
    return img


# documents ---------------------------------------------------------------------------------------
def _fetch_document(client: RegistryClient, store: Store, reference: str, pinned: str | None,
                    expect_size: int | None = None) -> tuple[str, bytes, str]:
    """(digest, raw bytes, content type) of a manifest or index, verified against its digest."""
    if pinned and store.has(pinned):
        return pinned, store.read_blob(pinned, MAX_MANIFEST), ""
    if not pinned:
        known = client.head_manifest(reference)
        if known and _valid_digest(known) and store.has(known):
            return known, store.read_blob(known, MAX_MANIFEST), ""
    raw, ctype, header = client.get_manifest(reference)
    _reject_schema1(raw, ctype)       # before digests: schema1's digest covers the JWS-stripped payload
    if pinned:
        verify_bytes(raw, pinned, f"manifest {pinned}")
        digest = pinned
    elif header:
        check_digest(header)
        verify_bytes(raw, header, f"manifest {reference} (Docker-Content-Digest)")
        digest = header
    else:
        digest = digest_bytes(raw)
    if expect_size is not None and len(raw) != expect_size:
        raise CorruptInput(f"manifest {digest} is {len(raw)} bytes, the index says {expect_size}")
    obj = parse_json(raw, f"manifest {digest}")
    declared = obj.get("mediaType")
    if declared and ctype in INDEX_TYPES + MANIFEST_TYPES and declared != ctype:
        raise CorruptInput(f"manifest {digest} says it is {declared} but was served as {ctype}")
    return digest, raw, ctype


def _reject_schema1(raw: bytes, ctype: str) -> None:
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if ctype in SCHEMA1_TYPES or (isinstance(obj, dict) and obj.get("schemaVersion") == 1):
        manifest_kind(obj if isinstance(obj, dict) else {}, ctype)   # raises the schema1 SourceError


def _valid_digest(d: str) -> bool:
    try:
        check_digest(d)
        return True
    except CorruptInput:
        return False


def _media_type(raw: bytes, ctype: str, kind: str) -> str:
    obj = parse_json(raw, "manifest")
    return obj.get("mediaType") or ctype or (OCI_INDEX if kind == "index" else OCI_MANIFEST)


def _select(index: Index, want: Platform, client: RegistryClient | None, store: Store,
            depth: int = 0) -> tuple[Descriptor, bytes, str]:
    """Follow an index (and nested indexes) down to the platform's image manifest."""
    d = index.select(want)
    if client is None:
        if not store.has(d.digest):
            raise LookupError(d.digest)
        digest, raw, ctype = d.digest, store.read_blob(d.digest, MAX_MANIFEST), ""
        if len(raw) != d.size:
            raise CorruptInput(f"manifest {d.digest} is {len(raw)} bytes, the index says {d.size}")
    else:
        digest, raw, ctype = _fetch_document(client, store, d.digest, d.digest, d.size)
    if manifest_kind(parse_json(raw, f"manifest {digest}"), ctype or d.media_type) == "index":
        if depth >= MAX_NESTING:
            raise SourceError("image indexes are nested too deeply")
        if client is not None:
            store.put_bytes(raw, digest)
        return _select(Index.parse(raw, ctype or d.media_type), want, client, store, depth + 1)
    return d, raw, ctype or d.media_type


# pulling -----------------------------------------------------------------------------------------
def pull(client: RegistryClient, ref: Reference, store: Store, want: Platform, opts: SourceOptions) -> Image:
    top_digest, top_raw, top_ct = _fetch_document(client, store, ref.reference, ref.digest or None)
    kind = manifest_kind(parse_json(top_raw, f"manifest {top_digest}"), top_ct)
    index = None
    if kind == "index":
        index = Index.parse(top_raw, top_ct)
        desc, raw, ctype = _select(index, want, client, store)
        manifest, manifest_digest = Manifest.parse(raw, ctype), desc.digest
    else:
        manifest, manifest_digest = Manifest.parse(top_raw, top_ct), top_digest
    _check_layers(manifest)
    if manifest.config.size > MAX_CONFIG:
        raise CorruptInput(f"image config {manifest.config.digest} is {manifest.config.size} bytes, "
                           f"over the {MAX_CONFIG}-byte limit")
    download_all(client, store, [manifest.config] + manifest.layers, opts)
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, MAX_CONFIG))
    if opts.platform is not None and index is None and not config.platform.matches(opts.platform):
        raise SourceError(f"{ref} is a single-platform image for {config.platform}, not {opts.platform}")
    store.put_bytes(manifest.raw, manifest_digest)
    top = Descriptor(_media_type(top_raw, top_ct, kind), top_digest, len(top_raw))
    if index is not None:
        store.put_bytes(top_raw, top_digest)
    store.tag(ref.canonical(), top)
    return _image(ref, store, manifest, config, index)


def _check_layers(manifest: Manifest) -> None:
    for layer in manifest.layers:
        if layer.media_type == DOCKER_LAYER_FOREIGN:
            raise SourceError(f"layer {layer.digest} is a Windows foreign layer; only Linux images can be converted")


def download_all(client: RegistryClient, store: Store, descs: list[Descriptor], opts: SourceOptions) -> None:
    """Download blobs in parallel (opts.max_workers); the first error cancels the rest."""
    todo: dict[str, Descriptor] = {}
    for d in descs:
        if d.digest not in todo and not store.has(d.digest):
            todo[d.digest] = d
    if not todo:
        return
    stop = threading.Event()

    def one(d: Descriptor) -> None:
        task = opts.reporter.task(d.hex[:12], total=d.size)
        client.download_blob(d, store, task, cancelled=stop.is_set)
        task.done()

    with ThreadPoolExecutor(max_workers=max(1, opts.max_workers), thread_name_prefix="blob") as ex:
        futures = [ex.submit(one, d) for d in todo.values()]
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # Ctrl-C (or any other abort): running downloads stop at their next chunk (their partial
            # files stay for a resume), queued ones never start; give them a moment, then go
            stop.set()
            for f in futures:
                f.cancel()
            wait(futures, timeout=5)
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            stop.set()
            for f in pending:
                f.cancel()
            wait(pending)
            errors += [f.exception() for f in pending if not f.cancelled() and f.exception() is not None]
            corrupt = [e for e in errors if isinstance(e, CorruptInput)]
            raise (corrupt or errors)[0]


# offline -----------------------------------------------------------------------------------------
def from_store(ref: Reference, store: Store, want: Platform, opts: SourceOptions) -> Image | None:
    """The image for a digest reference if everything it needs is already in the store, else None."""
    if not store.has(ref.digest):
        return None
    raw = store.read_blob(ref.digest, MAX_MANIFEST)
    index = None
    if manifest_kind(parse_json(raw, f"manifest {ref.digest}")) == "index":
        index = Index.parse(raw)
        try:
            _, raw, ctype = _select(index, want, None, store)
        except LookupError:
            return None
    else:
        ctype = ""
    manifest = Manifest.parse(raw, ctype)
    if not all(store.has(d.digest) for d in [manifest.config] + manifest.layers):
        return None
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, MAX_CONFIG))
    if opts.platform is not None and index is None and not config.platform.matches(opts.platform):
        raise SourceError(f"{ref} is a single-platform image for {config.platform}, not {opts.platform}")
    return _image(ref, store, manifest, config, index)


def _image(ref: Reference, store: Store, manifest: Manifest, config: ImageConfig, index: Index | None) -> Image:
    layers = [Layer(d, (lambda dg=d.digest: store.open_blob(dg)), i) for i, d in enumerate(manifest.layers)]
    return Image(str(ref), manifest, config, layers, index=index, source="docker",
                 index_cache=str(store.root / "index-cache"))
