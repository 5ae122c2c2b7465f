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

from ..errors import CorruptInput, HpcconvError, NetworkError, SourceError
from ..image import (DOCKER_LAYER_FOREIGN, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST, SCHEMA1_TYPES,
                     Descriptor, Image, ImageConfig, Index, Layer, Manifest, Platform, check_digest, digest_bytes,
                     host_platform, manifest_kind, parse_json, verify_bytes)
from ..reference import Reference, parse
from ..registry.client import MAX_MANIFEST, RegistryClient, _Cancelled
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
        client = RegistryClient(ref, insecure=opts.insecure, ca_cert=opts.ca_cert, username=opts.username,
                                password=opts.password, warn=lambda m: opts.reporter.log("warning", m))
        keep = False
        try:
            img = pull(client, ref, store, want, opts)
            keep = img.downloads is not None        # then the downloads own the client
            return img
        finally:
            if not keep:
                client.close()
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
    # with stream_layers the config comes first (the platform is checked before any layer is fetched)
    download_all(client, store, [manifest.config] + ([] if opts.stream_layers else manifest.layers), opts)
    config = ImageConfig.parse(store.read_blob(manifest.config.digest, MAX_CONFIG))
    if opts.platform is not None and index is None and not config.platform.matches(opts.platform):
        raise SourceError(f"{ref} is a single-platform image for {config.platform}, not {opts.platform}")
    store.put_bytes(manifest.raw, manifest_digest)
    top = Descriptor(_media_type(top_raw, top_ct, kind), top_digest, len(top_raw))
    if index is not None:
        store.put_bytes(top_raw, top_digest)
    downloads = None
    if opts.stream_layers:
        # the tag is recorded once every layer is in: a tag always names a complete image
        downloads = Downloads(client, store, manifest.layers, opts, lambda: store.tag(ref.canonical(), top))
        if not downloads.pending:
            downloads.finish()
            downloads = None
    else:
        store.tag(ref.canonical(), top)
    return _image(ref, store, manifest, config, index, downloads)


def _check_layers(manifest: Manifest) -> None:
    for layer in manifest.layers:
        if layer.media_type == DOCKER_LAYER_FOREIGN:
            raise SourceError(f"layer {layer.digest} is a Windows foreign layer; only Linux images can be converted")


def _fetcher(client: RegistryClient, store: Store, opts: SourceOptions, stop: threading.Event):
    def one(d: Descriptor) -> None:
        task = opts.reporter.task(d.hex[:12], total=d.size)
        client.download_blob(d, store, task, cancelled=stop.is_set)
        task.done()
    return one


def _todo(store: Store, descs: list[Descriptor]) -> dict[str, Descriptor]:
    todo: dict[str, Descriptor] = {}
    for d in descs:
        if d.digest not in todo and not store.has(d.digest):
            todo[d.digest] = d
    return todo


def _errors(futures) -> list[BaseException]:
    """The errors of finished downloads, in the order given (those stopped by a cancel left out: the
    error that made us cancel them is the one to report)."""
    return [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None
            and not isinstance(f.exception(), _Cancelled)]


def _first_error(errors: list[BaseException]) -> BaseException | None:
    corrupt = [e for e in errors if isinstance(e, CorruptInput)]
    return (corrupt or errors or [None])[0]


def _stop_all(ex: ThreadPoolExecutor, futures, stop: threading.Event, timeout: float | None = 5) -> None:
    """Running downloads stop at their next chunk (their partial files stay for a resume), queued
    ones never start."""
    stop.set()
    for f in futures:
        f.cancel()
    wait(futures, timeout=timeout)
    ex.shutdown(wait=False, cancel_futures=True)


def download_all(client: RegistryClient, store: Store, descs: list[Descriptor], opts: SourceOptions) -> None:
    """Download blobs in parallel (opts.max_workers); the first error cancels the rest."""
    todo = _todo(store, descs)
    if not todo:
        return
    stop = threading.Event()
    one = _fetcher(client, store, opts, stop)
    with ThreadPoolExecutor(max_workers=max(1, opts.max_workers), thread_name_prefix="blob") as ex:
        futures = [ex.submit(one, d) for d in todo.values()]
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # Ctrl-C (or any other abort): give the downloads a moment to stop, then go
            _stop_all(ex, futures, stop)
            raise
        errors = _errors(done)
        if errors:
            _stop_all(ex, pending, stop, timeout=None)
            raise _first_error(errors + _errors(pending))


class Downloads:
    """Layer blobs downloading (in parallel, the top layer first) while the image is already read: a
    layer's opener waits for its own blob and fails with the first download error, whichever blob
    it was (a corrupt blob first). `finish` waits for the rest, closes the client and records the
    tag; `abort` stops them (partial files stay for a resume). Either must be called: the
    pipeline's conversions do (`pipeline.downloads_of`)."""

    def __init__(self, client: RegistryClient, store: Store, descs: list[Descriptor], opts: SourceOptions,
                 on_complete):
        self._client, self._on_complete, self._reporter = client, on_complete, opts.reporter
        self._stop = threading.Event()
        todo = _todo(store, descs)
        self.pending = len(todo)
        self._ex = ThreadPoolExecutor(max_workers=max(1, opts.max_workers), thread_name_prefix="blob")
        one = _fetcher(client, store, opts, self._stop)
        # top layer first: the order the single-pass flatten reads them
        self._futures = {dg: self._ex.submit(one, d) for dg, d in reversed(list(todo.items()))}
        self._closed = False

    def wait(self, digest: str) -> None:
        while not self.poll(digest, 0.1):
            pass

    def poll(self, digest: str, timeout: float) -> bool:
        """Whether the blob is complete in the store, waiting up to `timeout` for it; raises the
        first download error (any blob's, a corrupt one first)."""
        f = self._futures.get(digest)
        if f is None:
            return True
        if not f.done():
            err = _first_error(_errors(self._futures.values()))
            if err is not None:
                raise err
            wait([f], timeout=timeout)
            if not f.done():
                return False
        err = _first_error(_errors([f]) + _errors(self._futures.values()))
        if err is not None:
            raise err
        return True

    def finish(self) -> None:
        if self._closed:
            return
        futures = list(self._futures.values())
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            self.abort()
            raise
        errors = _errors(done)
        if errors:
            self.abort()
            raise _first_error(errors + _errors(pending))
        self._closed = True
        self._ex.shutdown(wait=True)
        self._client.close()
        try:
            self._on_complete()
        except (HpcconvError, OSError) as e:     # the image was read in full: only the tag is missing
            self._reporter.log("warning", f"the store could not record the tag: {e}")

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        _stop_all(self._ex, list(self._futures.values()), self._stop)
        self._client.close()


class _Following:
    """A layer blob read while it downloads: from the store's partial file as it grows, then from
    the published blob. Nothing read here is trusted yet: the caller's VerifyingReader checks the
    size and digest of all it read when it reaches the end, as for a complete blob, and the
    download's own check fails the conversion too (`Downloads.poll` raises its error). A partial
    file that is truncated and written again (the server ignored a Range) holds the same bytes
    again, since a blob is its digest: the reader waits until they are back. A download that starts
    over in a new file is followed by reopening once the blob is published.

    When this process's download of the blob already holds its lock (store.BlobWriter), the reader
    `vouchable`: it reads that writer's file only, and `vouch()` says whether the download verified
    exactly the bytes read here (the writer's `generation` never changed, and it committed), so the
    caller need not hash them a second time; `changed()` says early that it will not."""

    MIN_PIECE = 1 << 20          # hand on less only at the end: every read costs the reader a GIL re-take

    def __init__(self, downloads: "Downloads", store: Store, digest: str, size: int):
        self._dl, self._store, self._digest, self._size = downloads, store, digest, size
        algo, hexd = check_digest(digest)
        self._partial = store.root / "tmp" / f"{algo}-{hexd}.partial"
        self._fd: int | None = None
        self._pos = 0
        self._writer = store.writing(digest)
        if self._writer is not None:
            self._gen = self._writer.generation
            try:
                self._fd = os.open(self._writer.partial, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:                      # (dropped meanwhile: read as any other follower)
                self._writer = None

    @property
    def vouchable(self) -> bool:
        return self._writer is not None

    def changed(self) -> bool:
        """The download started over since this reader was opened: what it read may not be the blob."""
        return self._writer.generation != self._gen

    def vouch(self) -> bool:
        """Whether the download verified exactly the bytes read here, all of them (waits for it;
        raises its error)."""
        self._dl.wait(self._digest)
        w = self._writer
        return w.committed and w.generation == self._gen and self._pos == self._size

    def _open(self, final: bool) -> None:
        paths = [self._store.blob_path(self._digest)] + ([] if final else [self._partial])
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            return

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        parts: list[bytes] = []
        got = 0
        while True:
            if self._fd is None:
                self._open(False)
            if self._fd is not None:
                data = os.pread(self._fd, n - got, self._pos + got)
                if data:
                    parts.append(data)
                    got += len(data)
            if got >= min(n, self.MIN_PIECE) or (self._writer is not None and self.changed()):
                break
            if self._dl.poll(self._digest, 0.002):
                # complete: read the rest from the published blob (a restarted download may have
                # written it to another file than the one followed so far; a vouching reader stays
                # with its writer's file, published under the blob's name now)
                if self._writer is None:
                    self._open(True)
                if self._fd is None:
                    raise SourceError(f"blob {self._digest} is missing from the store after its download")
                while got < n:
                    data = os.pread(self._fd, n - got, self._pos + got)
                    if not data:
                        break                    # shorter than declared: the VerifyingReader says so
                    parts.append(data)
                    got += len(data)
                break
        self._pos += got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


def _image(ref: Reference, store: Store, manifest: Manifest, config: ImageConfig, index: Index | None,
           downloads: "Downloads | None" = None) -> Image:
    follow = os.environ.get("HPCCONV_FOLLOW_DOWNLOADS", "1") != "0"

    def opener(d: Descriptor):
        if downloads is None:
            return lambda: store.open_blob(d.digest)

        def wait_then_open():
            if follow and d.size > 0:
                return _Following(downloads, store, d.digest, d.size)   # read as it arrives
            downloads.wait(d.digest)
            return store.open_blob(d.digest)
        return wait_then_open

    layers = [Layer(d, opener(d), i) for i, d in enumerate(manifest.layers)]
    return Image(str(ref), manifest, config, layers, index=index, source="docker",
                 index_cache=str(store.root / "index-cache"), downloads=downloads)
