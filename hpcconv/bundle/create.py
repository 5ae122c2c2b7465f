"""`hpcconv bundle create`: write the container (one file or parts), its manifest, and part000."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from .. import __version__
from ..errors import CorruptInput, UsageError
from ..image import (DOCKER_LAYER_FOREIGN, DOCKER_LAYER_GZIP, OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_ND_GZIP,
                     OCI_LAYER_ND_ZSTD, OCI_LAYER_ZSTD, Platform, check_digest)
from ..progress import NULL, Reporter
from ..store import REF_ANNOTATION
from . import fmt
from .collect import ImagePlan, collect

COMPRESSED_TYPES = {OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD, DOCKER_LAYER_GZIP,
                    DOCKER_LAYER_FOREIGN}
SMALL = 64 << 10          # members this small are stored as they are (readable after `tar -x`)
SAMPLE = 1 << 20
GAIN = 0.9                # compress only when zstd saves at least 10 %
ZSTD_LEVEL = 3
FAT32_MAX = (4 << 30) - 1


@dataclass
class CreateSpec:
    sources: list[str]
    out: Path
    platforms: list[Platform] | None = None        # None: every platform each source offers
    since: list[Path] = field(default_factory=list)
    outputs: Path | None = None
    tool: object | None = None                     # tool.ToolSpec
    split: int | None = None
    key: Path | None = None
    force: bool = False
    tmpdir: Path | None = None
    parity: bool = False                           # with split: one XOR parity part (rebuilds any one part)
    source_platforms: dict = field(default_factory=dict)   # source -> platforms, overriding `platforms`


def parse_size(text: str) -> int:
    """`4G`, `700M`, `4.7GB`, `650MiB`, `100k`, plain bytes, or `fat32` (4 GiB - 1, the largest FAT32 file).
    K/M/G/T are powers of 1024; kB/MB/GB of 1000."""
    import re

    if text.strip().lower() == "fat32":
        return FAT32_MAX
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"bad size {text!r}", hint="use e.g. 4G, 700M, 4.7GB or a number of bytes")
    num, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3) or ""
    base = 1000 if suffix in ("B", "b") and unit else 1024
    n = int(num * base ** " kmgt".index(unit or " "))
    if n < 4096:
        raise UsageError(f"--split {text} is too small", hint="parts must hold at least 4 KiB")
    return n


def _sample_gain(opener: Callable[[], BinaryIO]) -> bool:
    import zstandard

    with opener() as s:
        data = s.read(SAMPLE)
    return bool(data) and len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)) < GAIN * len(data)


class _Writer:
    def __init__(self, w: fmt.ContainerWriter, mtime: int, tmpdir: Path, task):
        self.w, self.mtime, self.tmpdir, self.task = w, mtime, tmpdir, task
        self.files: list[dict] = []

    def _copy(self, src, n: int, h, progress: bool) -> None:
        left = n
        while left:
            chunk = src.read(min(fmt.CHUNK, left))
            if not chunk:
                raise CorruptInput(f"source ended {left} bytes early")
            self.w.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            if progress:
                self.task.advance(len(chunk))

    def add(self, name: str, opener: Callable[[], BinaryIO], size: int, entry: dict, compress: bool | None) -> dict:
        """Add one member; `compress` None = decide by a sample. Returns its manifest entry."""
        if compress is None:
            compress = size > SMALL and _sample_gain(opener)
        if compress:
            with tempfile.TemporaryFile(dir=self.tmpdir, prefix=".hpcbundle-") as tmp:
                with opener() as src:
                    content = _Progress.copy_compressed(src, tmp, self.task)
                csize = tmp.tell()
                if csize < GAIN * size:
                    tmp.seek(0)
                    return self._emit(name + ".zst", tmp, csize, {**entry, "compression": "zstd",
                                                                 "content_size": size, "content_sha256": content},
                                      progress=False)
            self.task.advance(-size)        # not worth it: store as it is, counting the bytes again
        with opener() as src:
            out = self._emit(name, src, size, entry, progress=True)
            if src.read(1):
                raise CorruptInput(f"{name}: source is longer than {size} bytes")
            return out

    def _emit(self, name: str, src, size: int, entry: dict, progress: bool) -> dict:
        self.w.write(fmt.tar_header(name, size, self.mtime))
        h = hashlib.sha256()
        self._copy(src, size, h, progress)
        self.w.write(fmt.tar_padding(size))
        e = {"path": name, "size": size, "sha256": h.hexdigest(), **entry}
        self.files.append(e)
        return e


class _Progress:
    @staticmethod
    def copy_compressed(src, dst, task) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
        h = hashlib.sha256()
        with cctx.stream_writer(dst, closefd=False) as zw:
            while True:
                chunk = src.read(fmt.CHUNK)
                if not chunk:
                    break
                zw.write(chunk)
                h.update(chunk)
                task.advance(len(chunk))
        return h.hexdigest()


def base_digests(paths: list[Path]) -> tuple[set[str], list[dict]]:
    """Blob digests a centre holds after importing the bundles `paths` (and their own bases)."""
    from .reader import read_manifest_only

    have: set[str] = set()
    bases = []
    for p in paths:
        sealed, where = read_manifest_only(p)
        doc = sealed.doc
        for f in doc.get("files", []):
            if f.get("kind") == "blob":
                have.add(f["digest"])
        for r in doc.get("requires", []):
            have.add(r["digest"])
        bases.append({"id": doc.get("id"), "manifest_sha256": sealed.sha256, "created": doc.get("created"),
                      "name": Path(where).name})
    return have, bases


def _layout_index(plans: list[ImagePlan]) -> bytes:
    entries = []
    for p in plans:
        d = p.top.to_json()
        d["annotations"] = {REF_ANNOTATION: p.ref}
        entries.append(d)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries},
                      indent=2, sort_keys=True).encode()


def _outputs(root: Path, tmpdir: Path) -> list[tuple[str, Callable, int, str]]:
    """(member name, opener, size, kind) for every file or directory in --include-outputs DIR."""
    if not root.is_dir():
        raise UsageError(f"--include-outputs {root} is not a directory")
    out = []
    for p in sorted(root.iterdir()):
        if p.is_symlink():
            continue
        if p.is_file():
            out.append((f"outputs/{p.name}", (lambda q=p: open(q, "rb")), p.stat().st_size, "output"))
        elif p.is_dir():
            fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix=".hpcbundle-dir-")
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
                tf.add(p, arcname=p.name)
            out.append((f"outputs/{p.name}.tar", (lambda q=tmp: open(q, "rb")), os.path.getsize(tmp), "output-dir"))
    return out


def create(spec: CreateSpec, make_opts, reporter: Reporter = NULL) -> dict:
    out = spec.out
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    key = fmt.load_private_key(spec.key) if spec.key else None
    from .parity import parity_path, write_parity

    if spec.parity and not spec.split:
        raise UsageError("--parity needs --split", hint="parity rebuilds one lost part of a split bundle")
    existing = [q for q in [out, parity_path(out), *out.parent.glob(out.name + ".part*")]
                if q.exists()
                and (q in (out, parity_path(out)) or fmt.PART_RE.fullmatch(q.name[len(out.name):]))]
    if existing and not spec.force:
        raise UsageError(f"{existing[0]} exists", hint="choose another name or pass --force to replace it")
    have, bases = base_digests(spec.since) if spec.since else (set(), [])

    plans = [collect(s, spec.source_platforms.get(s, spec.platforms), make_opts) for s in spec.sources]
    seen_refs: dict[str, str] = {}
    for p in plans:
        if p.ref in seen_refs and seen_refs[p.ref] != p.top.digest:
            raise UsageError(f"two sources are both named {p.ref}")
        seen_refs[p.ref] = p.top.digest

    tmpdir = spec.tmpdir or out.parent
    blobs: dict = {}
    for p in plans:
        for d, b in p.blobs.items():
            blobs.setdefault(d, b)
    carried = {d: b for d, b in blobs.items() if d not in have}
    requires = [{"digest": d, "size": b.size} for d, b in blobs.items() if d in have]
    created = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
    total = sum(b.size for b in carried.values())
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix=".hpcbundle-work-") as work:
        work = Path(work)
        tool_files = spec.tool.build(work / "tool", reporter) if spec.tool is not None else []
        outputs = _outputs(spec.outputs, work) if spec.outputs else []
        total += sum(o[2] for o in outputs) + sum(Path(t[1]).stat().st_size for t in tool_files)
        task = reporter.task(f"create {out.name}", total=total)
        cw = fmt.ContainerWriter(out, spec.split)
        try:
            w = _Writer(cw, created, work, task)
            for rel, path in tool_files:             # first, and stored as they are: `tar -x` gives a usable wheelhouse
                w.add(f"tool/{rel}", (lambda q=path: open(q, "rb")), Path(path).stat().st_size, {"kind": "tool"},
                      compress=False)
            layout = b'{"imageLayoutVersion":"1.0.0"}'
            index = _layout_index(plans)
            w.add("oci-layout", lambda: io.BytesIO(layout), len(layout), {"kind": "layout"}, compress=False)
            w.add("index.json", lambda: io.BytesIO(index), len(index), {"kind": "layout"}, compress=False)
            for d, b in carried.items():
                algo, hexd = check_digest(d)
                compress = False if (b.media_type in COMPRESSED_TYPES or b.size <= SMALL) else None
                w.add(f"blobs/{algo}/{hexd}", b.open, b.size,
                      {"kind": "blob", "digest": d, "blob_size": b.size, "mediaType": b.media_type}, compress)
            for name, opener, size, kind in outputs:
                w.add(name, opener, size, {"kind": kind}, compress=None)
            body_doc = {
                "hpcbundle": fmt.FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
                "tool": f"hpcconv {__version__}",
                "images": [{"ref": p.ref, "source": p.source, "digest": p.top.digest, "mediaType": p.top.media_type,
                            "size": p.top.size, "platforms": p.platforms, "available_platforms": p.available,
                            "manifests": [c.to_json() for c in p.children]} for p in plans],
                "files": w.files,
                "tool_target": {"python": spec.tool.python, "platforms": spec.tool.platforms} if spec.tool else None,
                "base": bases,
                "requires": requires,
            }
            body_doc["id"] = fmt.sha256_hex(fmt.dump_body(body_doc))[:32]
            body = fmt.dump_body(body_doc)
            sealed = fmt.seal(body, fmt.DOMAIN_MANIFEST, key)
            cw.write(fmt.tar_header(fmt.MANIFEST, len(sealed), created))
            cw.write(sealed)
            cw.write(fmt.tar_padding(len(sealed)))
            cw.write(fmt.TAR_END)
            cw.finish()
        except BaseException:
            cw.abort()
            raise
        task.done()
    result = {"command": "bundle create", "output": str(out), "id": body_doc["id"],
              "manifest_sha256": fmt.sha256_hex(body), "signed_by": fmt.key_id(fmt.public_raw(key.public_key()))
              if key else "", "images": body_doc["images"], "blobs": len(carried), "requires": len(requires),
              "bytes": cw.total, "files": [str(out)]}
    written = {str(out)} if not spec.split else {str(out.with_name(p["name"])) for p in cw.parts}
    parity = None
    if spec.parity:
        parity = write_parity(out, [out.with_name(p["name"]) for p in cw.parts], spec.split, reporter)
        written.add(str(parity_path(out)))
    stale = [q for q in existing if str(q) not in written]
    for q in sorted(stale, key=lambda q: not q.name.endswith(".part000")):   # an old part list goes first
        q.unlink()
    if spec.split:
        parts_doc = {"hpcbundle_parts": fmt.FORMAT, "bundle": out.name, "manifest_sha256": fmt.sha256_hex(body),
                     "manifest": body_doc, "container": {"size": cw.total, "sha256": cw.whole.hexdigest()},
                     "parts": cw.parts}
        if parity:
            parts_doc["parity"] = parity
        p0 = fmt.part_path(out, 0)
        fmt.write_atomic(p0, fmt.seal(fmt.dump_body(parts_doc), fmt.DOMAIN_PARTS, key))
        result["files"] = [str(p0)] + [str(out.with_name(p["name"])) for p in cw.parts] \
            + ([str(parity_path(out))] if parity else [])
        result["parts"] = len(cw.parts)
    return result
