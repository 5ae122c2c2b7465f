"""Small typed OCI/Docker image models of our own, and the Image every source produces.

Data flows one way: a source builds an :class:`Image` (manifest, config, ordered layers, each layer
able to open its blob as a verified byte stream); flatten, rewrite passes and emitters consume it.
Nothing here talks to the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from .errors import CorruptInput, SourceError, UsageError

# Media types -------------------------------------------------------------------------------------
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
SCHEMA1_TYPES = (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED)
MANIFEST_ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

_DIGEST_RE = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
_ALGOS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def check_digest(digest: str) -> tuple[str, str]:
    """Validate a digest string and return (algorithm, hex). Raises CorruptInput naming the digest."""
    if not isinstance(digest, str):
        raise CorruptInput(f"malformed digest {digest!r}")
    m = _DIGEST_RE.fullmatch(digest)
    if not m:
        algo = digest.split(":", 1)[0] if ":" in digest else ""
        if algo and re.fullmatch(r"[a-z0-9]+([+._-][a-z0-9]+)*", algo) and algo not in _ALGOS:
            raise CorruptInput(f"unsupported digest algorithm {algo!r} in {digest[:80]!r}",
                               hint="hpcconv verifies sha256 and sha512 digests only")
        raise CorruptInput(f"malformed digest {digest[:80]!r}")
    algo = m.group(1) or m.group(3)
    return algo, m.group(2) or m.group(4)


def hasher_for(digest: str):
    algo, _ = check_digest(digest)
    return _ALGOS[algo]()


class _HashWorker:
    """One background thread that runs hash updates handed to it, in the order handed (FIFO, one
    thread: each hasher sees its pieces in order). A layer's decoder thread hands its two hashes
    (the blob digest of the compressed bytes, the diff_id of the decoded ones) here instead of
    running them between its decompression calls: decompression is the serial chain a conversion
    waits on when little else is left to do (a warm conversion: 0.2 s of sha256 out of 1.7 s).

    Nothing waits for a hash until its layer ends, so the thread runs at the lowest priority (nice
    19) and may lag the decoder by DEPTH pieces: it hashes when the conversion's other threads leave
    a vCPU idle (on two vCPUs about 14 % of a cold conversion, mostly while the main thread alone
    sets the pace) instead of taking turns with the decoder and the compressors. Cold benchmark
    image, interleaved: 2.5 % faster (3 runs of 6-8 pairs; the deeper lag alone gains nothing),
    warm unchanged; peak RSS 210-220 MiB as before, though the lag may hold up to 24 MiB more (six
    more pieces of at most compression.CHUNK, 4 MiB) when hashing falls behind."""

    DEPTH = 8               # pieces waiting (bounded memory: the decoder waits when the hashing lags)

    def __init__(self):
        self._q: queue.Queue = queue.Queue(self.DEPTH)
        self._start = threading.Lock()
        self._t = None

    def put(self, item) -> None:
        if self._t is None:
            with self._start:
                if self._t is None:
                    self._t = threading.Thread(target=self._run, name="hpcconv-hash", daemon=True)
                    self._t.start()
        self._q.put(item)

    def _run(self) -> None:
        if sys.platform.startswith("linux"):     # (there a thread id renices that thread alone)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while True:
            owner, data = self._q.get()
            if data is None:
                owner.set()                           # a flush marker: all before it is done
                continue
            try:
                if owner.error is None:
                    owner.h.update(data)
            except BaseException as e:                # (raised by the owner's digest call)
                owner.error = e


_HASH_WORKER = _HashWorker()


class OffloadedHash:
    """A hashlib object whose updates run on the background hash thread (`_HashWorker`); the
    digest waits for the updates handed over before it. A piece that is not bytes is copied
    first (a caller's buffer may be reused)."""

    def __init__(self, h):
        self.h, self.error = h, None

    def update(self, data) -> None:
        if data:
            _HASH_WORKER.put((self, data if isinstance(data, bytes) else bytes(data)))

    def hexdigest(self) -> str:
        done = threading.Event()
        _HASH_WORKER.put((done, None))
        done.wait()
        if self.error is not None:
            raise self.error
        return self.h.hexdigest()


def digest_bytes(data: bytes, algo: str = "sha256") -> str:
    return f"{algo}:{_ALGOS[algo](data).hexdigest()}"


def verify_bytes(data: bytes, digest: str, what: str = "blob") -> None:
    h = hasher_for(digest)
    h.update(data)
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise CorruptInput(f"{what} {digest} does not match its content (got {got})")


# Platforms ---------------------------------------------------------------------------------------
_ARCH_ALIASES = {
    "x86_64": "amd64", "x86-64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "armhf": "arm", "armel": "arm", "arm": "arm",
    "i386": "386", "i686": "386", "386": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """Parse `os/arch[/variant]` or `arch[/variant]` (containerd spelling and common aliases)."""
        parts = [p for p in text.strip().lower().split("/")]
        if not parts or not all(parts) or len(parts) > 3:
            raise UsageError(f"bad platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/arm64")
        if parts[0] in _ARCH_ALIASES and len(parts) <= 2:
            parts = ["linux"] + parts
        if len(parts) < 2:
            raise UsageError(f"bad platform {text!r}", hint="use OS/ARCH[/VARIANT], e.g. linux/arm64")
        os_, arch = parts[0], parts[1]
        variant = parts[2] if len(parts) == 3 else ""
        return cls(os_, arch, variant).normalized()

    @classmethod
    def from_json(cls, obj: dict | None) -> "Platform | None":
        if not isinstance(obj, dict) or not obj.get("architecture"):
            return None
        return cls(str(obj.get("os") or "linux"), str(obj["architecture"]),
                   str(obj.get("variant") or "")).normalized()

    def normalized(self) -> "Platform":
        """containerd's normalisation: aarch64 = arm64, arm64/v8 = arm64, x86_64 = amd64, arm = arm/v7."""
        arch = _ARCH_ALIASES.get(self.architecture.lower(), self.architecture.lower())
        variant = self.variant.lower()
        if arch == "arm64" and variant in ("v8", "8"):
            variant = ""
        elif arch == "amd64" and variant in ("v1", "1"):
            variant = ""
        elif arch == "arm" and not variant:
            variant = "v7"
        elif arch == "arm" and variant.isdigit():
            variant = "v" + variant
        return Platform(self.os.lower(), arch, variant)

    def matches(self, other: "Platform") -> bool:
        a, b = self.normalized(), other.normalized()
        return a.os == b.os and a.architecture == b.architecture and a.variant == b.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def to_json(self) -> dict:
        out = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            out["variant"] = self.variant
        return out


def host_platform() -> Platform:
    import os as _os
    return Platform("linux", _os.uname().machine).normalized()


# Descriptors, manifests, indexes ----------------------------------------------------------------
@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str = ""

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> "Descriptor":
        if not isinstance(obj, dict):
            raise CorruptInput(f"{what} is not a JSON object")
        digest = obj.get("digest")
        check_digest(digest)
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptInput(f"{what} {digest} has an invalid size {size!r}")
        ann = obj.get("annotations") or {}
        return cls(
            media_type=str(obj.get("mediaType") or ""),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {},
            platform=Platform.from_json(obj.get("platform")),
            urls=tuple(obj.get("urls") or ()),
            artifact_type=str(obj.get("artifactType") or ""),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            out["platform"] = self.platform.to_json()
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.urls:
            out["urls"] = list(self.urls)
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]


def parse_json(raw: bytes, what: str) -> dict:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptInput(f"{what} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CorruptInput(f"{what} is not a JSON object")
    return obj


def manifest_kind(obj: dict, content_type: str = "") -> str:
    """Return 'index', 'manifest' or raise for schema1 / unknown documents."""
    mt = obj.get("mediaType") or content_type.split(";")[0].strip()
    if mt in SCHEMA1_TYPES or obj.get("schemaVersion") == 1:
        raise SourceError("image uses the Docker schema 1 manifest format, which is unsupported",
                          hint="re-push the image with a current Docker or skopeo to get a schema 2/OCI manifest")
    if mt in INDEX_TYPES or (not mt and "manifests" in obj):
        return "index"
    if mt in MANIFEST_TYPES or (not mt and "layers" in obj):
        return "manifest"
    raise SourceError(f"unsupported manifest media type {mt!r}")


@dataclass
class Index:
    raw: bytes
    media_type: str
    manifests: list[Descriptor]

    @classmethod
    def parse(cls, raw: bytes, content_type: str = "") -> "Index":
        obj = parse_json(raw, "image index")
        items = obj.get("manifests")
        if not isinstance(items, list):
            raise CorruptInput("image index has no manifests list")
        return cls(raw, obj.get("mediaType") or content_type or OCI_INDEX,
                   [Descriptor.from_json(m, "index entry") for m in items])

    def platforms(self) -> list[Platform]:
        return [d.platform for d in self.image_entries() if d.platform]

    def image_entries(self) -> list[Descriptor]:
        """Entries that are runnable images: attestation manifests (buildx `unknown/unknown`,
        `vnd.docker.reference.type: attestation-manifest`) and artifacts are skipped."""
        out = []
        for d in self.manifests:
            if d.annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                continue
            if d.platform and (d.platform.os == "unknown" or d.platform.architecture == "unknown"):
                continue
            if d.media_type and d.media_type not in INDEX_TYPES + MANIFEST_TYPES:
                continue
            out.append(d)
        return out

    def select(self, want: Platform) -> Descriptor:
        """containerd's matching: exact os/arch/variant after normalisation; for arm64 and amd64 a
        missing variant matches the default one; fall back to a lower arm variant for arm/vN."""
        entries = self.image_entries()
        want = want.normalized()
        for d in entries:
            if d.platform and d.platform.matches(want):
                return d
        if want.architecture == "arm" and want.variant[1:].isdigit():
            for v in range(int(want.variant[1:]) - 1, 4, -1):
                for d in entries:
                    if d.platform and d.platform.matches(Platform(want.os, "arm", f"v{v}")):
                        return d
        avail = ", ".join(str(p) for p in (d.platform for d in entries) if p) or "none"
        raise SourceError(f"no image for platform {want} in the index (available: {avail})",
                          hint="choose one of the available platforms with --platform")


@dataclass
class Manifest:
    raw: bytes
    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes, content_type: str = "") -> "Manifest":
        obj = parse_json(raw, "image manifest")
        manifest_kind(obj, content_type)
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise CorruptInput("image manifest has no layers list")
        # an empty list is an empty root file system: Docker loads and runs such images (FROM
        # scratch with only metadata); flatten reports it
        return cls(raw, obj.get("mediaType") or content_type or OCI_MANIFEST,
                   Descriptor.from_json(obj.get("config"), "config descriptor"),
                   [Descriptor.from_json(l, f"layer {i + 1}") for i, l in enumerate(layers)],
                   obj.get("annotations") or {})

    @property
    def digest(self) -> str:
        return digest_bytes(self.raw)


@dataclass
class ImageConfig:
    raw: bytes
    data: dict

    @classmethod
    def parse(cls, raw: bytes) -> "ImageConfig":
        return cls(raw, parse_json(raw, "image config"))

    @property
    def config(self) -> dict:
        c = self.data.get("config") or {}
        return c if isinstance(c, dict) else {}

    @property
    def platform(self) -> Platform:
        return Platform(str(self.data.get("os") or "linux"), str(self.data.get("architecture") or "amd64"),
                        str(self.data.get("variant") or "")).normalized()

    @property
    def env(self) -> list[str]:
        return [str(e) for e in (self.config.get("Env") or [])]

    @property
    def entrypoint(self) -> list[str]:
        return [str(e) for e in (self.config.get("Entrypoint") or [])]

    @property
    def cmd(self) -> list[str]:
        return [str(e) for e in (self.config.get("Cmd") or [])]

    @property
    def workdir(self) -> str:
        return str(self.config.get("WorkingDir") or "")

    @property
    def labels(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.config.get("Labels") or {}).items()}

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.data.get("rootfs") or {}
        return [str(d) for d in (rootfs.get("diff_ids") or [])]


# The Image every source returns ------------------------------------------------------------------
Opener = Callable[[], BinaryIO]


@dataclass
class Layer:
    """One layer: its descriptor and a function opening the *compressed* blob as a stream.

    Streams returned by `open` are verified against `descriptor.digest` as they are read and raise
    CorruptInput at end of stream on a mismatch (see `VerifyingReader`)."""

    descriptor: Descriptor
    open: Opener
    index: int = 0

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type


@dataclass
class Image:
    reference: str               # what the user named, for messages and reports
    manifest: Manifest
    config: ImageConfig
    layers: list[Layer]
    index: Index | None = None   # the index/list this image was chosen from, if any
    source: str = ""             # transport name: docker, docker-daemon, docker-archive, oci, bundle
    index_cache: str | None = None   # directory of per-layer header indexes (the store's), see flatten
    downloads: object | None = None  # layer blobs still downloading (sources.registry.Downloads), if any

    @property
    def platform(self) -> Platform:
        return self.config.platform

    @property
    def digest(self) -> str:
        return self.manifest.digest


class VerifyingReader:
    """Wrap a binary stream; hash what is read and check size and digest at EOF.

    Raises CorruptInput when the stream is longer or shorter than `size` or the digest differs.
    With `offload`, the hashing runs on the background hash thread (`OffloadedHash`)."""

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, what: str = "blob", offload: bool = False):
        self._raw = raw
        self._digest = digest
        self._h = OffloadedHash(hasher_for(digest)) if offload else hasher_for(digest)
        self._size = size
        self._n = 0
        self._what = what
        self.verified = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n) if n is not None and n >= 0 else self._raw.read()
        if data:
            self._n += len(data)
            if self._size is not None and self._n > self._size:
                raise CorruptInput(f"{self._what} {self._digest} is larger than its declared size {self._size}")
            self._h.update(data)
        elif not self.verified and (n is None or n != 0):
            self._finish()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _finish(self) -> None:
        if self._size is not None and self._n != self._size:
            raise CorruptInput(f"{self._what} {self._digest} is truncated: {self._n} of {self._size} bytes")
        self._check()
        self.verified = True

    def _check(self) -> None:
        """At the end, all bytes read and counted: are they the blob?"""
        got = f"{self._digest.split(':', 1)[0]}:{self._h.hexdigest()}"
        if got != self._digest:
            raise CorruptInput(f"{self._what} {self._digest} does not match its content (got {got})")

    def close(self) -> None:
        self._raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
