"""`bundle create --with-tool`: a wheelhouse of hpcconv and every dependency for the centre's
Python and platform, pinned with hashes, plus `install.sh`, so hpcconv installs with no network.

* hpcconv's own wheel is written here from the running package (pure Python, `py3-none-any`), so
  the bundle carries exactly the code that made it and no build backend is needed.
* Dependencies come from `pip download --only-binary=:all:` for the target interpreter and platform
  tags (manylinux, glibc 2.17 and newer up to the target's glibc), from PyPI or whatever index pip
  is configured with; only creation needs it.
* `requirements.txt` pins every wheel with `--hash=sha256:`; install.sh checks SHA256SUMS, ignores
  the site's pip configuration and installs with `--no-index --require-hashes`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, interrupts
from ..errors import SourceError, UsageError

INSTALL_SH = r"""#!/bin/sh
# Install hpcconv offline from this wheelhouse (made by `hpcconv bundle create --with-tool`).
#   sh install.sh VENV_DIR    create a virtual environment there and install into it
#   sh install.sh             install into the active virtualenv ($VIRTUAL_ENV), else with pip --user
# PYTHON=python3.11 picks the interpreter. No network is used: --no-index, hashes required.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
if command -v sha256sum >/dev/null 2>&1; then
    (cd "$here" && sha256sum -c --quiet SHA256SUMS) || { echo "install.sh: wheelhouse damaged (SHA256SUMS)" >&2; exit 4; }
fi
user=""
if [ $# -ge 1 ]; then
    [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
    py="$1/bin/python"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    py="$VIRTUAL_ENV/bin/python"
else
    py="$PYTHON"; user="--user"
fi
want="@PYVER@"
have=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$have" != "$want" ]; then
    echo "install.sh: this wheelhouse is for Python $want, $py is $have (set PYTHON=python$want)" >&2
    exit 2
fi
PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 "$py" -m pip install --disable-pip-version-check --no-index \
    --find-links "$here/wheels" --require-hashes $user -r "$here/requirements.txt"
"$py" -m hpcconv.cli --version
"""

README = """hpcconv @VERSION@ wheelhouse for Python @PYVER@ on @PLATFORMS@

Extract it from the bundle without hpcconv:
    tar -xf NAME.hpcbundle tool/                                          (one file)
    ls NAME.hpcbundle.part* | grep -v 'part000$' | xargs cat | tar -x tool/  (parts: all but part000, in order)
then:  sh tool/install.sh ~/hpcconv-venv  &&  ~/hpcconv-venv/bin/hpcconv bundle verify NAME.hpcbundle --key KEY.pub
"""


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _requirements() -> list[str]:
    """hpcconv's runtime requirements: from pyproject.toml in a source checkout, else installed metadata."""
    pkg = Path(__file__).resolve().parent.parent
    pyproject = pkg.parent / "pyproject.toml"
    if pyproject.is_file():
        import tomllib

        data = tomllib.loads(pyproject.read_text())
        if data.get("project", {}).get("name") == "hpcconv":
            return list(data["project"].get("dependencies", []))
    from importlib.metadata import requires

    return [r for r in (requires("hpcconv") or []) if "extra ==" not in r]


def build_own_wheel(dest: Path, requirements: list[str]) -> Path:
    """A py3-none-any wheel of the running hpcconv package (deterministic zip)."""
    pkg = Path(__file__).resolve().parent.parent
    name = f"hpcconv-{__version__}-py3-none-any.whl"
    dist = f"hpcconv-{__version__}.dist-info"
    files: list[tuple[str, bytes]] = []
    for root, dirs, names in os.walk(pkg):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
            if n.endswith((".pyc", ".pyo")):
                continue
            full = Path(root) / n
            if full.is_symlink() or not full.is_file():
                continue
            files.append((str(full.relative_to(pkg.parent)), full.read_bytes()))
    meta = ["Metadata-Version: 2.1", "Name: hpcconv", f"Version: {__version__}",
            "Summary: Convert Docker/OCI images into HPC container images", "Requires-Python: >=3.11"]
    meta += [f"Requires-Dist: {r}" for r in requirements]
    files.append((f"{dist}/METADATA", ("\n".join(meta) + "\n").encode()))
    files.append((f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: hpcconv\nRoot-Is-Purelib: true\nTag: py3-none-any\n"))
    files.append((f"{dist}/entry_points.txt", b"[console_scripts]\nhpcconv = hpcconv.cli:main\n"))
    files.append((f"{dist}/top_level.txt", b"hpcconv\n"))
    record = "".join(f"{p},sha256={_b64(hashlib.sha256(d).digest())},{len(d)}\n" for p, d in files)
    record += f"{dist}/RECORD,,\n"
    files.append((f"{dist}/RECORD", record.encode()))
    out = dest / name
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files:
            zi = zipfile.ZipInfo(p, date_time=(1980, 1, 1, 0, 0, 0))
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, d)
    return out


def _glibc() -> tuple[int, int]:
    import platform

    lib, ver = platform.libc_ver()
    m = re.match(r"(\d+)\.(\d+)", ver or "")
    return (int(m.group(1)), int(m.group(2))) if lib == "glibc" and m else (2, 17)


def manylinux_tags(arch: str, glibc: tuple[int, int]) -> list[str]:
    tags = [f"manylinux_2_{m}_{arch}" for m in range(glibc[1], 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686"):
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"] + [f"manylinux_2_{m}_{arch}" for m in (12, 5)]
    return tags


@dataclass
class ToolSpec:
    python: str                 # "3.11"
    platforms: list[str]        # wheel platform tags, best first

    @classmethod
    def for_target(cls, python: str | None, platforms: list[str] | None, image_platforms=None) -> "ToolSpec":
        py = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
        if not re.fullmatch(r"3\.\d{1,2}", py):
            raise UsageError(f"--tool-python {py}: give a version like 3.11")
        if platforms:
            return cls(py, list(platforms))
        arch = os.uname().machine
        arches = {p.architecture for p in image_platforms or []}
        if len(arches) == 1:
            arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(arches.pop(), arch)
        glibc = (2, 28)     # RHEL/Rocky 8 and newer; --tool-platform for others
        return cls(py, manylinux_tags(arch, glibc))

    def build(self, work: Path, reporter=None) -> list[tuple[str, Path]]:
        wheels = work / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        reqs = _requirements()
        build_own_wheel(wheels, reqs)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
               "--dest", str(wheels), "--python-version", self.python, "--implementation", "cp"]
        for p in self.platforms:
            cmd += ["--platform", p]
        r = interrupts.run(cmd + reqs, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise SourceError("pip download of hpcconv's dependencies failed: " + " / ".join(tail),
                              hint="creating --with-tool needs PyPI (or a configured index); pick other wheel "
                                   "platforms with --tool-platform")
        req_lines, sums = [], []
        for w in sorted(wheels.glob("*.whl")):
            dist, ver = w.name.split("-")[:2]
            digest = hashlib.sha256(w.read_bytes()).hexdigest()
            req_lines.append(f"{dist.replace('_', '-')}=={ver} --hash=sha256:{digest}")
            sums.append(f"{digest}  wheels/{w.name}")
        (work / "requirements.txt").write_text("\n".join(req_lines) + "\n")
        (work / "install.sh").write_text(INSTALL_SH.replace("@PYVER@", self.python))
        (work / "README.txt").write_text(README.replace("@VERSION@", __version__).replace("@PYVER@", self.python)
                                         .replace("@PLATFORMS@", self.platforms[0]))
        for n in ("requirements.txt", "install.sh", "README.txt"):
            sums.append(f"{hashlib.sha256((work / n).read_bytes()).hexdigest()}  {n}")
        (work / "SHA256SUMS").write_text("\n".join(sums) + "\n")
        out = [(n, work / n) for n in ("install.sh", "README.txt", "requirements.txt", "SHA256SUMS")]
        out += [(f"wheels/{w.name}", w) for w in sorted(wheels.glob("*.whl"))]
        return out
