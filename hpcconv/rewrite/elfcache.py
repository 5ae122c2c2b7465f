"""What the ELF scanner found in a layer's files, kept by content provenance.

A file read straight from a layer names its bytes by (layer blob sha256, offset in the blob's
decoded stream; flatten._Named.provenance): the blob's digest is checked as the layer is read and
decoding is a function of the blob, so the same place is the same bytes. What ElfScanner (and the
x86 instruction scan) reports for those bytes is kept next to the layer's header index in the
store (index-cache/sha256/<hex>.elf.json, dropped by `store gc` with the blob), so converting the
same layers again (another profile, another target) runs no scanner over them: the passes get the
same ElfInfo as from a scan.

The facts are only as good as the code that found them: each file records a digest of the scanner
code (elfinfo.py, x86scan.py and the C module), and facts from other code are not used. Written
only after a conversion read every layer to its end (every blob verified), by this user; read with
the same ownership checks as the header index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..cachefiles import read_trusted, write_atomic
from .elfinfo import ElfInfo, IsaScan

# every field the scanner fills (a field added to ElfInfo or IsaScan is kept too; the code digest
# below drops findings of the code before it), but the path (the key's), the ABI tag and the scan
# (nested), `complete` (how this read went) and the scan's future
_FIELDS = tuple(f.name for f in dataclasses.fields(ElfInfo) if f.name not in ("path", "abi_tag", "isa_scan", "complete"))
_SCAN_FIELDS = tuple(f.name for f in dataclasses.fields(IsaScan) if f.name != "pending")
_code: str | None = None


def code_version() -> str:
    """A digest of the code whose findings are cached (its source and the C module)."""
    global _code
    if _code is None:
        from ..speedups import native
        from . import elfinfo, x86scan

        h = hashlib.sha256()
        for mod in (elfinfo, x86scan, native):
            path = getattr(mod, "__file__", None) if mod is not None else None
            try:
                with open(path, "rb") as f:
                    h.update(f.read())
            except (OSError, TypeError):
                h.update(b"-")
        _code = h.hexdigest()[:32]
    return _code


def _to_json(info: ElfInfo) -> list:
    scan = info.isa_scan
    return [[getattr(info, k) for k in _FIELDS],
            [info.abi_tag[0], list(info.abi_tag[1])] if info.abi_tag else None,
            [getattr(scan, k) for k in _SCAN_FIELDS] if scan is not None else None]


def _from_json(path: str, doc: list) -> ElfInfo:
    fields, abi, scan = doc
    info = ElfInfo(path, **dict(zip(_FIELDS, fields, strict=True)))
    info.needed = list(info.needed)
    if abi is not None:
        info.abi_tag = (int(abi[0]), tuple(int(x) for x in abi[1]))
    if scan is not None:
        info.isa_scan = IsaScan(**dict(zip(_SCAN_FIELDS, scan, strict=True)))
    return info


class ElfCache:
    """get/put ElfInfo by (blob hex, offset, size, member path, whether instructions were scanned);
    `save` writes what was put, per blob, merged with what was there."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory) / "sha256"
        self._loaded: dict[str, dict] = {}
        self._new: dict[str, dict] = {}
        self._pending: list[tuple[str, str, ElfInfo]] = []

    def _file(self, blob: str) -> Path:
        return self.dir / f"{blob}.elf.json"

    def _load(self, blob: str) -> dict:
        got = self._loaded.get(blob)
        if got is None:
            got = {}
            try:
                doc = json.loads(read_trusted(self._file(blob)))
                if doc.get("code") == code_version() and doc.get("blob") == blob and isinstance(doc.get("files"), dict):
                    got = doc["files"]
            except (OSError, ValueError, TypeError, AttributeError):
                pass
            self._loaded[blob] = got
        return got

    @staticmethod
    def _key(offset: int, size: int, path: str, scan: bool) -> str:
        return f"{offset}:{size}:{int(scan)}:{path}"

    def get(self, blob: str, offset: int, size: int, path: str, scan: bool) -> ElfInfo | None:
        doc = self._load(blob).get(self._key(offset, size, path, scan))
        if doc is None:
            return None
        try:
            return _from_json(path, doc)
        except (ValueError, TypeError, IndexError):
            return None

    def put(self, blob: str, offset: int, size: int, path: str, scan: bool, info: ElfInfo) -> None:
        """Keep `info` (its instruction scan may still be running: taken at `save`)."""
        if info.complete:
            self._pending.append((blob, self._key(offset, size, path, scan), info))

    def save(self) -> None:
        """Write what was put (best effort: a cache that cannot be written is simply not there)."""
        for blob, key, info in self._pending:
            try:
                if info.isa_scan is not None:
                    info.isa_scan.wait()
                self._new.setdefault(blob, {})[key] = _to_json(info)
            except Exception:                    # a scan that failed: nothing to keep
                continue
        self._pending = []
        for blob, files in self._new.items():
            merged = {**self._load(blob), **files}
            write_atomic(self._file(blob), json.dumps({"blob": blob, "code": code_version(), "files": merged},
                                                      separators=(",", ":")))
            self._loaded[blob] = merged
        self._new = {}
