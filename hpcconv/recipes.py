"""Conversion recipes (``*.toml``) and ``hpcconv recipe run``.

A recipe names an image (a Dockerfile to build, or a SOURCE), the site profiles and targets to
convert it for, and the tests it must pass in Docker and after conversion::

    name = "numpy-tool"                 # default: the file's stem
    description = "..."
    dockerfile = "Dockerfile"           # relative to the recipe file; or: source = "docker://..."
    context = "."                       # build context (default: the Dockerfile's directory)
    tag = "hpcconv-recipes/numpy-tool"  # engine tag of the build (default: hpcconv-recipes/NAME:latest)
    profiles = ["generic-x86-64", "supermuc-ng"]   # default: no profile
    platform = "linux/arm64"            # optional: build for / pick this platform (default: the profiles')
    targets = ["charliecloud", "singularity", { target = "charliecloud", format = "dir" }]
                                        # or "site": per profile, what its site runs
    [build_args]
    BASE = "debian:12-slim"

    [[tests]]
    name = "numpy imports"
    run = "python3 -c 'import numpy; print(numpy.__version__)'"
    expect = "re:^1\\."                  # substring, or re: + regular expression
    exit_code = 0

``recipe run FILE.toml|DIR`` builds each Dockerfile once, runs the tests in Docker, converts every
(profile, target), validates and runs every output with the tests, and writes one report.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .harness.run import UserTest

KEYS = {"name", "description", "dockerfile", "context", "source", "tag", "profiles", "targets", "build_args",
        "tests", "platform"}
TARGETS = {"charliecloud": ("squashfs", "tar", "dir"), "singularity": ("sif", "sandbox"), "shifter": ("squashfs",)}


@dataclass
class Recipe:
    path: Path
    name: str
    description: str = ""
    dockerfile: Path | None = None
    context: Path | None = None
    source: str | None = None
    tag: str | None = None
    profiles: list[str | None] = field(default_factory=lambda: [None])
    targets: list[tuple[str, str]] = field(default_factory=list)
    build_args: dict[str, str] = field(default_factory=dict)
    tests: list[UserTest] = field(default_factory=list)
    platform: str | None = None


def load(path: Path) -> Recipe:
    path = Path(path)
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML: {e}") from None
    unknown = set(data) - KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}", hint="keys: " + ", ".join(sorted(KEYS)))
    name = str(data.get("name") or path.stem)
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
        raise UsageError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-'")
    r = Recipe(path, name, str(data.get("description", "")))
    if ("dockerfile" in data) == ("source" in data):
        raise UsageError(f"{where}: give exactly one of dockerfile = \"...\" or source = \"...\"")
    if "dockerfile" in data:
        r.dockerfile = (path.parent / data["dockerfile"]).resolve()
        if not r.dockerfile.is_file():
            raise UsageError(f"{where}: dockerfile {r.dockerfile} does not exist")
        r.context = (path.parent / data["context"]).resolve() if "context" in data else r.dockerfile.parent
        r.tag = data.get("tag") or f"hpcconv-recipes/{name.lower()}:latest"
    else:
        r.source = str(data["source"])
    profs = data.get("profiles", [])
    if not isinstance(profs, list) or not all(isinstance(p, str) for p in profs):
        raise UsageError(f"{where}: profiles must be a list of profile names")
    r.profiles = list(profs) or [None]
    targets = data.get("targets", ["charliecloud"])
    if not isinstance(targets, list) or not targets:
        raise UsageError(f"{where}: targets must be a non-empty list")
    for t in targets:
        if t == "site":       # per profile: the targets its site runs (resolved by site_targets)
            r.targets.append(("site", ""))
            continue
        tgt, fmt = (t, None) if isinstance(t, str) else (t.get("target"), t.get("format")) if isinstance(t, dict) else (None, None)
        if tgt not in TARGETS:
            raise UsageError(f"{where}: unknown target {tgt!r}", hint="charliecloud, singularity or shifter")
        fmt = fmt or TARGETS[tgt][0]
        if fmt not in TARGETS[tgt]:
            raise UsageError(f"{where}: {tgt} has no format {fmt!r}", hint=" or ".join(TARGETS[tgt]))
        r.targets.append((tgt, fmt))
    ba = data.get("build_args", {})
    if not isinstance(ba, dict):
        raise UsageError(f"{where}: [build_args] must be a table")
    r.build_args = {str(k): str(v) for k, v in ba.items()}
    tests = data.get("tests", [])
    if not isinstance(tests, list):
        raise UsageError(f"{where}: tests must be [[tests]] tables")
    r.tests = [UserTest.from_dict(t, f"{where}: tests[{i}]") for i, t in enumerate(tests)]
    r.platform = data.get("platform")
    if r.platform is not None and not (isinstance(r.platform, str) and re.match(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$", r.platform)):
        raise UsageError(f"{where}: platform {r.platform!r} is not OS/ARCH[/VARIANT], e.g. linux/arm64")
    return r


SITE_RUNTIMES = {"charliecloud": "charliecloud", "singularity": "singularity", "apptainer": "singularity",
                 "shifter": "shifter"}


def site_targets(targets: list[tuple[str, str]], profile) -> list[tuple[str, str]]:
    """Expand "site": the formats the profile's site runs (Charliecloud when it names none we emit)."""
    out: list[tuple[str, str]] = []
    for t, f in targets:
        if t == "site":
            runs = [SITE_RUNTIMES[r] for r in (profile.site.runtimes if profile else ()) if r in SITE_RUNTIMES]
            for tgt in runs or ["charliecloud"]:
                if (tgt, TARGETS[tgt][0]) not in out:
                    out.append((tgt, TARGETS[tgt][0]))
        elif (t, f) not in out:
            out.append((t, f))
    return out


def find(path: Path) -> list[Recipe]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.toml"))
        files = [f for f in files if "tests" in tomllib.loads(f.read_text()) or "targets" in tomllib.loads(f.read_text())]
        if not files:
            raise UsageError(f"no recipes (*.toml with targets or tests) under {path}")
        return [load(f) for f in files]
    if not path.is_file():
        raise UsageError(f"recipe {path} does not exist")
    return [load(path)]
