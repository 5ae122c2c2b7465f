"""`hpcconv bundle import`: verify a bundle and add its images to the store.

Order: the part list (seal, signature, every part present with its listed size) and the manifest
(seal, signature, bound to the part list) are checked before anything is written. Then the container
is read once, in order: blobs go through `BlobWriter` (published only after their digest matched;
a partial blob left by an interrupted import is resumed), every other member is hash-checked, and
each part's sha256 is computed on the way and compared at the end. The images' blob graphs are
checked against the store, and only then, last, are the references tagged. A damaged part therefore
never yields a tag (its good blobs may already be in the store: they are content-verified). A re-run
after an interruption finds the published blobs and writes only what is missing; the end state does
not depend on where the first run stopped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import CorruptInput, SourceError, UsageError
from ..image import Descriptor
from ..progress import NULL, Reporter
from ..sources.registry import BUNDLE_ANNOTATION
from ..store import Store
from . import fmt
from .fmt import BundleCorrupt
from .reader import Bundle


class _Tee:
    def __init__(self, src, h, task):
        self.src, self.h, self.task = src, h, task

    def read(self, n=-1):
        data = self.src.read(n)
        self.h.update(data)
        self.task.advance(len(data))
        return data


def _import_blob(b: Bundle, e: dict, store: Store, task) -> None:
    digest, size, path = e["digest"], e["blob_size"], e["path"]
    if store.has(digest):
        b._check_member(e, task)                    # already imported: still check the bundle's copy
        return
    for attempt in range(2):
        h = hashlib.sha256()
        with store.writer(digest, size) as w:
            if store.has(digest):                   # another process published it meanwhile
                w.discard()
                b._check_member(e, task)
                return
            raw = b.open_stored(path)
            tee = _Tee(raw, h, task)
            resumed = w.offset > 0 and e.get("compression") != "zstd"
            try:
                if resumed:
                    left = w.offset
                    while left:                      # hash the part a previous run already wrote
                        left -= len(tee.read(min(fmt.CHUNK, left)))
                    src = tee
                else:
                    w.restart()
                    src = tee
                    if e.get("compression") == "zstd":
                        import zstandard

                        src = zstandard.ZstdDecompressor().stream_reader(tee, read_across_frames=True)
                while True:
                    chunk = src.read(fmt.CHUNK)
                    if not chunk:
                        break
                    w.write(chunk)
                while tee.read(fmt.CHUNK):
                    pass
                if h.hexdigest() != e["sha256"]:
                    w.discard()
                    raise CorruptInput("stored bytes do not match the manifest's sha256 (damaged or altered)")
                w.commit()
                return
            except CorruptInput:
                if resumed and attempt == 0:
                    w.discard()
                    continue
                raise
            except OSError:
                raise
            except Exception as x:  # noqa: BLE001 - zstd errors on a damaged frame
                w.discard()
                raise CorruptInput(f"cannot be decompressed: {x}") from None


def _output_name(e: dict) -> str:
    name = e["path"][len("outputs/"):]
    if e.get("compression") == "zstd" and name.endswith(".zst"):
        name = name[:-4]
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CorruptInput(f"output {e['path']!r} has an unsafe name")
    return name


def _extract_output(b: Bundle, e: dict, dest_dir: Path) -> Path:
    name = _output_name(e)
    dest = dest_dir / name
    want = e.get("content_sha256") or e["sha256"]
    if dest.is_file() and not dest.is_symlink():
        h = hashlib.sha256()
        with open(dest, "rb") as f:
            for chunk in iter(lambda: f.read(fmt.CHUNK), b""):
                h.update(chunk)
        if h.hexdigest() == want:
            return dest
    tmp = dest_dir / f".{name}.hpcconv-tmp"
    src = b.open_stored(e["path"])
    if e.get("compression") == "zstd":
        import zstandard

        src = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        while True:
            chunk = src.read(fmt.CHUNK)
            if not chunk:
                break
            f.write(chunk)
            h.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != want:
        os.unlink(tmp)
        raise CorruptInput(f"output {e['path']} does not match its sha256")
    os.replace(tmp, dest)
    return dest


def import_bundle(path, store_path=None, keys: list = (), reporter: Reporter = NULL,
                  outputs_dir: Path | None = None) -> dict:
    # split bundles: part sizes now, part hashes during the one sequential read below (no second pass)
    b = Bundle.open(path, keys, reporter, hash_parts=False)
    try:
        store = Store.open(store_path)
        doc = b.doc
        missing = [r for r in doc.get("requires", []) if not store.has(r["digest"])]
        if missing:
            bases = ", ".join(f"{x.get('name') or '?'} (id {x.get('id')})" for x in doc.get("base", [])) or "?"
            raise SourceError(f"bundle {b.loc.display} is incremental and the store {store.root} lacks "
                              f"{len(missing)} blob(s) it builds on, e.g. {missing[0]['digest']}",
                              hint=f"import its base bundle first: {bases}")
        if outputs_dir is not None and not outputs_dir.is_dir():
            raise UsageError(f"--outputs {outputs_dir} is not a directory")
        written = 0

        def one(e: dict, task) -> None:
            nonlocal written
            if e.get("kind") == "blob":
                had = store.has(e["digest"])
                _import_blob(b, e, store, task)
                written += 0 if had else 1
            else:
                b._check_member(e, task)

        problems = b.each_member("import", one, reporter)
        if not problems:
            problems = b.check_images(have=store.has)
        if problems:
            raise BundleCorrupt(problems, b.loc.display)
        extracted = []
        if outputs_dir is not None:
            for e in b.entries.values():
                if e.get("kind", "").startswith("output"):
                    extracted.append(str(_extract_output(b, e, outputs_dir)))
        for img in doc.get("images", []):                  # last: a ref appears only when all it needs is in
            store.tag(img["ref"], Descriptor(img["mediaType"], img["digest"], img["size"],
                                             annotations={BUNDLE_ANNOTATION: doc["id"]}))
        out = b.summary()
        out.update({"command": "bundle import", "store": str(store.root), "blobs_written": written,
                    "outputs_extracted": extracted})
        return out
    finally:
        b.close()
