"""`hpcconv bundle diff OLD NEW [-o DELTA]`: what NEW adds to OLD, and the incremental bundle itself."""

from __future__ import annotations

from pathlib import Path

from ..image import Platform
from ..progress import NULL, Reporter
from ..sources import SourceOptions
from .reader import read_manifest_only


def _blobs(doc: dict) -> dict[str, int]:
    return {f["digest"]: f["blob_size"] for f in doc.get("files", []) if f.get("kind") == "blob"}


def diff(old: Path, new: Path, output: Path | None = None, split: str | None = None, sign: Path | None = None,
         force: bool = False, reporter: Reporter = NULL) -> dict:
    old_s, old_where = read_manifest_only(old)
    new_s, new_where = read_manifest_only(new)
    o, n = old_s.doc, new_s.doc
    have = set(_blobs(o)) | {r["digest"] for r in o.get("requires", [])}
    new_blobs = _blobs(n)
    needed = dict(new_blobs)
    needed.update({r["digest"]: r["size"] for r in n.get("requires", [])})
    old_imgs = {i["ref"]: i for i in o.get("images", [])}
    images = []
    for i in n.get("images", []):
        prev = old_imgs.get(i["ref"])
        status = "new" if prev is None else ("unchanged" if prev["digest"] == i["digest"]
                                             and prev["platforms"] == i["platforms"] else "changed")
        images.append({"ref": i["ref"], "digest": i["digest"], "status": status, "platforms": i["platforms"]})
    for ref in old_imgs:
        if ref not in {i["ref"] for i in n.get("images", [])}:
            images.append({"ref": ref, "digest": old_imgs[ref]["digest"], "status": "removed", "platforms": []})
    added = sorted(d for d in needed if d not in have)
    missing_in_new = [d for d in added if d not in new_blobs]
    res = {"command": "bundle diff", "old": old_where, "new": new_where, "old_id": o.get("id"), "new_id": n.get("id"),
           "images": images, "added_blobs": [{"digest": d, "size": needed[d]} for d in added],
           "added_bytes": sum(needed[d] for d in added), "shared_blobs": len([d for d in needed if d in have]),
           "removed_blobs": sorted(d for d in _blobs(o) if d not in needed), "files": []}
    if output is not None:
        from ..errors import SourceError
        from .create import CreateSpec, create, parse_size

        if missing_in_new:
            raise SourceError(f"{new_where} is itself incremental and OLD lacks blobs it builds on, "
                              f"e.g. {missing_in_new[0]}", hint="diff against the bundle NEW was made on")
        sources, per = [], {}
        for i in n.get("images", []):
            spec = f"bundle:{new}:{i['ref']}"
            sources.append(spec)
            per[spec] = [Platform.parse(p) for p in i["platforms"]]
        cs = CreateSpec(sources=sources, out=output, since=[old], split=parse_size(split) if split else None,
                        key=sign, force=force, source_platforms=per)
        import dataclasses

        base = SourceOptions(reporter=reporter)
        made = create(cs, lambda p: dataclasses.replace(base, platform=p), reporter)
        res.update({"files": made["files"], "id": made["id"], "manifest_sha256": made["manifest_sha256"]})
    return res
