"""A Debian 12 base image for recipe builds in tests: `debootstrap --variant=minbase bookworm` from the
Debian archive, made once per machine and cached as a tar under the test work dir, then
`docker import`ed into the test engine as hpcconv-test/debian:12.

Run as a script to prepare the cache ahead of a test session: python3 tests/debianbase.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MIRROR = os.environ.get("HPCCONV_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TAG = "hpcconv-test/debian:12"


def rootfs_tar(cache: Path) -> Path:
    """The cached minbase rootfs tar (built with debootstrap when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / "debian12-minbase.tar"
    if out.exists():
        return out
    deb = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if not deb:
        raise RuntimeError("debootstrap is not installed (run scripts/setup-system.sh)")
    root = cache / "debian12-minbase.tmp"
    shutil.rmtree(root, ignore_errors=True)
    r = subprocess.run([deb, "--variant=minbase", "bookworm", str(root), MIRROR], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"debootstrap failed: {r.stderr[-2000:]}")
    # apt inside a Docker build: no recommends, one source list
    (root / "etc/apt/apt.conf.d/99hpcconv-test").write_text('APT::Install-Recommends "false";\n')
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / d).glob("*"):
            if p.is_file():
                p.unlink()
    tmp = out.with_suffix(".part")
    subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tmp), "."], check=True)
    tmp.rename(out)
    shutil.rmtree(root, ignore_errors=True)
    return out


def import_into(engine, cache: Path) -> str:
    """`docker import` the base into the engine (once: an existing tag is kept)."""
    if engine.run("image", "inspect", TAG, check=False).returncode == 0:
        return TAG
    tar = rootfs_tar(cache)
    with open(tar, "rb") as f:
        engine.run("import", "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "-c", 'CMD ["/bin/bash"]', "-", TAG, input=f.read())
    return TAG


if __name__ == "__main__":
    work = Path(os.environ.get("HPCCONV_TEST_WORK", "/var/tmp/hpcconv-test"))
    print(rootfs_tar(work / "debian"), file=sys.stderr)
