"""Emitted images as the harness sees them: what kind a path is, emit validation, and how `ch-run`
(and Apptainer/Shifter) can run it.

* Charliecloud: a directory (``/ch/metadata.json``), a squashfs file, or a tar(.gz/.zst) (unpacked to a
  temporary directory to run).
* SIF: the primary squashfs partition is copied out of the file at its offset (read with
  :func:`hpcconv.emit.sif.read_sif`) and given to ``ch-run`` as a squashfs; commands go through the
  image's ``/.singularity.d/actions/exec`` so its environment scripts apply, as ``apptainer exec``.
* Apptainer sandbox: a directory with ``/.singularity.d``.
* Shifter: ``<ID>.squashfs`` + ``<ID>.meta``; the meta's ``ENV`` lines become ``ch-run --set-env=K=V``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import interrupts
from ..errors import CorruptInput, UsageError
from .checks import FAIL, PASS, Checks

STAGE = "emit"


@dataclass
class Emitted:
    kind: str                    # charliecloud | sif | sandbox | shifter
    fmt: str                     # dir | squashfs | tar | sif | sandbox
    path: Path                   # what the user named (file or directory)
    squashfs: Path | None = None  # shifter: the squashfs file
    meta: Path | None = None     # shifter: the meta file
    arch: str | None = None      # OCI architecture when known (amd64, arm64)
    workdir: str | None = None
    env: dict[str, str] = field(default_factory=dict)   # for runtimes that do not read it from the image
    binds: list[tuple[str, str]] = field(default_factory=list)   # (host, container) for the run stage
    entry: list[str] = field(default_factory=list)   # shifter: ENTRY and CMD from the meta
    cmd: list[str] = field(default_factory=list)
    tmp: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.fmt}"

    def cleanup(self) -> None:
        for p in self.tmp:
            shutil.rmtree(p, ignore_errors=True)
        self.tmp.clear()


SIF_MAGIC = b"SIF_MAGIC"


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(64)


def parse_meta(text: str) -> dict:
    """A Shifter meta file: FORMAT, ENTRY, CMD, WORKDIR, ENV (list)."""
    out: dict = {"ENV": []}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = line.split(":", 1)
        k, v = k.strip(), v.strip()
        if k == "ENV":
            out["ENV"].append(v)
        else:
            out[k] = v
    return out


def detect(path: Path, arch: str | None = None) -> Emitted:
    """What kind of emitted image `path` is (for ``hpcconv test``)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise UsageError(f"{path} does not exist")
    if path.is_dir():
        sq = sorted(path.glob("*.squashfs"))
        if (path / ".singularity.d").is_dir():
            return Emitted("sandbox", "sandbox", path, arch=arch)
        if sq and sq[0].with_suffix(".meta").is_file() and not (path / "bin").exists():
            if len(sq) > 1:
                raise UsageError(f"{path} holds several Shifter images", hint="name the .squashfs or .meta file")
            return _shifter(sq[0], arch)
        return Emitted("charliecloud", "dir", path, arch=arch)
    if path.suffix in (".meta", ".squashfs") and path.with_suffix(".meta").is_file() and \
            path.with_suffix(".squashfs").is_file():
        return _shifter(path.with_suffix(".squashfs"), arch)
    head = _magic(path)
    if SIF_MAGIC in head[:64]:
        from ..emit.sif import read_sif

        sif = read_sif(path)
        a = {"amd64": "amd64", "arm64": "arm64"}.get(sif.arch, arch)
        return Emitted("sif", "sif", path, arch=a)
    if head[:4] == b"hsqs":
        return Emitted("charliecloud", "squashfs", path, arch=arch)
    if head[:2] == b"\x1f\x8b" or head[:4] == b"\x28\xb5\x2f\xfd" or head[257:262] == b"ustar" or \
            path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.zst")):
        return Emitted("charliecloud", "tar", path, arch=arch)
    raise UsageError(f"{path} is not an image hpcconv knows (SIF, Charliecloud dir/tar/squashfs, Shifter pair)")


def _shifter(sq: Path, arch: str | None) -> Emitted:
    meta = sq.with_suffix(".meta")
    m = parse_meta(meta.read_text(errors="replace"))
    env = {}
    for item in m["ENV"]:
        if "=" in item:
            k, v = item.split("=", 1)
            env[k] = v
    return Emitted("shifter", "squashfs", sq.parent, squashfs=sq, meta=meta, arch=arch, env=env,
                   workdir=m.get("WORKDIR"), entry=_meta_list(m.get("ENTRY")), cmd=_meta_list(m.get("CMD")))


def _meta_list(v: str | None) -> list[str]:
    """A meta ENTRY/CMD value ['a', 'b'] (elements between single quotes, no escapes: Shifter's parser)."""
    import re

    return re.findall(r"'([^']*)'", v or "")


def from_output(target: str, fmt: str, output: Path, emit_result, arch: str | None, config=None) -> Emitted:
    """The Emitted record of what `hpcconv convert` just wrote."""
    if target == "shifter":
        e = _shifter(Path(emit_result.squashfs), arch)
        return e
    kind = {"charliecloud": "charliecloud", "singularity": "sif" if fmt == "sif" else "sandbox"}[target]
    e = Emitted(kind, fmt, Path(output), arch=arch)
    if config is not None:
        e.workdir = config.workdir or None
    return e


# validation ------------------------------------------------------------------------------------------
def _squashfs_readable(path: Path, offset: int = 0) -> tuple[bool, str, list[str]]:
    """List a squashfs (at an offset) with unsquashfs; returns ok, detail, the paths."""
    exe = shutil.which("unsquashfs") or shutil.which("unsquashfs", path="/usr/bin:/usr/sbin:/bin:/sbin")
    if exe is None:
        return False, "unsquashfs is not installed", []
    cmd = [exe, "-no-progress", "-lc"] + (["-o", str(offset)] if offset else []) + [str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if r.returncode != 0:
        return False, (r.stderr.strip().splitlines() or ["unsquashfs failed"])[-1], []
    paths = [ln.strip()[len("squashfs-root"):] or "/" for ln in r.stdout.splitlines()
             if ln.strip().startswith("squashfs-root")]
    return True, f"{len(paths)} entries", paths


def validate(e: Emitted) -> Checks:
    """Emitted image validity: SIF structure, squashfs readable, runtime metadata present."""
    checks = Checks()
    t0 = time.monotonic()
    if e.kind == "sif":
        from ..emit.sif import DT_DEFFILE, DT_GENERIC_JSON, read_sif

        try:
            sif = read_sif(e.path)
        except (CorruptInput, OSError) as ex:
            checks.add(STAGE, "valid: SIF structure", FAIL, str(ex), time.monotonic() - t0)
            return checks
        prim = sif.primary()
        size = e.path.stat().st_size
        problems = []
        if prim is None:
            problems.append("no primary system partition")
        for d in sif.descriptors:
            if d.offset + d.size > size:
                problems.append(f"object {d.id} ends past the end of the file")
        kinds = {d.datatype for d in sif.descriptors}
        if DT_DEFFILE not in kinds:
            problems.append("no definition file object")
        if DT_GENERIC_JSON not in kinds:
            problems.append("no JSON metadata object")
        checks.add(STAGE, "valid: SIF structure", FAIL if problems else PASS,
                   "; ".join(problems) or f"{len(sif.descriptors)} objects, arch {sif.arch}, primary partition "
                   f"at {prim.offset} ({prim.size} B)", time.monotonic() - t0)
        if prim is None:
            return checks
        t1 = time.monotonic()
        ok, detail, paths = _squashfs_readable(e.path, prim.offset)
        checks.add(STAGE, "valid: squashfs readable", PASS if ok else FAIL, detail, time.monotonic() - t1)
        if ok:
            need = ["/.singularity.d/actions/exec", "/.singularity.d/runscript", "/.singularity.d/env"]
            miss = [p for p in need if p not in paths and not any(q.startswith(p + "/") for q in paths)]
            checks.add(STAGE, "valid: metadata present", FAIL if miss else PASS,
                       ("missing " + ", ".join(miss)) if miss else "Apptainer actions, runscript, env scripts")
        return checks
    if e.kind == "shifter" or e.fmt == "squashfs":
        sq = e.squashfs if e.kind == "shifter" else e.path
        ok, detail, paths = _squashfs_readable(sq)
        checks.add(STAGE, "valid: squashfs readable", PASS if ok else FAIL, detail, time.monotonic() - t0)
        if not ok:
            return checks
        if e.kind == "shifter":
            m = parse_meta(e.meta.read_text(errors="replace"))
            good = m.get("FORMAT") == "squashfs"
            checks.add(STAGE, "valid: metadata present", PASS if good else FAIL,
                       f"{e.meta.name}: FORMAT squashfs, {len(m['ENV'])} ENV" if good else
                       f"{e.meta.name} has no 'FORMAT: squashfs' line")
        else:
            miss = [p for p in ("/ch/metadata.json", "/ch/environment") if p not in paths]
            checks.add(STAGE, "valid: metadata present", FAIL if miss else PASS,
                       ("missing " + ", ".join(miss)) if miss else "/ch/metadata.json, /ch/environment")
        return checks
    if e.fmt in ("dir", "sandbox"):
        need = ["ch/metadata.json", "ch/environment"] if e.kind == "charliecloud" else \
            [".singularity.d/actions/exec", ".singularity.d/runscript"]
        miss = [p for p in need if not os.path.lexists(e.path / p)]
        if e.kind == "charliecloud" and not miss:
            try:
                json.loads((e.path / "ch/metadata.json").read_text())
            except ValueError as ex:
                miss.append(f"ch/metadata.json is not JSON ({ex})")
        checks.add(STAGE, "valid: metadata present", FAIL if miss else PASS,
                   ("missing " + ", ".join(miss)) if miss else ", ".join(need), time.monotonic() - t0)
        return checks
    if e.fmt == "tar":
        try:
            with tarfile.open(e.path, "r:*") as tf:
                names = {n.lstrip("./").rstrip("/") for n in tf.getnames()}
        except (tarfile.TarError, OSError, EOFError) as ex:
            checks.add(STAGE, "valid: tar readable", FAIL, str(ex), time.monotonic() - t0)
            return checks
        checks.add(STAGE, "valid: tar readable", PASS, f"{len(names)} entries", time.monotonic() - t0)
        miss = [p for p in ("ch/metadata.json", "ch/environment") if not any(n == p or n.endswith("/" + p) for n in names)]
        checks.add(STAGE, "valid: metadata present", FAIL if miss else PASS,
                   ("missing " + ", ".join(miss)) if miss else "/ch/metadata.json, /ch/environment")
    return checks


# making a path ch-run can take -----------------------------------------------------------------------
def chrun_image(e: Emitted, scratch: Path | None = None) -> Path:
    """A path `ch-run` accepts for this image (a dir or a squashfs file), extracting when needed."""
    if e.kind == "shifter":
        return e.squashfs
    if e.fmt in ("dir", "squashfs", "sandbox"):
        return e.path
    tmp = Path(tempfile.mkdtemp(prefix="hpcconv-run-", dir=scratch))
    e.tmp.append(tmp)
    if e.kind == "sif":
        from ..emit.sif import read_sif

        prim = read_sif(e.path).primary()
        if prim is None:
            raise CorruptInput(f"{e.path} has no primary partition")
        out = tmp / "partition.sqfs"
        with open(e.path, "rb") as src, open(out, "wb") as dst:
            src.seek(prim.offset)
            left = prim.size
            while left:
                b = src.read(min(left, 1 << 20))
                if not b:
                    raise CorruptInput(f"{e.path} ends inside its partition")
                dst.write(b)
                left -= len(b)
        return out
    if e.fmt == "tar":
        root = tmp / "img"
        root.mkdir()
        r = interrupts.run(["tar", "-xf", str(e.path), "-C", str(root), "--no-same-owner"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CorruptInput(f"cannot unpack {e.path}: {r.stderr.strip()[:200]}")
        kids = [p for p in root.iterdir()]
        if len(kids) == 1 and kids[0].is_dir() and (kids[0] / "ch").is_dir():   # ch-image style top dir
            return kids[0]
        return root
    raise UsageError(f"ch-run cannot run {e.label}")
