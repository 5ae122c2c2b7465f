"""ELF findings kept by content provenance (rewrite/elfcache.py): a second read of the same layers
runs no ELF scanner and the passes see the same facts; other code, other bytes, another path or
content without provenance get no cached facts.

Oracle: the ElfInfo the scanner itself reports on the first read (and the passes' facts and
checks from it), compared field by field with what the cache hands over on the second."""

from __future__ import annotations

import json
import os

import pytest

from flattools import image_from_built
from hpcconv.flatten import Flattener
from hpcconv.rewrite import default_passes
from hpcconv.rewrite.base import Pass, PassRunner
from hpcconv.rewrite.elfcache import ElfCache
from ocitools import T, build_image, make_tar

HOST_ELF = ["/bin/ls", "/usr/bin/zstd", "/usr/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libzstd.so.1"]


class _Seen(Pass):
    name = "seen"

    def __init__(self):
        self.infos = {}

    def observe_elf(self, entry, elf) -> None:
        self.infos[entry.path] = elf


def _image(extra=b""):
    files = [p for p in HOST_ELF if os.path.exists(p)]
    if len(files) < 2:
        pytest.skip("no host ELF files to put in a layer")
    members = [T("bin", "dir")] + [T("bin/" + os.path.basename(p), data=open(p, "rb").read() + extra, mode=0o755)
                                   for p in files]
    members.append(T("bin/script", data=b"#!/bin/sh\necho not an ELF\n", mode=0o755))
    return build_image([make_tar(members)])


def _run(built, cache):
    seen = _Seen()
    runner = PassRunner(default_passes() + [seen], elf_cache=cache)
    for e in runner.transform(Flattener(image_from_built(built), single_pass=True).entries()):
        if e.reader is not None:
            e.reader.read()
    for info in seen.infos.values():
        if info.isa_scan is not None:
            info.isa_scan.wait()
    checks = [(c.name, c.status, c.detail) for c in runner.finish().items]
    return runner, seen.infos, checks


def test_a_second_read_takes_the_findings_from_the_cache(tmp_path):
    built = _image()
    first, infos, checks = _run(built, ElfCache(tmp_path))
    assert first.elf_seen >= 2 and first.elf_cached == 0
    assert any(i.isa_scan is not None and i.isa_scan.bytes_scanned for i in infos.values())
    first.elf_cache.save()
    assert len(list((tmp_path / "sha256").glob("*.elf.json"))) == 1
    again, infos2, checks2 = _run(built, ElfCache(tmp_path))
    assert again.elf_cached == again.elf_seen == first.elf_seen
    assert infos2 == infos                     # every field, the instruction scan's counts too
    assert checks2 == checks and again.facts() == first.facts()


def test_findings_are_not_taken_for_other_bytes_code_or_reads(tmp_path, monkeypatch):
    built = _image()
    first, infos, _ = _run(built, ElfCache(tmp_path))
    first.elf_cache.save()
    # other bytes: another layer blob, nothing known
    other, _, _ = _run(_image(extra=b"\0"), ElfCache(tmp_path))
    assert other.elf_cached == 0
    # without a cache: scanned, the same facts
    plain, infos3, _ = _run(built, None)
    assert plain.elf_cached == 0 and infos3 == infos
    # findings of other scanner code are not used
    from hpcconv.rewrite import elfcache

    monkeypatch.setattr(elfcache, "_code", "other code")
    later, _, _ = _run(built, ElfCache(tmp_path))
    assert later.elf_cached == 0
    monkeypatch.undo()
    # a cache file someone else could have written is not read
    f = next((tmp_path / "sha256").glob("*.elf.json"))
    os.chmod(f, 0o666)
    shared, _, _ = _run(built, ElfCache(tmp_path))
    assert shared.elf_cached == 0
    os.chmod(f, 0o644)
    # a damaged file: scanned again
    doc = json.loads(f.read_bytes())
    for k in doc["files"]:
        doc["files"][k] = ["garbage"]
    f.write_text(json.dumps(doc))
    broken, infos4, _ = _run(built, ElfCache(tmp_path))
    assert broken.elf_cached == 0 and infos4 == infos
