"""Architecture/site profiles: load, compose (`extends`), validate against a schema, resolve.

A profile is a TOML file. Shipped profiles live in ``hpcconv/arch_profiles/`` (package data, so a
wheel carries them); the repository's top-level ``arch-profiles`` is a symlink to that directory,
which is the one canonical copy. A profile is looked up by name (file stem) in, in order:

1. the directory of the profile that names it in ``extends`` (only for ``extends``),
2. each directory in ``$HPCCONV_PROFILE_PATH`` (``:``-separated; earlier wins, so a site can shadow
   a shipped profile of the same name),
3. the shipped directory.

A name that contains ``/`` or ends in ``.toml`` is a file path (relative paths in ``extends`` are
relative to the including file).

Composition: ``extends = ["a", "b"]`` merges ``a``, then ``b``, then the file itself; later wins.
Tables merge deeply, scalars and lists replace. A key written ``"name+"`` (quoted, with a trailing
plus) appends its list to the inherited list instead (duplicates are dropped). ``kind`` and
``extends`` are never inherited.

Validation happens twice: each file alone against :data:`SCHEMA` (unknown keys, types, enum values,
version formats; the error names that file and the key path), then the resolved profile for rules
that span keys (e.g. ``cpu.level`` only on x86_64; host MPI needs a family and library directories).

Unknown site facts are written as the string ``"unknown"`` (allowed wherever ``unknown_ok`` is set in
the schema); the typed :class:`Profile` holds ``None`` for them and lists them in ``unknowns``.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ProfileError

SHIPPED_DIR = Path(__file__).parent / "arch_profiles"
ENV_PATH = "HPCCONV_PROFILE_PATH"
UNKNOWN = "unknown"

# Formats ------------------------------------------------------------------------------------------
_FORMATS: dict[str, tuple[str, str]] = {
    # name: (regex, human description used in errors)
    "kernel": (r"\d+\.\d+(\.\d+)?", "a kernel version like 5.14 or 5.14.21"),
    "glibc": (r"2\.\d+", "a glibc version like 2.31"),
    "nvidia_driver": (r"\d+(\.\d+){0,2}", "an NVIDIA driver version like 550 or 550.54.15"),
    "rocm": (r"\d+\.\d+(\.\d+)?", "a ROCm version like 6.0 or 6.0.3"),
    "soname_version": (r"\d+(\.\d+){0,2}", "a library version like 12, 12.1 or 40.30.0"),
    "abs_path": (r"/[^\0:]*", "an absolute path without ':'"),
    "bind": (r"/[^\0:]*(:/[^\0:]*)?(:(ro|rw))?", "a bind 'HOST_PATH[:CONTAINER_PATH][:ro or :rw]' of absolute paths"),
    "url": (r"\S.*", "a URL or a source reference (not empty)"),
    "env_name": (r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name"),
    "oci_variant": (r"(v\d+)?", "an OCI platform variant like v8 (or empty)"),
    "aarch64_isa": (r"armv(8|9)(\.\d)?a", "an Arm architecture version like armv8.2a or armv9.0a"),
}

# Schema -------------------------------------------------------------------------------------------
# Each leaf is a dict: type (str|int|bool|list|table), optional enum, format, items (for list),
# values (for table: spec of each value, keys are free), unknown_ok, doc.
# A section is {"section": {key: spec, ...}, "doc": ...}.
CONFIDENCE = ("high", "medium", "low")
ARCHES = ("x86_64", "aarch64")
X86_LEVELS = ("v1", "v2", "v3", "v4")
FABRICS = ("none", "tcp", "omnipath", "infiniband", "slingshot")
GPU_VENDORS = ("none", "nvidia", "amd")
GPU_CLASSES = ("datacenter", "consumer")
MPI_MODES = ("host", "container")
MPI_FAMILIES = ("mpich-abi", "openmpi", "mpi-abi")
MPI_COMPAT = ("major", "full", "strict")
PMI = ("pmi2", "pmix", "cray_shasta")
SQUASHFS = ("gzip", "lzo", "lz4", "xz", "zstd", "lzma")
RUNTIMES = ("charliecloud", "singularity", "apptainer", "shifter", "sarus", "enroot", "podman-hpc",
            "container-engine")
KINDS = ("site", "generic", "fragment")
LIBFABRIC_PROVIDERS = ("cxi", "psm2", "opx", "psm3", "verbs", "efa", "tcp", "shm", "lnx", "mlx", "ucx", "sockets")

SCHEMA: dict[str, Any] = {
    "description": {"type": "str", "doc": "one line saying what the profile is"},
    "kind": {"type": "str", "enum": KINDS,
             "doc": "site (a real system), generic (a portable default) or fragment (only for extends); not inherited"},
    "extends": {"type": "list", "items": {"type": "str"}, "doc": "profiles merged first, in order; later wins; not inherited"},
    "confidence": {"type": "str", "enum": CONFIDENCE,
                   "doc": "how sure the facts are: high = primary source read, medium = secondary, low = general knowledge"},
    "sources": {"type": "list", "items": {"type": "str", "format": "url"}, "doc": "where the facts come from"},
    "notes": {"type": "table", "values": {"type": "str"}, "keys": "keypath",
              "doc": "per-key remarks (confidence, caveats), keyed by key path such as 'gpu.driver'"},
    "cpu": {"doc": "the compute nodes' CPU", "section": {
        "arch": {"type": "str", "enum": ARCHES, "doc": "instruction set architecture"},
        "variant": {"type": "str", "format": "oci_variant", "doc": "OCI platform variant used to pick a manifest (e.g. v8)"},
        "level": {"type": "str", "enum": X86_LEVELS, "doc": "x86-64 psABI micro-architecture level (x86_64 only)"},
        "target": {"type": "str", "unknown_ok": True, "doc": "archspec micro-architecture name, e.g. zen3, neoverse_v2"},
        "isa": {"type": "str", "format": "aarch64_isa", "doc": "Arm architecture version (aarch64 only)"},
        "sve_vector_bits": {"type": "int", "enum": (0, 128, 256, 512, 1024, 2048),
                            "doc": "SVE vector length in bits, 0 = no SVE (aarch64 only)"},
        "features": {"type": "list", "items": {"type": "str"}, "doc": "notable CPU features beyond the level/ISA (cpuinfo spelling)"},
        "model": {"type": "str", "doc": "CPU model in words"},
    }},
    "host": {"doc": "the compute nodes' system software", "section": {
        "os": {"type": "str", "unknown_ok": True, "doc": "host OS in words"},
        "kernel": {"type": "str", "format": "kernel", "unknown_ok": True, "doc": "host kernel version"},
        "glibc": {"type": "str", "format": "glibc", "unknown_ok": True, "doc": "host glibc version (host libraries are built against it)"},
        "container_glibc_min": {"type": "str", "format": "glibc", "unknown_ok": True,
                                "doc": "lowest glibc in the image for host-injected libraries to load (default: host.glibc)"},
        "squashfs": {"type": "list", "items": {"type": "str", "enum": SQUASHFS},
                     "doc": "squashfs compressions the site can mount, preferred first"},
    }},
    "interconnect": {"doc": "the high-speed network", "section": {
        "type": {"type": "str", "enum": FABRICS, "doc": "fabric family"},
        "model": {"type": "str", "unknown_ok": True, "doc": "fabric model in words, e.g. HDR200"},
        "nics": {"type": "int", "doc": "NICs per node"},
        "providers": {"type": "list", "items": {"type": "str", "enum": LIBFABRIC_PROVIDERS},
                      "doc": "libfabric providers that use this fabric, preferred first"},
        "devices": {"type": "list", "items": {"type": "str", "format": "abs_path"}, "doc": "device nodes (globs) the fabric needs"},
        "env": {"type": "table", "values": {"type": "str"}, "keys": "env_name", "doc": "environment the fabric needs"},
    }},
    "gpu": {"doc": "accelerators", "section": {
        "vendor": {"type": "str", "enum": GPU_VENDORS, "doc": "GPU vendor"},
        "model": {"type": "str", "unknown_ok": True, "doc": "GPU model in words"},
        "arch": {"type": "str", "unknown_ok": True, "doc": "GPU architecture, e.g. sm_80 or gfx90a"},
        "count": {"type": "int", "doc": "GPUs per node"},
        "class": {"type": "str", "enum": GPU_CLASSES, "doc": "datacenter GPUs support CUDA forward compatibility"},
        "driver": {"type": "str", "format": "nvidia_driver", "unknown_ok": True, "doc": "NVIDIA driver version (nvidia only)"},
        "rocm": {"type": "str", "format": "rocm", "unknown_ok": True, "doc": "ROCm release the host driver goes with (amd only)"},
    }},
    "mpi": {"doc": "which MPI runs the job", "section": {
        "mode": {"type": "str", "enum": MPI_MODES, "doc": "host = inject the host MPI into the image; container = use the image's"},
        "family": {"type": "str", "enum": MPI_FAMILIES, "doc": "ABI family of the host MPI"},
        "abi": {"type": "str", "format": "soname_version", "unknown_ok": True,
                "doc": "host libmpi soname version, major[.minor] (e.g. 12.1 for libmpi.so.12.1.x)"},
        "implementation": {"type": "str", "unknown_ok": True, "doc": "host MPI implementation and version in words"},
        "compat": {"type": "str", "enum": MPI_COMPAT,
                   "doc": "Sarus-style ABI rule: major (equal major), full (and host minor >= container minor: warn), strict (minors equal)"},
        "lib_dirs": {"type": "list", "items": {"type": "str", "format": "abs_path"},
                     "doc": "container directories the host MPI is bound at, searched first by the loader, in order"},
        "binds": {"type": "list", "items": {"type": "str", "format": "bind"}, "doc": "host paths the host MPI needs"},
        "env": {"type": "table", "values": {"type": "str"}, "keys": "env_name", "doc": "environment the host MPI needs"},
        "pmi": {"type": "list", "items": {"type": "str", "enum": PMI}, "doc": "process-management interfaces srun offers, preferred first"},
    }},
    "site": {"doc": "site integration", "section": {
        "name": {"type": "str", "doc": "centre and system in words"},
        "runtimes": {"type": "list", "items": {"type": "str", "enum": RUNTIMES}, "doc": "container runtimes the site allows"},
        "binds": {"type": "list", "items": {"type": "str", "format": "bind"}, "doc": "site file systems bound into containers"},
        "mountpoints": {"type": "list", "items": {"type": "str", "format": "abs_path"},
                        "doc": "directories to create in the image as bind targets"},
        "env": {"type": "table", "values": {"type": "str"}, "keys": "env_name", "doc": "environment for every container"},
    }},
}

NOT_INHERITED = ("kind", "extends")


def _leaf_paths(schema: dict, prefix: str = "") -> dict[str, dict]:
    out = {}
    for k, spec in schema.items():
        if "section" in spec:
            out.update(_leaf_paths(spec["section"], prefix + k + "."))
        else:
            out[prefix + k] = spec
    return out


LEAVES: dict[str, dict] = _leaf_paths(SCHEMA)


# Loading ------------------------------------------------------------------------------------------
def _show(path: Path) -> str:
    """A path as errors show it: relative to the working directory when under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def search_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get(ENV_PATH, "").split(":") if d]
    return dirs + [SHIPPED_DIR]


def _is_path(name: str) -> bool:
    return "/" in name or name.endswith(".toml")


def find_profile(name: str, near: Path | None = None) -> Path:
    """The file of profile NAME (a stem or a path). Raises ProfileError listing where it looked."""
    if _is_path(name):
        p = Path(name)
        if near is not None and not p.is_absolute():
            p = near / p
        if p.is_file():
            return p
        raise ProfileError(f"profile file {name} does not exist")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ProfileError(f"bad profile name {name!r}", hint="use a file stem such as lumi-g, or a path to a .toml file")
    dirs = ([near] if near is not None else []) + search_dirs()
    for d in dirs:
        p = d / f"{name}.toml"
        if p.is_file():
            return p
    avail = sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.toml")})
    close = difflib.get_close_matches(name, avail, n=3)
    hint = ("did you mean " + ", ".join(close) + "?") if close else "see `hpcconv profiles list --all`"
    raise ProfileError(f"unknown profile {name!r}", hint=hint)


def load_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{_show(path)}: not valid TOML: {e}") from None
    except OSError as e:
        raise ProfileError(f"{_show(path)}: cannot read: {e.strerror}") from None
    validate_file(data, path)
    return data


# Validation ---------------------------------------------------------------------------------------
def _fmt_allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def _check_value(v: Any, spec: dict, where: str, keypath: str) -> None:
    t = spec["type"]
    err = f"{where}: {keypath}:"
    if t == "str":
        if not isinstance(v, str):
            raise ProfileError(f"{err} expected a string, got {_type_name(v)} {v!r}")
        if spec.get("unknown_ok") and v == UNKNOWN:
            return
        if "enum" in spec and v not in spec["enum"]:
            close = difflib.get_close_matches(v, [str(x) for x in spec["enum"]], n=1)
            raise ProfileError(f"{err} {v!r} is not one of {_fmt_allowed(spec['enum'])}",
                               hint=f"did you mean {close[0]!r}?" if close else None)
        if "format" in spec:
            rx, desc = _FORMATS[spec["format"]]
            if not re.fullmatch(rx, v):
                extra = " or 'unknown'" if spec.get("unknown_ok") else ""
                raise ProfileError(f"{err} {v!r} is not {desc}{extra}")
    elif t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"{err} expected an integer, got {_type_name(v)} {v!r}")
        if "enum" in spec and v not in spec["enum"]:
            raise ProfileError(f"{err} {v!r} is not one of {_fmt_allowed(spec['enum'])}")
        if v < 0:
            raise ProfileError(f"{err} {v!r} must not be negative")
    elif t == "bool":
        if not isinstance(v, bool):
            raise ProfileError(f"{err} expected true or false, got {_type_name(v)} {v!r}")
    elif t == "list":
        if not isinstance(v, list):
            raise ProfileError(f"{err} expected a list, got {_type_name(v)} {v!r}")
        for i, item in enumerate(v):
            _check_value(item, spec["items"], where, f"{keypath}[{i}]")
    elif t == "table":
        if not isinstance(v, dict):
            raise ProfileError(f"{err} expected a table, got {_type_name(v)} {v!r}")
        for k, item in v.items():
            kind = spec.get("keys")
            if kind == "keypath":
                if k not in LEAVES and k not in SCHEMA:
                    close = difflib.get_close_matches(k, list(LEAVES), n=1)
                    raise ProfileError(f"{err} {k!r} is not a key path of the schema",
                                       hint=f"did you mean {close[0]!r}?" if close else None)
            elif kind and not re.fullmatch(_FORMATS[kind][0], k):
                raise ProfileError(f"{err} key {k!r} is not {_FORMATS[kind][1]}")
            _check_value(item, spec["values"], where, f"{keypath}.{k}")
    else:  # pragma: no cover - schema bug
        raise AssertionError(f"bad schema type {t}")


def _check_table(data: dict, schema: dict, where: str, prefix: str) -> None:
    for raw_key, v in data.items():
        key = raw_key[:-1] if raw_key.endswith("+") else raw_key
        keypath = prefix + key
        spec = schema.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(schema), n=1)
            raise ProfileError(f"{where}: {prefix + raw_key}: unknown key (allowed: {_fmt_allowed(schema)})",
                               hint=f"did you mean {prefix + close[0]!r}?" if close else None)
        if raw_key.endswith("+") and spec.get("type") != "list":
            raise ProfileError(f"{where}: {prefix + raw_key}: the append form 'key+' is only for lists")
        if "section" in spec:
            if not isinstance(v, dict):
                raise ProfileError(f"{where}: {keypath}: expected a table [{keypath}], got {_type_name(v)} {v!r}")
            _check_table(v, spec["section"], where, keypath + ".")
        else:
            _check_value(v, spec, where, keypath)


def validate_file(data: dict, path: Path) -> None:
    """Check one file alone against SCHEMA; errors name the file and the key path."""
    _check_table(data, SCHEMA, _show(path), "")


def _get(d: dict, keypath: str, default=None):
    cur: Any = d
    for part in keypath.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _validate_resolved(d: dict, where: str, kind: str) -> None:
    """Rules spanning several keys, on the resolved profile (errors name the top file)."""

    def bad(msg: str, hint: str | None = None):
        raise ProfileError(f"{where}: {msg}", hint=hint)

    if kind == "fragment":
        return
    arch = _get(d, "cpu.arch")
    if arch is None:
        bad("cpu.arch: missing (required, one of " + _fmt_allowed(ARCHES) + ")",
            hint="set it or extend a fragment such as x86-64-v3 or aarch64")
    if _get(d, "confidence") is None:
        bad("confidence: missing (required, one of " + _fmt_allowed(CONFIDENCE) + ")")
    if kind == "site" and not _get(d, "sources"):
        bad("sources: a site profile needs at least one source",
            hint='list where the facts come from, or set kind = "generic" for a profile that is not a real site')
    if arch != "x86_64" and _get(d, "cpu.level") is not None:
        bad(f"cpu.level: only for x86_64, but cpu.arch is {arch}")
    if arch == "x86_64":
        if _get(d, "cpu.level") is None:
            bad("cpu.level: missing for x86_64 (one of " + _fmt_allowed(X86_LEVELS) + ")")
        for k in ("isa", "sve_vector_bits"):
            if _get(d, f"cpu.{k}") is not None:
                bad(f"cpu.{k}: only for aarch64, but cpu.arch is x86_64")
    vendor = _get(d, "gpu.vendor", "none")
    if vendor != "nvidia" and _get(d, "gpu.driver") is not None:
        bad(f"gpu.driver: only for gpu.vendor nvidia, but gpu.vendor is {vendor}")
    if vendor != "amd" and _get(d, "gpu.rocm") is not None:
        bad(f"gpu.rocm: only for gpu.vendor amd, but gpu.vendor is {vendor}")
    if vendor == "nvidia" and _get(d, "gpu.driver") is None:
        bad("gpu.driver: missing for an nvidia GPU (a version, or 'unknown')")
    if vendor == "amd" and _get(d, "gpu.rocm") is None:
        bad("gpu.rocm: missing for an amd GPU (a version, or 'unknown')")
    if vendor == "none":
        for k in ("model", "arch", "count", "class"):
            if _get(d, f"gpu.{k}") is not None:
                bad(f"gpu.{k}: set, but gpu.vendor is none")
    if _get(d, "mpi.mode", "container") == "host":
        for k in ("family", "lib_dirs"):
            if not _get(d, f"mpi.{k}"):
                bad(f"mpi.{k}: missing; mpi.mode = 'host' needs the host MPI's family and the container "
                    "directories it is bound at", hint="extend mpich-abi-host or openmpi-host, or set mpi.mode = 'container'")
    fabric = _get(d, "interconnect.type", "tcp")
    if fabric in ("none", "tcp") and _get(d, "interconnect.providers"):
        bad(f"interconnect.providers: set, but interconnect.type is {fabric}")


# Merging ------------------------------------------------------------------------------------------
def merge(base: dict, over: dict) -> dict:
    """Deep merge: tables merge, scalars and lists replace, 'key+' appends to a list."""
    out = dict(base)
    for k, v in over.items():
        if k.endswith("+"):
            k = k[:-1]
            prev = out.get(k) or []
            out[k] = prev + [x for x in v if x not in prev]
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _strip_append(d: dict) -> dict:
    """A file with no base: 'key+' means 'key'."""
    out = {}
    for k, v in d.items():
        if k.endswith("+"):
            out[k[:-1]] = list(dict.fromkeys(v))
        elif isinstance(v, dict):
            out[k] = _strip_append(v)
        else:
            out[k] = v
    return out


def _resolve_raw(path: Path, stack: tuple[Path, ...], cache: dict[Path, tuple[dict, list[str]]]) -> tuple[dict, list[str]]:
    key = path.resolve()
    if key in stack:
        cycle = " -> ".join(p.stem for p in stack[stack.index(key):]) + f" -> {key.stem}"
        raise ProfileError(f"{_show(path)}: extends cycle: {cycle}")
    if key in cache:
        return cache[key]
    data = load_file(path)
    merged: dict = {}
    chain: list[str] = []
    for parent in data.get("extends", []):
        try:
            ppath = find_profile(parent, near=path.parent)
        except ProfileError as e:
            raise ProfileError(f"{_show(path)}: extends: {e.message}", hint=e.hint) from None
        pdata, pchain = _resolve_raw(ppath, stack + (key,), cache)
        merged = merge(merged, {k: v for k, v in pdata.items() if k not in NOT_INHERITED})
        chain += [c for c in pchain if c not in chain]
    own = {k: v for k, v in data.items() if k != "extends"}
    merged = merge(merged, own) if merged else _strip_append(own)
    merged = _strip_append(merged)  # leftover 'key+' from files with no base for that key
    chain.append(path.stem)
    cache[key] = (merged, chain)
    return merged, chain


# Typed profile ------------------------------------------------------------------------------------
def _known(v):
    return None if v == UNKNOWN else v


@dataclass(frozen=True)
class CPU:
    arch: str
    variant: str = ""
    level: str | None = None
    target: str | None = None
    isa: str | None = None
    sve_vector_bits: int | None = None
    features: tuple[str, ...] = ()
    model: str | None = None

    @property
    def level_num(self) -> int | None:
        return int(self.level[1:]) if self.level else None


@dataclass(frozen=True)
class Host:
    os: str | None = None
    kernel: str | None = None
    glibc: str | None = None
    container_glibc_min: str | None = None
    squashfs: tuple[str, ...] = ("gzip",)


@dataclass(frozen=True)
class Interconnect:
    type: str = "tcp"
    model: str | None = None
    nics: int | None = None
    providers: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GPU:
    vendor: str = "none"
    model: str | None = None
    arch: str | None = None
    count: int | None = None
    gpu_class: str | None = None
    driver: str | None = None
    rocm: str | None = None


@dataclass(frozen=True)
class MPI:
    mode: str = "container"
    family: str | None = None
    abi: str | None = None
    implementation: str | None = None
    compat: str = "full"
    lib_dirs: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    pmi: tuple[str, ...] = ()


@dataclass(frozen=True)
class Site:
    name: str | None = None
    runtimes: tuple[str, ...] = ()
    binds: tuple[str, ...] = ()
    mountpoints: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    kind: str
    description: str
    chain: tuple[str, ...]          # resolution order, ending with this profile
    confidence: str | None
    sources: tuple[str, ...]
    notes: dict[str, str]
    unknowns: tuple[str, ...]       # key paths whose value is 'unknown'
    cpu: CPU
    host: Host
    interconnect: Interconnect
    gpu: GPU
    mpi: MPI
    site: Site
    data: dict                      # the resolved TOML data, as `profiles show` prints it

    @property
    def oci_arch(self) -> str:
        return {"x86_64": "amd64", "aarch64": "arm64"}[self.cpu.arch]

    @property
    def platform(self):
        from .image import Platform

        return Platform("linux", self.oci_arch, self.cpu.variant).normalized()

    def to_json(self) -> dict:
        return {"name": self.name, "path": str(self.path), "chain": list(self.chain), **self.data}

    def summary(self) -> dict:
        """One row of `profiles list`."""
        if self.cpu.arch == "x86_64":
            level = self.cpu.level or ""
        else:
            level = self.cpu.target or self.cpu.isa or ""
        gpu = self.gpu.vendor
        if self.gpu.vendor == "nvidia":
            gpu += f" {self.gpu.driver or UNKNOWN}"
        elif self.gpu.vendor == "amd":
            gpu += f" rocm {self.gpu.rocm or UNKNOWN}"
        mpi = self.mpi.mode if self.mpi.mode == "container" else f"host {self.mpi.family}"
        fabric = self.interconnect.type
        if self.kind == "fragment":  # show only what the fragment sets, not the defaults
            fabric = _get(self.data, "interconnect.type", "")
            gpu = gpu if "gpu" in self.data else ""
            mpi = mpi if "mpi" in self.data else ""
        return {"name": self.name, "kind": self.kind, "arch": self.cpu.arch, "level": level,
                "fabric": fabric, "gpu": gpu, "mpi": mpi,
                "confidence": self.confidence or "", "description": self.description}


def _tuple(v) -> tuple:
    return tuple(v or ())


def _build(name: str, path: Path, kind: str, chain: list[str], d: dict) -> Profile:
    unknowns = tuple(k for k in LEAVES if _get(d, k) == UNKNOWN)
    g = lambda k, default=None: _known(_get(d, k, default))  # noqa: E731
    return Profile(
        name=name, path=path, kind=kind, description=d.get("description", ""), chain=tuple(chain),
        confidence=d.get("confidence"), sources=_tuple(d.get("sources")), notes=dict(d.get("notes", {})),
        unknowns=unknowns,
        cpu=CPU(arch=g("cpu.arch", ""), variant=g("cpu.variant", ""), level=g("cpu.level"), target=g("cpu.target"),
                isa=g("cpu.isa"), sve_vector_bits=g("cpu.sve_vector_bits"), features=_tuple(g("cpu.features")),
                model=g("cpu.model")),
        host=Host(os=g("host.os"), kernel=g("host.kernel"), glibc=g("host.glibc"),
                  container_glibc_min=g("host.container_glibc_min", _get(d, "host.glibc")),
                  squashfs=_tuple(g("host.squashfs")) or ("gzip",)),
        interconnect=Interconnect(type=g("interconnect.type", "tcp"), model=g("interconnect.model"),
                                  nics=g("interconnect.nics"), providers=_tuple(g("interconnect.providers")),
                                  devices=_tuple(g("interconnect.devices")), env=dict(g("interconnect.env", {}))),
        gpu=GPU(vendor=g("gpu.vendor", "none"), model=g("gpu.model"), arch=g("gpu.arch"), count=g("gpu.count"),
                gpu_class=g("gpu.class"), driver=g("gpu.driver"), rocm=g("gpu.rocm")),
        mpi=MPI(mode=g("mpi.mode", "container"), family=g("mpi.family"), abi=g("mpi.abi"),
                implementation=g("mpi.implementation"), compat=g("mpi.compat", "full"),
                lib_dirs=_tuple(g("mpi.lib_dirs")), binds=_tuple(g("mpi.binds")), env=dict(g("mpi.env", {})),
                pmi=_tuple(g("mpi.pmi"))),
        site=Site(name=g("site.name"), runtimes=_tuple(g("site.runtimes")), binds=_tuple(g("site.binds")),
                  mountpoints=_tuple(g("site.mountpoints")), env=dict(g("site.env", {}))),
        data=d,
    )


def _ordered(d: dict, schema: dict) -> dict:
    """The resolved data with keys in schema order (for `profiles show`)."""
    out = {}
    for k, spec in sorted(schema.items(), key=lambda kv: kv[0] == "notes"):
        if k in d:
            out[k] = _ordered(d[k], spec["section"]) if "section" in spec else d[k]
    return out


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Find, load, compose and validate a profile; raises ProfileError with file and key on any problem."""
    path = find_profile(str(name_or_path))
    raw = load_file(path)
    kind = raw.get("kind", "site")
    merged, chain = _resolve_raw(path, (), {})
    merged = {k: v for k, v in merged.items() if k not in NOT_INHERITED}
    _validate_resolved(merged, _show(path), kind)
    return _build(path.stem, path, kind, chain, _ordered(merged, SCHEMA))


def list_profiles(include_fragments: bool = False) -> list[Profile]:
    """Every profile found on the search path (a name shadowed by an earlier directory is listed once)."""
    seen: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                seen.setdefault(p.stem, p)
    out = []
    for stem, p in sorted(seen.items()):
        prof = load_profile(p)
        if include_fragments or prof.kind != "fragment":
            out.append(prof)
    return out


# Rendering ----------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def to_toml(d: dict, prefix: str = "") -> str:
    """A small TOML writer for resolved profiles (scalars, lists of scalars, nested tables)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = f"{prefix}{_toml_key(k)}"
            body = to_toml(v, name + ".")
            lines.append("")
            lines.append(f"[{name}]")
            if body:
                lines.append(body.lstrip("\n"))
    return "\n".join(lines)
