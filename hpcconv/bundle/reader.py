"""Open and verify a bundle: part000 and every part on its own, the manifest seal and signature,
every member's sha256, every blob's digest, and that the images' blobs are all there."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptInput, SourceError
from ..image import (INDEX_TYPES, VerifyingReader, check_digest, manifest_kind, parse_json)
from ..progress import NULL, Reporter
from . import fmt
from .fmt import BundleCorrupt


def read_manifest_only(path) -> tuple[fmt.Sealed, str]:
    """The (sealed) manifest of a bundle without reading its data: part000 alone is enough for a
    split bundle; a single file is scanned for its last member."""
    loc = fmt.locate(path)
    if loc.split and loc.part0 and loc.part0.is_file():
        parts = fmt.unseal(_read_small(loc.part0), loc.part0.name)
        return fmt.Sealed(fmt.dump_body(parts.doc["manifest"]), parts.doc["manifest"], {}), str(loc.part0)
    b = Bundle.open(path, check_parts=False)
    try:
        return b.manifest, str(loc.base)
    finally:
        b.close()


def _read_small(p: Path) -> bytes:
    with open(p, "rb") as f:
        data = f.read(fmt.MAX_DOC + 1)
    if len(data) > fmt.MAX_DOC:
        raise CorruptInput(f"{p.name} is larger than {fmt.MAX_DOC} bytes: not a part list")
    return data


def _hash_file(p: Path, task) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(p, "rb") as f:
        while True:
            chunk = f.read(fmt.CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            task.advance(len(chunk))
    return n, h.hexdigest()


def verify_parts(loc: fmt.Location, parts: dict, reporter: Reporter, hash_parts: bool = True
                 ) -> list[tuple[str, str]]:
    """Each listed part checked alone (presence, size, and with `hash_parts` its sha256); missing,
    extra and swapped parts are named."""
    problems: list[tuple[str, str]] = []
    listed = parts.get("parts") or []
    task = reporter.task(f"verify parts of {loc.base.name}", total=sum(p["size"] for p in listed)) \
        if hash_parts else None
    got: dict[int, tuple[int, str]] = {}
    for i, p in enumerate(listed, 1):
        name = fmt.part_path(loc.base, i).name          # a renamed bundle keeps working: parts go by index
        if p.get("index") != i:
            problems.append((loc.part0.name, f"part list entry {i} is numbered {p.get('index')!r}"))
            continue
        path = loc.found_parts.get(i)
        if path is None:
            problems.append((name, "missing (re-send this part)"))
            continue
        if hash_parts:
            got[i] = _hash_file(path, task)
        elif path.stat().st_size != p["size"]:
            problems.append((name, f"is {path.stat().st_size} bytes, the part list says {p['size']} "
                                   "(re-send this part)"))
    problems += compare_parts(loc, listed, got)
    for i, path in sorted(loc.found_parts.items()):
        if i > len(listed):
            problems.append((path.name, f"is not in the part list (the bundle has {len(listed)} parts): "
                                        "a stray or added part"))
    if task is not None:
        task.done()
    return repair_hint(loc, parts, problems, hash_parts)


def repair_hint(loc: fmt.Location, parts: dict, problems: list[tuple[str, str]], check_parity: bool = True
                ) -> list[tuple[str, str]]:
    """With a parity part and exactly one bad data part, say that it can be rebuilt here."""
    listed = parts.get("parts") or []
    par = parts.get("parity")
    data_bad = [p for p in problems if p[0] in {fmt.part_path(loc.base, i).name for i in range(1, len(listed) + 1)}]
    if par and len(data_bad) == 1 and len(problems) == 1 and _parity_ok(loc, par, check_parity):
        item, msg = problems[0]
        problems = [(item, f"{msg}; it can be rebuilt here from the parity part: hpcconv bundle repair {loc.display}")]
    return problems


def _parity_ok(loc: fmt.Location, par: dict, hash_it: bool) -> bool:
    from .parity import parity_path

    p = parity_path(loc.base)
    if not p.is_file() or p.stat().st_size != par.get("size"):
        return False
    return not hash_it or _hash_file(p, NULL_TASK)[1] == par.get("sha256")


class _NullTask:
    def advance(self, n):
        pass


NULL_TASK = _NullTask()


def compare_parts(loc: fmt.Location, listed: list[dict], got: dict[int, tuple[int, str]]) -> list[tuple[str, str]]:
    """Problems for parts whose (size, sha256) in `got` differ from the part list."""
    problems = []
    by_hash = {p["sha256"]: fmt.part_path(loc.base, p.get("index", 0)).name for p in listed}
    for i, (size, digest) in sorted(got.items()):
        p, name = listed[i - 1], fmt.part_path(loc.base, i).name
        if size == p["size"] and digest == p["sha256"]:
            continue
        other = by_hash.get(digest)
        if other and other != name:
            problems.append((name, f"holds the content of {other}: parts are out of order or renamed"))
        elif size != p["size"]:
            problems.append((name, f"is {size} bytes, the part list says {p['size']} (re-send this part)"))
        else:
            problems.append((name, f"sha256 {digest[:16]}... does not match the part list (re-send this part)"))
    return problems


@dataclass
class Bundle:
    loc: fmt.Location
    f: object
    size: int
    members: dict[str, fmt.Member]
    order: list[fmt.Member]
    manifest: fmt.Sealed
    parts: fmt.Sealed | None = None
    signer: str = ""
    entries: dict[str, dict] = field(default_factory=dict)      # member path -> manifest entry
    blob_entries: dict[str, dict] = field(default_factory=dict)  # digest -> manifest entry

    @classmethod
    def open(cls, path, keys: list = (), reporter: Reporter = NULL, check_parts: bool = True,
             hash_parts: bool = True) -> "Bundle":
        keys = list(keys)
        loc = fmt.locate(path)
        parts = None
        signer = ""
        if loc.split:
            if not loc.part0.is_file():
                raise BundleCorrupt([(loc.part0.name, "missing: it holds the part list and the manifest; "
                                                      "re-send it")], loc.display)
            try:
                parts = fmt.unseal(_read_small(loc.part0), f"{loc.part0.name} (the part list)")
                signer = fmt.check_signature(parts, fmt.DOMAIN_PARTS, keys, f"{loc.part0.name} (the part list)")
                if parts.doc.get("hpcbundle_parts") != fmt.FORMAT or not isinstance(parts.doc.get("parts"), list):
                    raise CorruptInput(f"{loc.part0.name} is not an hpcconv part list")
            except CorruptInput as e:
                raise BundleCorrupt([(loc.part0.name, e.message)], loc.display) from None
            if check_parts:
                problems = verify_parts(loc, parts.doc, reporter, hash_parts)
                if problems:
                    raise BundleCorrupt(problems, loc.display)
            n = len(parts.doc["parts"])
            missing = [i for i in range(1, n + 1) if i not in loc.found_parts]
            if missing:
                raise BundleCorrupt([(fmt.part_path(loc.base, i).name, "missing") for i in missing], loc.display)
            f = fmt.MultiFile([loc.found_parts[i] for i in range(1, n + 1)])
            size = f.size
        else:
            f = fmt.SingleFile(loc.base)
            size = f.size
        try:
            try:
                order = fmt.scan_tar(f, size, "container")
            except CorruptInput as e:
                raise BundleCorrupt([(loc.base.name, e.message)], loc.display) from None
            members: dict[str, fmt.Member] = {}
            dups = []
            for m in order:
                if m.name in members:
                    dups.append((m.name, "appears twice in the container"))
                members[m.name] = m
            if dups:
                raise BundleCorrupt(dups, loc.display)
            mm = members.get(fmt.MANIFEST)
            if mm is None or order[-1].name != fmt.MANIFEST:
                raise BundleCorrupt([(fmt.MANIFEST, "missing or not the last member: the container is truncated "
                                                    "or not an hpcconv bundle")], loc.display)
            if mm.size > fmt.MAX_DOC:
                raise BundleCorrupt([(fmt.MANIFEST, "too large")], loc.display)
            raw = f.pread(mm.offset, mm.size)
            try:
                manifest = fmt.unseal(raw, f"{fmt.MANIFEST} (the manifest)")
                s2 = fmt.check_signature(manifest, fmt.DOMAIN_MANIFEST, keys, f"{fmt.MANIFEST} (the manifest)")
                signer = signer or s2
                if manifest.doc.get("hpcbundle") != fmt.FORMAT:
                    raise CorruptInput(f"{fmt.MANIFEST}: unsupported bundle format {manifest.doc.get('hpcbundle')!r}")
                if parts is not None and (parts.doc.get("manifest_sha256") != manifest.sha256
                                          or fmt.dump_body(parts.doc.get("manifest") or {}) != manifest.body):
                    raise CorruptInput(f"{fmt.MANIFEST} is not the manifest {loc.part0.name} names: "
                                       "the parts belong to another bundle")
            except CorruptInput as e:
                raise BundleCorrupt([(fmt.MANIFEST, e.message)], loc.display) from None
        except BundleCorrupt:
            f.close()
            if parts is not None and check_parts and not hash_parts:
                # the part hashes were left for the one sequential read; a damaged part explains a
                # damaged container best (it is what needs re-sending): find it now
                problems = verify_parts(loc, parts.doc, reporter)
                if problems:
                    raise BundleCorrupt(problems, loc.display) from None
            raise
        except BaseException:
            f.close()
            raise
        b = cls(loc, f, size, members, order, manifest, parts, signer)
        for e in manifest.doc.get("files", []):
            b.entries[e["path"]] = e
            if e.get("kind") == "blob":
                b.blob_entries[e["digest"]] = e
        return b

    def close(self) -> None:
        self.f.close()

    @property
    def doc(self) -> dict:
        return self.manifest.doc

    # reading --------------------------------------------------------------------------------------
    def open_stored(self, path: str) -> fmt.Region:
        m = self.members.get(path)
        if m is None:
            raise CorruptInput(f"bundle {self.loc.display}: member {path} is missing")
        return fmt.Region(self.f, m.offset, m.size)

    def open_blob(self, digest: str) -> BinaryIO:
        """The blob's content (decompressed if stored with zstd), checked against its digest."""
        e = self.blob_entries.get(digest)
        if e is None:
            raise SourceError(f"blob {digest} is not carried by bundle {self.loc.display}",
                              hint="an incremental bundle needs its base imported first (hpcconv bundle import)")
        raw = self.open_stored(e["path"])
        stream = raw
        if e.get("compression") == "zstd":
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return VerifyingReader(stream, digest, e["blob_size"], f"blob {e['path']}")

    def read_blob(self, digest: str, limit: int) -> bytes:
        e = self.blob_entries.get(digest)
        if e is not None and e["blob_size"] > limit:
            raise CorruptInput(f"blob {digest} is over the {limit}-byte limit")
        with self.open_blob(digest) as s:
            data = s.read()
            s.read()
        return data

    # verification ---------------------------------------------------------------------------------
    def each_member(self, desc: str, fn, reporter: Reporter = NULL) -> list[tuple[str, str]]:
        """Call fn(entry, task) on every listed member in container order, in one sequential read of
        the container; for a split bundle each part's sha256 is computed on the way and compared at the
        end (bad parts are reported first: they are what needs re-sending)."""
        problems: list[tuple[str, str]] = []
        for p, e in self.entries.items():
            if p not in self.members:
                problems.append((f"{p} ({e.get('digest')})" if e.get("kind") == "blob" else p,
                                 "missing from the container"))
        tap = self.f if isinstance(self.f, fmt.MultiFile) else None
        if tap is not None:
            tap.start_tap()

        def hash_upto(pos: int) -> None:             # tar headers, padding, unlisted members
            while tap is not None and tap.tap_position() < pos:
                if not tap.pread(tap.tap_position(), min(fmt.CHUNK, pos - tap.tap_position())):
                    break

        task = reporter.task(f"{desc} {self.loc.base.name}", total=sum(e["size"] for e in self.entries.values()))
        for m in self.order:
            hash_upto(m.offset)
            e = self.entries.get(m.name)
            if e is None:
                if m.name != fmt.MANIFEST:
                    problems.append((m.name, "is in the container but not in the manifest"))
                continue
            item = f"{m.name} ({e['digest']})" if e.get("kind") == "blob" else m.name
            if m.size != e["size"]:
                problems.append((item, f"is {m.size} bytes, the manifest says {e['size']}"))
                continue
            try:
                fn(e, task)
            except CorruptInput as err:
                problems.append((item, err.message))
        task.done()
        if tap is not None:
            hash_upto(self.size)
            listed = self.parts.doc["parts"]
            digests = tap.tap_digests()
            if digests is None:                       # a read went out of order: hash the parts again
                part_problems = verify_parts(self.loc, self.parts.doc, reporter)
            else:
                part_problems = repair_hint(self.loc, self.parts.doc, compare_parts(
                    self.loc, listed, {i + 1: (listed[i]["size"], d) for i, d in enumerate(digests)}))
            if part_problems:          # a bad part explains the member problems: it is what needs re-sending
                return part_problems
        return problems

    def verify_members(self, reporter: Reporter = NULL) -> list[tuple[str, str]]:
        return self.each_member("verify", self._check_member, reporter)

    def _check_member(self, e: dict, task) -> None:
        h = hashlib.sha256()
        src = self.open_stored(e["path"])

        class Tee:
            def read(self_, n=-1):
                data = src.read(n)
                h.update(data)
                task.advance(len(data))
                return data

        err = None
        if e.get("kind") == "blob":
            stream = Tee()
            try:
                if e.get("compression") == "zstd":
                    import zstandard

                    stream = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
                v = VerifyingReader(stream, e["digest"], e["blob_size"], "blob")
                while v.read(fmt.CHUNK):
                    pass
            except CorruptInput as x:
                err = x.message
            except Exception as x:  # noqa: BLE001 - zstd errors on damaged frames
                err = f"cannot be decompressed: {x}"
        _drain(Tee())
        if h.hexdigest() != e["sha256"]:
            raise CorruptInput("stored bytes do not match the manifest's sha256 (damaged or altered)")
        if err:
            raise CorruptInput(err)

    def check_images(self, have=None) -> list[tuple[str, str]]:
        """Every image's documents parse and every blob they need is carried (or in `have`, or
        listed in `requires` of an incremental bundle when `have` is None)."""
        problems = []
        required = {r["digest"] for r in self.doc.get("requires", [])}

        def present(d: str) -> bool:
            if d in self.blob_entries:
                return True
            if have is not None:
                return have(d)
            return d in required

        try:
            index = parse_json(self.open_stored("index.json").read(), "index.json")
        except CorruptInput as e:
            return [("index.json", e.message)]
        tops = {(m.get("annotations") or {}).get("org.opencontainers.image.ref.name"): m.get("digest")
                for m in index.get("manifests", [])}
        for img in self.doc.get("images", []):
            ref = img["ref"]
            if tops.get(ref) != img["digest"]:
                problems.append((f"image {ref}", "index.json does not point at the manifest's digest"))
            try:
                todo = [img["digest"]]
                if img["mediaType"] in INDEX_TYPES:
                    raw = self._doc(img["digest"])
                    if raw is not None:
                        listed = {m["digest"] for m in json.loads(raw).get("manifests", [])}
                        for c in img.get("manifests", []):
                            if c["digest"] not in listed:
                                problems.append((f"image {ref}", f"carries {c['digest']} which its index does not list"))
                    todo = [c["digest"] for c in img.get("manifests", [])]
                for d in todo:
                    raw = self._doc(d)
                    if raw is None:
                        if not present(d):
                            problems.append((f"image {ref}", f"manifest {d} is not in the bundle"))
                        continue
                    obj = parse_json(raw, f"manifest {d}")
                    manifest_kind(obj)
                    for b in [obj.get("config")] + list(obj.get("layers") or []):
                        check_digest(b["digest"])
                        if not present(b["digest"]):
                            problems.append((f"image {ref}", f"blob {b['digest']} is not in the bundle"))
            except (CorruptInput, SourceError, KeyError, TypeError, ValueError) as e:
                problems.append((f"image {ref}", getattr(e, "message", str(e))))
        return problems

    def _doc(self, digest: str) -> bytes | None:
        if digest not in self.blob_entries:
            return None
        return self.read_blob(digest, 8 << 20)

    def summary(self) -> dict:
        d = self.doc
        return {"bundle": self.loc.display, "id": d.get("id"), "created": d.get("created"), "tool": d.get("tool"),
                "manifest_sha256": self.manifest.sha256, "signed_by": self.signer,
                "split": self.loc.split, "parts": len(self.parts.doc["parts"]) if self.parts else 0,
                "images": [{"ref": i["ref"], "digest": i["digest"], "platforms": i["platforms"]}
                           for i in d.get("images", [])],
                "blobs": len(self.blob_entries), "requires": len(d.get("requires", [])),
                "base": d.get("base", []),
                "outputs": [e["path"] for e in d.get("files", []) if e.get("kind", "").startswith("output")],
                "tool_included": any(e.get("kind") == "tool" for e in d.get("files", [])),
                "tool_target": d.get("tool_target")}


def _drain(r) -> None:
    while r.read(fmt.CHUNK):
        pass
    return None



def verify(path, keys: list = (), reporter: Reporter = NULL) -> dict:
    """Full verification; raises BundleCorrupt naming every bad item, else returns a summary."""
    b = Bundle.open(path, keys, reporter, hash_parts=False)   # part hashes: during the one read below
    try:
        problems = b.verify_members(reporter)
        if not problems:
            problems = b.check_images()
        if problems:
            raise BundleCorrupt(problems, b.loc.display)
        return b.summary()
    finally:
        b.close()
