"""Hand-made entry streams over real files, for the rewrite-pass tests.

`stream(spec)` yields Entry objects like flatten does: parents before children, and a file's reader
valid only until the next entry is requested (the previous file is *closed* then, so a pass that reads
late fails loudly). Spec items:

    ("file", "usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6")  # real file
    ("bytes", "opt/x/version", b"6.0.3\n")
    ("symlink", "usr/lib/libmpi.so.12", "libmpich.so.12.2.2")
    ("dir", "opt/hpcconv")
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

from hpcconv.entries import DIR, FILE, SYMLINK, Entry

LIBDIR = "/usr/lib/x86_64-linux-gnu"
CLIBDIR = "usr/lib/x86_64-linux-gnu"


def _missing(path: str):
    import pytest

    msg = f"{path} is not installed (run scripts/setup-system.sh)"
    if os.environ.get("HPCCONV_REQUIRE_ALL") == "1":
        pytest.fail(msg)
    pytest.skip(msg, allow_module_level=True)


def real_name(soname: str, libdir: str = LIBDIR) -> str:
    """The file name a host soname link points to (libfabric.so.1 -> libfabric.so.1.20.0): tests do not
    hard-code Debian's package versions."""
    path = os.path.realpath(f"{libdir}/{soname}")
    if not os.path.isfile(path):
        _missing(f"{libdir}/{soname}")
    return os.path.basename(path)


def real(name: str, into: str = CLIBDIR, libdir: str = LIBDIR) -> tuple:
    """A real host library (file name or soname, resolved to the real file) as a file entry in the image."""
    src = os.path.realpath(f"{libdir}/{name}")
    if not os.path.isfile(src):
        _missing(f"{libdir}/{name}")
    if os.path.dirname(src) == os.path.realpath(libdir):
        name = os.path.basename(src)
    return ("file", f"{into}/{name}", src)


def stream(spec):
    seen_dirs: set[str] = set()
    prev = None
    for item in spec:
        kind, path = item[0], item[1].strip("/")
        parts = path.split("/")
        for i in range(1, len(parts) + (1 if kind == "dir" else 0)):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                yield Entry(d, DIR, 0o755)
        if prev is not None:
            prev.close()
            prev = None
        if kind == "dir":
            continue
        if kind == "symlink":
            yield Entry(path, SYMLINK, 0o777, linkname=item[2])
        elif kind == "bytes":
            prev = io.BytesIO(item[2])
            yield Entry(path, FILE, 0o644, size=len(item[2]), reader=prev)
        elif kind == "file":
            src = Path(item[2])
            prev = open(src, "rb")
            yield Entry(path, FILE, 0o755, size=os.path.getsize(src), reader=prev)
        else:
            raise ValueError(kind)
    if prev is not None:
        prev.close()


def run_passes(spec, profile=None, passes=None):
    from hpcconv.rewrite import default_passes
    from hpcconv.rewrite.base import PassRunner

    runner = PassRunner(passes if passes is not None else default_passes(), profile)
    return runner.run(stream(spec))


def by_name(checks) -> dict:
    return {c.name: c for c in checks.items}


def compile_c(tmp: Path, name: str, source: str, *flags: str) -> Path:
    src = tmp / f"{name}.c"
    src.write_text(source)
    out = tmp / name
    subprocess.run(["gcc", "-O3", "-o", str(out), str(src), *flags], check=True, capture_output=True)
    return out


VECTOR_LOOP = """
#include <stddef.h>
void saxpy(float *restrict y, const float *restrict x, float a, size_t n) { for (size_t i = 0; i < n; i++) y[i] = a * x[i] + y[i]; }
double dot(const double *restrict x, const double *restrict y, size_t n) { double s = 0; for (size_t i = 0; i < n; i++) s += x[i] * y[i]; return s; }
int main(int argc, char **argv) { float x[1024], y[1024]; (void)argv; for (int i = 0; i < 1024; i++) { x[i] = i; y[i] = argc; } saxpy(y, x, 2.0f, 1024); return (int)y[3]; }
"""


class ViewReader:
    """A reader with read_view, as flatten's readers over the C chunk reader: memoryviews of the
    content (entries.reader_of), bytes from read."""

    def __init__(self, data: bytes):
        self._m, self._pos = memoryview(data), 0

    def read(self, n=-1):
        return bytes(self.read_view(n))

    def read_view(self, n=-1):
        end = len(self._m) if n is None or n < 0 else min(len(self._m), self._pos + n)
        out, self._pos = self._m[self._pos:end], end
        return out

    def close(self):
        pass
