"""Store maintenance: `verify` (re-hash every blob, check every reference) and `gc` (remove what
nothing references, reclaim what dead processes left behind, drop flatten's index-cache entries of
blobs that are gone).

gc protocol (see store.py): gc holds `locks/gc.lock` exclusively while it decides and deletes. Live
processes record every digest they look at in their lease file under a shared lock on it, so gc
either runs before they look (they then download the blob again) or sees their lease (and keeps the
blob). Leases whose flock gc can take belong to dead processes and are removed. On top of that gc
never removes a blob, partial download or temporary file younger than `grace` seconds: file
systems whose flock is not coherent across nodes still get a safety margin.

Roots: every descriptor in index.json (followed through indexes to manifests, configs and layers)
and every digest in a live lease (followed the same way when it is a manifest or index).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorruptInput
from .image import INDEX_TYPES, check_digest
from .store import REF_ANNOTATION, Store, _flock, _lock_fd

CHUNK = 1 << 20
MAX_DOC = 8 << 20
DEFAULT_GRACE = 600.0                 # seconds: blobs and temporaries younger than this are kept
DEFAULT_PARTIAL_GRACE = 24 * 3600.0   # an unlocked partial download is kept this long for a resume


def _blobs(store: Store):
    base = store.root / "blobs"
    if not base.is_dir():
        return
    for algo_dir in sorted(base.iterdir()):
        if not algo_dir.is_dir():
            continue
        for p in sorted(algo_dir.iterdir()):
            yield f"{algo_dir.name}:{p.name}", p


def _rehash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return f"{algo}:{h.hexdigest()}"


def _doc(store: Store, digest: str) -> dict | None:
    try:
        p = store.blob_path(digest)
        if not p.is_file() or p.stat().st_size > MAX_DOC:
            return None
        obj = json.loads(p.read_bytes())
    except (OSError, ValueError, CorruptInput):
        return None
    return obj if isinstance(obj, dict) else None


def _children(obj: dict) -> list[dict]:
    """Descriptors a manifest or index points at (config, layers, index entries)."""
    out = []
    if isinstance(obj.get("manifests"), list):
        out += [d for d in obj["manifests"] if isinstance(d, dict)]
    if isinstance(obj.get("config"), dict):
        out.append(obj["config"])
    if isinstance(obj.get("layers"), list):
        out += [d for d in obj["layers"] if isinstance(d, dict)]
    return out                    # a referrer's `subject` is not owned by it: not followed


def _is_index(obj: dict, desc: dict | None = None) -> bool:
    mt = obj.get("mediaType") or (desc or {}).get("mediaType") or ""
    return mt in INDEX_TYPES or ("manifests" in obj and "layers" not in obj)


def _reachable(store: Store, roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        obj = _doc(store, d)
        if obj is None:
            continue
        for c in _children(obj):
            dg = c.get("digest")
            if isinstance(dg, str) and dg not in seen:
                todo.append(dg)
    return seen


def _index_roots(store: Store) -> list[str]:
    try:
        idx = json.loads((store.root / "index.json").read_bytes())
    except (OSError, ValueError):
        return []
    return [m["digest"] for m in idx.get("manifests", []) if isinstance(m, dict) and isinstance(m.get("digest"), str)]


def _leases(store: Store, remove_stale: bool) -> tuple[list[str], int, int]:
    """(digests held by live processes, live lease count, stale leases removed)."""
    held: list[str] = []
    live = stale = 0
    d = store.root / "leases"
    if not d.is_dir():
        return held, 0, 0
    for p in sorted(d.iterdir()):
        fd = _lock_fd(p, blocking=False)
        if fd is None:                       # its owner is alive
            live += 1
            with contextlib.suppress(OSError):
                held += [ln for ln in p.read_text().split() if ln]
            continue
        try:
            if remove_stale:
                with contextlib.suppress(OSError):
                    os.unlink(p)
                stale += 1
        finally:
            os.close(fd)
    return held, live, stale


# verify ------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    blobs: int = 0
    bytes: int = 0
    refs: int = 0
    problems: list[str] = field(default_factory=list)
    partials: int = 0

    def to_json(self) -> dict:
        return {"blobs": self.blobs, "bytes": self.bytes, "refs": self.refs, "partials": self.partials,
                "problems": self.problems, "clean": not self.problems}


def verify(store: Store) -> VerifyReport:
    """Re-hash every blob and check that every reference's manifests, configs and layers are there
    with the sizes their descriptors say. Problems are listed, never repaired."""
    rep = VerifyReport()
    sizes: dict[str, int] = {}
    for name, p in _blobs(store):
        try:
            algo, _ = check_digest(name)
        except CorruptInput:
            rep.problems.append(f"blobs/{name.replace(':', '/')}: not a valid digest name")
            continue
        rep.blobs += 1
        try:
            got = _rehash(p, algo)
            sizes[name] = p.stat().st_size
        except OSError as e:
            rep.problems.append(f"blob {name}: cannot read: {e.strerror or e}")
            continue
        rep.bytes += sizes[name]
        if got != name:
            rep.problems.append(f"blob {name}: content hashes to {got}")
    try:
        idx = json.loads((store.root / "index.json").read_bytes())
        entries = idx.get("manifests", [])
    except (OSError, ValueError) as e:
        rep.problems.append(f"index.json unreadable: {e}")
        entries = []

    def check(desc: dict, what: str, need: bool = True) -> dict | None:
        dg, size = desc.get("digest"), desc.get("size")
        if not isinstance(dg, str):
            rep.problems.append(f"{what}: descriptor without a digest")
            return None
        try:
            check_digest(dg)
        except CorruptInput as e:
            rep.problems.append(f"{what}: {e.message}")
            return None
        if dg not in sizes:
            if need:
                rep.problems.append(f"{what}: blob {dg} is missing")
            return None
        if isinstance(size, int) and size != sizes[dg]:
            rep.problems.append(f"{what}: blob {dg} is {sizes[dg]} bytes, its descriptor says {size}")
        return _doc(store, dg)

    for m in entries:
        if not isinstance(m, dict):
            rep.problems.append("index.json: an entry is not an object")
            continue
        rep.refs += 1
        ref = (m.get("annotations") or {}).get(REF_ANNOTATION, m.get("digest"))
        top = check(m, f"ref {ref}")
        if top is None:
            if m.get("digest") in sizes:
                rep.problems.append(f"ref {ref}: {m.get('digest')} is not a JSON manifest or index")
            continue
        manifests = []
        if _is_index(top, m):
            present = 0
            for c in top.get("manifests") or []:
                # an index pulled for one platform keeps only that platform's manifest: the others
                # are allowed to be absent, but at least one must be here
                child = check(c, f"ref {ref} -> {c.get('digest')}", need=False) if isinstance(c, dict) else None
                if child is not None:
                    present += 1
                    manifests.append((c.get("digest"), child))
            if not present:
                rep.problems.append(f"ref {ref}: no manifest of its index is in the store")
        else:
            manifests.append((m.get("digest"), top))
        for dg, man in manifests:
            if _is_index(man):
                continue                               # nested index: its own entries, checked loosely
            if not isinstance(man.get("config"), dict):
                rep.problems.append(f"ref {ref}: manifest {dg} has no config")
                continue
            check(man["config"], f"ref {ref}: config of {dg}")
            for i, layer in enumerate(man.get("layers") or []):
                if isinstance(layer, dict):
                    check(layer, f"ref {ref}: layer {i + 1} of {dg}")
    rep.partials = len(list((store.root / "tmp").glob("*.partial"))) if (store.root / "tmp").is_dir() else 0
    return rep


# gc ----------------------------------------------------------------------------------------------
@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    freed: int = 0
    kept_young: int = 0
    kept_leased: int = 0
    live_leases: int = 0
    stale_leases: int = 0
    partials_removed: int = 0
    temps_removed: int = 0
    index_cache_removed: int = 0
    block_reuse_removed: int = 0
    dry_run: bool = False

    def to_json(self) -> dict:
        return {"removed": self.removed, "freed_bytes": self.freed, "kept_young": self.kept_young,
                "kept_leased": self.kept_leased, "live_leases": self.live_leases,
                "stale_leases_removed": self.stale_leases, "partials_removed": self.partials_removed,
                "temporaries_removed": self.temps_removed, "index_cache_removed": self.index_cache_removed,
                "block_reuse_removed": self.block_reuse_removed,
                "dry_run": self.dry_run}


def gc(store: Store, grace: float = DEFAULT_GRACE, partial_grace: float = DEFAULT_PARTIAL_GRACE,
       dry_run: bool = False, now: float | None = None) -> GcReport:
    rep = GcReport(dry_run=dry_run)
    now = time.time() if now is None else now
    with _flock(store.root / "locks" / "gc.lock"):
        held, rep.live_leases, rep.stale_leases = _leases(store, remove_stale=not dry_run)
        keep_ref = _reachable(store, _index_roots(store))
        keep_lease = _reachable(store, held) - keep_ref
        for name, p in _blobs(store):
            if name in keep_ref:
                continue
            if name in keep_lease:
                rep.kept_leased += 1
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime < grace:
                rep.kept_young += 1
                continue
            rep.removed.append(name)
            rep.freed += st.st_size
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        rep.partials_removed, rep.temps_removed = _reclaim_tmp(store, now, grace, partial_grace, dry_run)
        rep.index_cache_removed = _prune_index_cache(store, set(rep.removed) if dry_run else set(), now, grace,
                                                     dry_run)
        rep.block_reuse_removed = _prune_block_reuse(store, now, grace, dry_run)
    return rep


def _prune_index_cache(store: Store, gone: set[str], now: float, grace: float, dry_run: bool) -> int:
    """flatten's per-layer header indexes, diff_id records and ELF findings (index-cache/<algo>/
    <hex>.vN.json, <hex>.diff_id, <hex>.elf.json) of blobs no longer in the store, and write
    temporaries older than grace."""
    def stale(algo: str, p: Path) -> bool:
        hexd = p.name.split(".", 1)[0]
        return f"{algo}:{hexd}" in gone or not (store.root / "blobs" / algo / hexd).is_file()
    return _prune_cache_dir(store.root / "index-cache", stale, now, grace, dry_run)


def _prune_block_reuse(store: Store, now: float, grace: float, dry_run: bool) -> int:
    """The SquashFS writer's block-reuse indexes (block-reuse/<settings>/*.idx) whose image is gone
    or was changed, and write temporaries older than grace (emit/sqfs.py BlockReuse)."""
    from .emit.sqfs import BlockReuse

    return _prune_cache_dir(store.root / "block-reuse", lambda _, p: not BlockReuse.still_valid(p), now, grace,
                            dry_run)


def _prune_cache_dir(base: Path, stale, now: float, grace: float, dry_run: bool) -> int:
    """Remove base/<sub>/<file> where stale(sub, path) says so, and the write temporaries (dot
    files) older than grace. Returns how many."""
    n = 0
    if not base.is_dir():
        return 0
    for sub in base.iterdir():
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            try:
                temporary = p.name.startswith(".")
                if (now - p.lstat().st_mtime >= grace) if temporary else stale(sub.name, p):
                    n += 1
                    if not dry_run:
                        p.unlink()
            except FileNotFoundError:
                continue
    return n


def _reclaim_tmp(store: Store, now: float, grace: float, partial_grace: float, dry_run: bool) -> tuple[int, int]:
    """Partial downloads nobody holds (older than partial_grace), their lock files, and atomic-write
    temporaries (`.tmp-*`) older than grace that a killed process left."""
    partials = temps = 0
    tmp = store.root / "tmp"
    if tmp.is_dir():
        for p in sorted(tmp.glob("*.partial")):
            lock = p.with_suffix(".lock")
            fd = _lock_fd(lock, blocking=False)
            if fd is None:
                continue                                    # a download in progress
            try:
                with contextlib.suppress(FileNotFoundError):
                    if now - p.stat().st_mtime >= partial_grace:
                        partials += 1
                        if not dry_run:
                            p.unlink()
                if not dry_run and not p.exists():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
            finally:
                os.close(fd)
        for lock in sorted(tmp.glob("*.lock")):
            if lock.with_suffix(".partial").exists():
                continue
            fd = _lock_fd(lock, blocking=False)
            if fd is None:
                continue
            try:
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
            finally:
                os.close(fd)
    for d in (store.root, tmp):
        if not d.is_dir():
            continue
        for p in d.glob(".tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if now - p.stat().st_mtime >= grace:
                    temps += 1
                    if not dry_run:
                        p.unlink()
    return partials, temps
