"""Test images for the preparation and `check` tests, made from real files of the host's Debian 12
(same glibc as the images need) and small libraries gcc builds here, written as OCI layouts that
hpcconv reads through its real `oci:` source."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ocitools import build_image, image_layout, rootfs_dir_to_tar

LIBDIR = "/usr/lib/x86_64-linux-gnu"
CLIBDIR = "usr/lib/x86_64-linux-gnu"


def rootfs(root: Path, files: dict[str, str | bytes | Path] = (), links: dict[str, str] = (),
           dirs: tuple[str, ...] = ()) -> Path:
    """A rootfs tree: files (host path or bytes), symlinks, empty dirs."""
    root.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for dst, src in dict(files).items():
        p = root / dst
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            p.write_bytes(src)
        else:
            shutil.copy(os.path.realpath(src), p)
            p.chmod(0o755)
    for dst, target in dict(links).items():
        p = root / dst
        p.parent.mkdir(parents=True, exist_ok=True)
        p.symlink_to(target)
    return root


def host_lib(soname: str) -> str:
    """The real file behind a host library soname (skips the test when it is not installed)."""
    import pytest

    path = os.path.realpath(f"{LIBDIR}/{soname}")
    if not os.path.isfile(path):
        if os.environ.get("HPCCONV_REQUIRE_ALL") == "1":
            pytest.fail(f"{LIBDIR}/{soname} is not installed (run scripts/setup-system.sh)")
        pytest.skip(f"{LIBDIR}/{soname} is not installed (run scripts/setup-system.sh)")
    return path


def glibc_files() -> dict[str, str]:
    """libc and the dynamic loader at the paths a Debian 12 image has them (loader at /lib64)."""
    return {f"{CLIBDIR}/libc.so.6": host_lib("libc.so.6"),
            "lib64/ld-linux-x86-64.so.2": host_lib("ld-linux-x86-64.so.2")}


def ldconfig(root: Path) -> None:
    """The real ldconfig writes the image's /etc/ld.so.cache (as a Dockerfile's RUN ldconfig would)."""
    (root / "etc/ld.so.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/x86_64-linux-gnu.conf").write_text(f"/usr/local/lib/x86_64-linux-gnu\n{LIBDIR}\n")
    subprocess.run(["ldconfig", "-r", str(root)], check=True, capture_output=True)


def layout_of(tmp: Path, root: Path, *, arch: str = "amd64", config: dict | None = None,
              extra_layers: list[bytes] = ()) -> Path:
    img = build_image([*extra_layers, rootfs_dir_to_tar(root)], arch=arch, config=config)
    return image_layout(tmp / "layout", img)


def gcc(out: Path, source: str, *flags: str) -> Path:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O2", "-o", str(out), str(src), *flags], check=True, capture_output=True)
    return out


def marked_libmpi(out: Path, mark: str, version: str = "12.1.0") -> Path:
    """A tiny shared library with soname libmpi.so.12 whose mpi_whoami() prints MARK."""
    src = f'#include <stdio.h>\nint MPI_Init(int *c, char ***v) {{ return 0; }}\nvoid mpi_whoami(void) {{ puts("{mark}"); }}\n'
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"libmpi.so.{version}"
    gcc(lib, src, "-shared", "-fPIC", "-Wl,-soname,libmpi.so.12")
    (out / "libmpi.so.12").symlink_to(lib.name)
    return lib


APP = "void mpi_whoami(void);\nint main(void) { mpi_whoami(); return 0; }\n"
