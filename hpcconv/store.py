"""Content-addressed blob store laid out as an OCI image layout.

    $HPCCONV_STORE (default $XDG_CACHE_HOME/hpcconv/store)
      oci-layout                 {"imageLayoutVersion": "1.0.0"}
      index.json                 one entry per reference pulled (annotation org.opencontainers.image.ref.name)
      blobs/<algo>/<hex>         verified blobs only
      tmp/                       partial downloads: <algo>-<hex>.partial (+ .lock), resumable
      locks/                     index.json lock
      leases/                    one file per live process that uses the store (see below)
      index-cache/<algo>/        flatten's per-layer header indexes and diff_id records (flatten.py),
                                 the ELF findings of each layer's files (rewrite/elfcache.py)
      block-reuse/<settings>/    where earlier SquashFS images keep their compressed blocks (emit/sqfs.py)

Rules: a blob reaches `blobs/` only after its full content matched its digest (write to a temp
file, fsync, rename). Several processes may share the store: renames are atomic, a partial download
is owned by whoever holds its `flock`, index.json updates happen under a lock and are written
atomically. Disk full (ENOSPC/EDQUOT) is a one-line StoreError and leaves no partial file behind.

Garbage collection (`hpcconv store gc`, store_maint.py) and live processes: every `has(digest)` a
process makes records the digest in that process's lease file (`leases/<host>-<pid>-<rand>`, held
with an exclusive flock until the process exits), under a shared flock on `locks/gc.lock`. gc holds
that lock exclusively while it reads index.json and the live leases and deletes, so a blob a running
pull or conversion has looked at is never removed under it; a lease whose flock gc can take belongs
to a dead process and is removed. Lock files are re-checked after locking (same inode as the path),
so gc may delete stale ones safely.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import CorruptInput, HpcconvError
from .image import Descriptor, check_digest, digest_bytes, hasher_for

REF_ANNOTATION = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20


def default_store_path() -> Path:
    if os.environ.get("HPCCONV_STORE"):
        return Path(os.environ["HPCCONV_STORE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "hpcconv" / "store"


class StoreError(HpcconvError):
    exit_code = 3


def _lock_fd(path: Path, blocking: bool = True, shared: bool = False) -> int | None:
    """An fd holding a flock on `path` (created if needed), or None (non-blocking, busy). After the
    lock is taken the path must still name the locked inode: someone (gc) may have removed the file
    while we waited, and a lock on an unlinked inode protects nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True, shared: bool = False) -> Iterator[bool]:
    fd = _lock_fd(path, blocking, shared)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


class _Lease:
    """This process's lease on one store: digests it has looked at (gc keeps them while we live)."""

    def __init__(self, root: Path):
        import secrets
        import socket

        self.root = root
        self.seen: set[str] = set()
        d = root / "leases"
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd = _lock_fd(self.path)
        self.pid = os.getpid()
        import atexit

        atexit.register(self.close)

    def close(self) -> None:
        """At a normal exit the lease goes; after a kill it stays until `store gc` finds it unlocked."""
        if self.fd is not None and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None

    def add(self, digest: str) -> None:
        if digest in self.seen or self.fd is None:
            return
        os.write(self.fd, (digest + "\n").encode())
        self.seen.add(digest)


_LEASES: dict[str, _Lease] = {}
_LEASE_LOCK = __import__("threading").Lock()


def _lease(root: Path, digest: str) -> None:
    """Record `digest` in this process's lease under a shared gc lock (see the module notes)."""
    key = str(root)
    try:
        with _LEASE_LOCK:
            lease = _LEASES.get(key)
            if lease is None or lease.pid != os.getpid():      # a forked child takes its own lease
                lease = _LEASES[key] = _Lease(root)
            if digest in lease.seen:
                return
            with _flock(root / "locks" / "gc.lock", shared=True):
                lease.add(digest)
    except OSError:
        pass          # a read-only store cannot be collected by us either: nothing to protect


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and _disk_full(e):
            raise StoreError(f"disk full while writing {path}",
                             hint="free space or point HPCCONV_STORE (--store) at a larger file system") from None
        raise


class BlobWriter:
    """Write one blob into the store: append to a partial file, verify, then publish atomically.

    Use as a context manager. `offset` is how many bytes of a previous partial download are kept
    (resume with HTTP Range from there); call `restart()` if the server ignored the range.

    While it holds the blob's lock, the writer is `Store.writing(digest)` to this process: a reader
    that follows the partial file as it grows (sources/registry.py) may take this writer's check
    for its own. The file only grows, and every byte in it is hashed by this writer (the kept
    prefix when the lock was taken, then each write), so bytes read from it while `generation`
    stays the same are the bytes `commit` verifies; `restart` and `discard` change `generation`
    first, before any byte is dropped."""

    def __init__(self, store: "Store", digest: str, size: int | None):
        self.store, self.digest, self.size = store, digest, size
        algo, hexd = check_digest(digest)
        self.partial = store.root / "tmp" / f"{algo}-{hexd}.partial"
        self._lockfile = store.root / "tmp" / f"{algo}-{hexd}.lock"
        self._lock_cm = None
        self._f: BinaryIO | None = None
        self._h = hasher_for(digest)
        self.offset = 0
        self.written = 0
        self.generation = 0
        self.committed = False

    def __enter__(self) -> "BlobWriter":
        self._lock_cm = _flock(self._lockfile)
        self._lock_cm.__enter__()  # blocks while another process downloads the same blob
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.partial, "ab+")
        self._f.seek(0)
        # re-hash what a previous (interrupted) run left, so a resumed download is verified whole
        while True:
            chunk = self._f.read(CHUNK)
            if not chunk:
                break
            self._h.update(chunk)
            self.offset += len(chunk)
        if self.size is not None and self.offset > self.size:
            self.restart()
        self.store._writing[self.digest] = self
        return self

    @property
    def already_present(self) -> bool:
        return self.store.has(self.digest)

    def restart(self) -> None:
        assert self._f is not None
        self.generation += 1
        self._f.seek(0)
        self._f.truncate()
        self._h = hasher_for(self.digest)
        self.offset = 0
        self.written = 0

    def write(self, data: bytes) -> None:
        assert self._f is not None
        if self.size is not None and self.offset + self.written + len(data) > self.size:
            raise CorruptInput(f"blob {self.digest} is larger than its declared size {self.size}")
        try:
            self._f.write(data)
        except OSError as e:
            self._full(e)
        self._h.update(data)
        self.written += len(data)

    def _full(self, e: OSError):
        """Disk full: drop the partial file (it only takes space) and say so in one line."""
        if not _disk_full(e):
            raise e
        self.discard()
        raise StoreError(f"disk full while writing blob {self.digest} into {self.store.root}",
                         hint="free space or point HPCCONV_STORE (--store) at a larger file system") from None

    def commit(self) -> Path:
        """Verify and publish. On mismatch the partial file is deleted and CorruptInput raised."""
        assert self._f is not None
        total = self.offset + self.written
        got = f"{self.digest.split(':', 1)[0]}:{self._h.hexdigest()}"
        if (self.size is not None and total != self.size) or got != self.digest:
            self.discard()
            if self.size is not None and total != self.size:
                raise CorruptInput(f"blob {self.digest}: got {total} bytes, expected {self.size}")
            raise CorruptInput(f"blob {self.digest} does not match its content (got {got})")
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            dest = self.store.blob_path(self.digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._full(e)
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, dest)
        self.committed = True
        return dest

    def discard(self) -> None:
        self.generation += 1
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass            # its buffer could not be flushed (disk full): the file goes anyway
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)

    def __exit__(self, exc_type, exc, tb):
        try:
            if self._f is not None:
                # interrupted: keep the partial bytes for a resume unless they were proven wrong
                if isinstance(exc, CorruptInput) or self.offset + self.written == 0:
                    self.discard()          # proven wrong, or nothing worth keeping (e.g. another
                                            # process published the blob while we waited for the lock)
                else:
                    try:
                        self._f.close()
                    except OSError:
                        self.discard()      # could not flush what we kept: do not leave a torn prefix
                    self._f = None
        finally:
            if self.store._writing.get(self.digest) is self:
                del self.store._writing[self.digest]
            # the lock file is only a mutex: remove it while we hold it (a waiter re-checks the inode)
            with contextlib.suppress(OSError):
                os.unlink(self._lockfile)
            self._lock_cm.__exit__(None, None, None)


@dataclass
class Store:
    root: Path
    # the blobs this process is writing now, by digest (BlobWriter)
    _writing: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Store":
        root = Path(path) if path else default_store_path()
        try:
            (root / "blobs").mkdir(parents=True, exist_ok=True)
            (root / "tmp").mkdir(exist_ok=True)
            if not (root / "oci-layout").exists():
                _write_atomic(root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            if not (root / "index.json").exists():
                with _flock(root / "locks" / "index.lock"):
                    if not (root / "index.json").exists():
                        _write_atomic(root / "index.json", _empty_index())
        except OSError as e:
            raise StoreError(f"cannot use store {root}: {e.strerror or e}",
                             hint="set HPCCONV_STORE to a writable directory") from None
        return cls(root)

    # blobs ------------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        algo, hexd = check_digest(digest)
        return self.root / "blobs" / algo / hexd

    def has(self, digest: str) -> bool:
        """Whether the blob is in the store. Also leases it to this process (gc keeps it for us)."""
        path = self.blob_path(digest)
        _lease(self.root, digest)
        return path.is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store {self.root}") from None

    def read_blob(self, digest: str, limit: int | None = None) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise CorruptInput(f"blob {digest} is larger than the {limit}-byte limit")
        return data

    def writer(self, digest: str, size: int | None = None) -> BlobWriter:
        return BlobWriter(self, digest, size)

    def writing(self, digest: str) -> BlobWriter | None:
        """The writer of this process holding the blob's lock now, if any (see BlobWriter)."""
        return self._writing.get(digest)

    def put_bytes(self, data: bytes, digest: str | None = None) -> str:
        digest = digest or digest_bytes(data)
        if self.has(digest):
            return digest
        with self.writer(digest, len(data)) as w:
            if self.has(digest):
                return digest
            w.restart()
            w.write(data)
            w.commit()
        return digest

    def put_stream(self, stream: BinaryIO, digest: str, size: int | None = None, progress=None) -> Path:
        """Copy a stream into the store, verifying it against `digest` (and `size` if known)."""
        if self.has(digest):
            return self.blob_path(digest)
        with self.writer(digest, size) as w:
            if self.has(digest):
                return self.blob_path(digest)
            w.restart()
            try:
                while True:
                    chunk = stream.read(CHUNK)
                    if not chunk:
                        break
                    w.write(chunk)
                    if progress is not None:
                        progress.advance(len(chunk))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    w.discard()
                    raise StoreError(f"disk full while writing blob {digest} into {self.root}") from None
                raise
            return w.commit()

    # references ------------------------------------------------------------------------------------
    def _read_index(self) -> dict:
        try:
            return json.loads((self.root / "index.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return json.loads(_empty_index())

    def tag(self, ref: str, desc: Descriptor) -> None:
        """Record `ref` -> manifest/index descriptor in index.json (replacing an older entry)."""
        with _flock(self.root / "locks" / "index.lock"):
            idx = self._read_index()
            entries = [m for m in idx.get("manifests", [])
                       if (m.get("annotations") or {}).get(REF_ANNOTATION) != ref]
            d = desc.to_json()
            d.setdefault("annotations", {})[REF_ANNOTATION] = ref
            entries.append(d)
            idx["manifests"] = entries
            _write_atomic(self.root / "index.json", json.dumps(idx, indent=2, sort_keys=True).encode())

    def resolve(self, ref: str) -> Descriptor | None:
        for m in self._read_index().get("manifests", []):
            if (m.get("annotations") or {}).get(REF_ANNOTATION) == ref:
                return Descriptor.from_json(m)
        return None

    def refs(self) -> dict[str, Descriptor]:
        out = {}
        for m in self._read_index().get("manifests", []):
            name = (m.get("annotations") or {}).get(REF_ANNOTATION)
            if name:
                out[name] = Descriptor.from_json(m)
        return out


def _empty_index() -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": []}).encode()
