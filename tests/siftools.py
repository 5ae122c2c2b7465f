"""Oracles for the SIF, Singularity and Shifter tests: the Sylabs reference `siftool` (built here from
Debian's packaged Go source by scripts/build-siftool.sh), `ch-run`, squashfs readers, and helpers to
run `hpcconv convert` as a user would.

Import the fixtures into a test module with `from siftools import siftool, ...  # noqa: F401`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REQUIRE_ALL, WORK, need

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-siftool.sh"
SIF_SRC = Path("/usr/share/gocode/src/github.com/sylabs/sif/pkg/siftool")


def _missing(msg: str):
    if REQUIRE_ALL:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def siftool() -> str:
    """Path of the reference siftool, built once per machine into the test work dir."""
    need("go")
    if not SIF_SRC.is_dir():
        _missing("golang-github-sylabs-sif-dev is not installed (run scripts/setup-system.sh)")
    dest = WORK / "siftool" / "siftool"
    stamp = dest.with_suffix(".built-from")
    key = hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()
    if not dest.exists() or not stamp.exists() or stamp.read_text() != key:
        dest.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["bash", str(BUILD_SCRIPT), str(dest)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.fail(f"building siftool failed:\n{r.stderr}")
        stamp.write_text(key)
    return str(dest)


def sift(tool: str, *args: str, binary: bool = False):
    r = subprocess.run([tool, *args], capture_output=True)
    assert r.returncode == 0, f"siftool {' '.join(args)} failed: {r.stderr.decode(errors='replace')}"
    return r.stdout if binary else r.stdout.decode()


def sif_list(tool: str, path) -> list[dict]:
    """`siftool list` rows as dicts: id, group, link, start, end, type."""
    rows = []
    for line in sift(tool, "list", str(path)).splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 5 and parts[0].isdigit():
            start, end = parts[3].split("-")
            rows.append({"id": int(parts[0]), "group": parts[1], "link": parts[2], "start": int(start),
                         "end": int(end), "type": parts[4]})
    return rows


def sif_info(tool: str, obj_id: int, path) -> dict[str, str]:
    out = {}
    for line in sift(tool, "info", str(obj_id), str(path)).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def sif_header(tool: str, path) -> dict[str, str]:
    out = {}
    for line in sift(tool, "header", str(path)).splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def hpcconv(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the hpcconv CLI as a user would (a separate process)."""
    full = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, env=full,
                       cwd=str(ROOT))
    if check:
        assert r.returncode == 0, f"hpcconv {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


# squashfs contents, read with squashfs-tools-ng's sqfs2tar (independent of hpcconv's code) -----------------
def squashfs_tree(path, offset: int = 0) -> dict[str, dict]:
    """path -> {type, mode, uid, gid, link, sha256} of a squashfs (at `offset` in the file)."""
    src = str(path)
    if offset:
        tmp = Path(str(path) + f".part{offset}")
        with open(path, "rb") as f, open(tmp, "wb") as g:
            f.seek(offset)
            shutil.copyfileobj(f, g)
        src = str(tmp)
    try:
        r = subprocess.run([need("sqfs2tar"), "--no-skip", src], capture_output=True)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
    finally:
        if offset:
            os.unlink(src)
    return tar_tree(r.stdout)


def tar_tree(data: bytes) -> dict[str, dict]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for ti in tf:
            name = ti.name
            while name.startswith("./"):
                name = name[2:]
            name = name.strip("/")
            if not name or name == ".":
                continue
            kind = ("dir" if ti.isdir() else "symlink" if ti.issym() else "hardlink" if ti.islnk()
                    else "file" if ti.isfile() else "char" if ti.ischr() else "block" if ti.isblk()
                    else "fifo" if ti.isfifo() else "other")
            d = {"type": kind, "mode": ti.mode & 0o7777, "uid": ti.uid, "gid": ti.gid, "mtime": int(ti.mtime),
                 "link": ti.linkname if kind in ("symlink", "hardlink") else "",
                 "xattrs": {k: v for k, v in ti.pax_headers.items() if k.startswith("SCHILY.xattr.")}}
            if kind == "file":
                d["sha256"] = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()
            out[name] = d
    return out


def chrun_env(extra: dict | None = None) -> dict:
    """A clean environment for ch-run: only what ch-run itself needs."""
    env = {"USER": os.environ.get("USER") or "root", "PATH": "/usr/local/bin:/usr/bin:/bin"}
    env.update(extra or {})
    return env


def ch_run(image, *cmd: str, env: dict | None = None, args: list[str] = ()) -> subprocess.CompletedProcess:
    exe = need("ch-run")
    return subprocess.run([exe, *args, str(image), "--", *cmd], capture_output=True,
                          env=env if env is not None else chrun_env())
