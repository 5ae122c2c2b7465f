"""Preparation: adapt an image to a profile, as entry-stream changes plus a modified image config.

The plan is a pure function of the profile (so the config, which emitters read before the stream
starts, is known up front); the stream part runs inside the single :class:`PassRunner` pass: paths
the plan creates are watched as they go by, entries the plan replaces are dropped in place, and the
new entries are appended at the end of the stream (``Pass.additions``).

What is prepared (each item reported as a change and summed up in a ``prepare.*`` check):

* **host MPI** (``mpi.mode = "host"``): every ``mpi.lib_dirs`` directory is created empty, as the bind
  target of the host MPI; ``/etc/ld.so.conf.d/00-hpcconv-host-mpi.conf`` lists them (it sorts before
  distribution files such as ``libc.conf``/``x86_64-linux-gnu.conf``, so a runtime that rebuilds the
  loader cache at start, like Sarus' MPI hook or podman-hpc's module hook, puts the host MPI first);
  ``LD_LIBRARY_PATH`` starts with them (searched before the cache by ld.so, under every runtime, with
  no cache rebuild); ``mpi.env`` is set; the container side of ``mpi.binds`` is created. No host
  library is ever copied into the image.
* **GPU**: NVIDIA: ``/usr/local/nvidia/{lib,lib64,bin}`` created (the bind targets of the
  nvidia-docker convention that CUDA base images point ``LD_LIBRARY_PATH`` at), listed with
  ``/usr/lib64`` (podman-hpc's GPU target) in ``01-hpcconv-nvidia.conf``; ``LD_LIBRARY_PATH``/``PATH``
  extended after the image's own entries; ``NVIDIA_VISIBLE_DEVICES=all`` and
  ``NVIDIA_DRIVER_CAPABILITIES=compute,utility`` when the image sets none (enroot defaults to utility
  only); stale driver libraries (``libcuda.so.N.M``, ``libnvidia-ml``, ``libnvidia-ptxjitcompiler``
  outside a CUDA ``compat/`` directory) are dropped, since the runtime injects the host's. AMD: ROCm
  user space stays in the image and devices come from the runtime; only site binds such as
  ``/usr/share/libdrm`` are prepared.
* **site**: ``site.mountpoints`` and the container side of ``site.binds`` created; ``site.env`` and
  ``interconnect.env`` set (they win over the image's values; each override is reported).
* **loader cache**: see :data:`LDCONFIG_NOTE`. hpcconv neither runs ``ldconfig`` (no rootfs on disk,
  and never code of the image's architecture on the host) nor writes ``/etc/ld.so.cache`` itself.

Paths that cannot be created (an ancestor or the path itself is a file or symlink in the image) are
reported as warnings; directories that already exist are left as they are.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field, replace
from typing import Iterable

from ..entries import DIR, FILE, HARDLINK, SYMLINK, Entry
from ..harness.checks import PASS, SKIP, WARN, Check, Checks
from .base import Pass

STAGE = "prepare"
MPI_CONF = "etc/ld.so.conf.d/00-hpcconv-host-mpi.conf"
GPU_CONF = "etc/ld.so.conf.d/01-hpcconv-nvidia.conf"
NVIDIA_DIRS = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/local/nvidia/bin"]
NVIDIA_LIB_DIRS = ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib64"]
DOCKER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SQUASHFS_WRITABLE = ("gzip", "zstd")     # what the sinks write
EXAMPLES = 5
LDCONFIG_NOTE = (
    "loader cache not rebuilt, by design: no library is added, so the image's own /etc/ld.so.cache stays "
    "valid for them; the empty bind targets win at run time through LD_LIBRARY_PATH (searched before the cache, "
    "under every runtime) and through the ld.so.conf.d entry that sorts first when a runtime rebuilds the "
    "cache at start (Sarus hooks: ldconfig -r; podman-hpc: the container's ldconfig); hpcconv never runs "
    "ldconfig itself (no rootfs on disk, and no code of the image's architecture on the host)")
_DRIVER_LIB = re.compile(r"(^|/)(libcuda|libnvidia-ml|libnvidia-ptxjitcompiler)\.so\.\d+(\.\d+)*$")
_LIBC6 = re.compile(r"(^|/)(usr/)?lib(64|32)?(/[^/]+-linux-gnu[^/]*)?/libc\.so\.6$")
_SO_FILE = re.compile(r"\.so(\.\d+)*$")
_MPI_LIB = re.compile(r"(^|/)lib(mpi|mpich|mpi_abi)\.so(\.\d+)*$")
_INCLUDE = re.compile(r"^\s*include\s+(/etc/)?ld\.so\.conf\.d/", re.M)


def _rel(path: str) -> str:
    return path.strip("/")


def bind_target(spec: str) -> str:
    """The container path of a profile bind 'HOST[:CONTAINER][:ro|rw]'."""
    parts = spec.split(":")
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        parts = parts[:-1]
    return parts[1] if len(parts) > 1 else parts[0]


def _normpath(path: str) -> str:
    import posixpath

    return posixpath.normpath(path) if path else path


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


@dataclass
class Change:
    kind: str
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def hit(self, what: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(what)

    def to_json(self) -> dict:
        return {"kind": self.kind, "description": self.description, "count": self.count,
                "examples": list(self.examples)}


@dataclass
class EnvEdit:
    key: str
    op: str            # set | default | prepend | append (the last two: ':'-separated lists)
    value: str
    why: str           # which profile key asked for it


@dataclass
class Plan:
    dirs: dict[str, str] = field(default_factory=dict)                 # rel path -> concern (mpi|gpu|site)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # rel path -> (content, concern)
    env: list[EnvEdit] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)       # (concern, why)
    drop_driver_libs: bool = False

    def dir(self, path: str, concern: str) -> None:
        rel = _rel(path)
        if rel and rel not in self.dirs:
            self.dirs[rel] = concern

    def bind(self, spec: str, concern: str, key: str) -> None:
        target = bind_target(spec)
        if target.startswith(("/dev/", "/proc/", "/sys/")) or target in ("/dev", "/proc", "/sys"):
            return   # provided by every runtime
        if _SO_FILE.search(target.rsplit("/", 1)[-1]):
            self.skipped.append((concern, f"{key} {target} is a file bind target: not pre-created (an empty "
                                          "library would break the loader whenever it is not bound)"))
            return
        self.dir(target, concern)


def make_plan(profile, target: str | None = None) -> Plan:
    """The preparation for PROFILE; TARGET (charliecloud, singularity, shifter) only drops what that
    runtime provides itself (Shifter fills /opt/udiImage with its own site content, which wins)."""
    plan = Plan()
    mpi = profile.mpi
    if mpi.mode == "host":
        for d in mpi.lib_dirs:
            plan.dir(d, "mpi")
        plan.files[MPI_CONF] = (("# hpcconv: host MPI bind targets, searched first (profile "
                                 f"{profile.name})\n" + "".join(d + "\n" for d in mpi.lib_dirs)).encode(), "mpi")
        plan.env.append(EnvEdit("LD_LIBRARY_PATH", "prepend", ":".join(mpi.lib_dirs), "mpi.lib_dirs"))
        for spec in mpi.binds:
            plan.bind(spec, "mpi", "mpi.binds")
        for k, v in mpi.env.items():
            plan.env.append(EnvEdit(k, "set", v, "mpi.env"))
    gpu = profile.gpu
    if gpu.vendor == "nvidia":
        for d in NVIDIA_DIRS:
            plan.dir(d, "gpu")
        plan.files[GPU_CONF] = (("# hpcconv: NVIDIA driver library bind targets (host driver, never baked in)\n"
                                 + "".join(d + "\n" for d in NVIDIA_LIB_DIRS)).encode(), "gpu")
        plan.env += [EnvEdit("LD_LIBRARY_PATH", "append", "/usr/local/nvidia/lib64:/usr/local/nvidia/lib", "gpu.vendor"),
                     EnvEdit("PATH", "append", "/usr/local/nvidia/bin", "gpu.vendor"),
                     EnvEdit("NVIDIA_VISIBLE_DEVICES", "default", "all", "gpu.vendor"),
                     EnvEdit("NVIDIA_DRIVER_CAPABILITIES", "default", "compute,utility", "gpu.vendor")]
        plan.drop_driver_libs = True
    for d in profile.site.mountpoints:
        plan.dir(d, "site")
    for spec in profile.site.binds:
        plan.bind(spec, "site", "site.binds")
    if target == "shifter":
        for d in [d for d in plan.dirs if d == "opt/udiImage" or d.startswith("opt/udiImage/")]:
            plan.skipped.append((plan.dirs.pop(d), f"/{d} not created: Shifter provides /opt/udiImage itself"))
    for k, v in profile.interconnect.env.items():
        plan.env.append(EnvEdit(k, "set", v, "interconnect.env"))
    for k, v in profile.site.env.items():
        plan.env.append(EnvEdit(k, "set", v, "site.env"))
    return plan


# environment -------------------------------------------------------------------------------------------
def _join(items: list[str]) -> str:
    return ":".join(dict.fromkeys(i for i in items if i))


def apply_env(env: list[str], edits: list[EnvEdit]) -> tuple[list[str], list[str]]:
    """The config Env with the edits applied (order kept, new keys appended) and one line per change."""
    keys: dict[str, str] = {}
    order: list[str] = []
    for line in env:
        k, sep, v = line.partition("=")
        if not sep or not k:
            continue
        if k not in keys:
            order.append(k)
        keys[k] = v
    notes = []
    for e in edits:
        old = keys.get(e.key)
        if e.op == "default":
            if old is not None:
                continue
            new = e.value
        elif e.op == "set":
            new = e.value
        else:
            base = old if old is not None else (DOCKER_PATH if e.key == "PATH" else "")
            mine, theirs = e.value.split(":"), base.split(":") if base else []
            new = _join(mine + theirs) if e.op == "prepend" else _join(theirs + mine)
        if new == old:
            continue
        if e.key not in keys:
            order.append(e.key)
        keys[e.key] = new
        notes.append(f"{e.key}={new} ({e.why}" + (f"; was {old!r})" if old is not None else ")"))
    return [f"{k}={keys[k]}" for k in order], notes


def prepared_image(image, plan: Plan):
    """A copy of the image whose config carries the plan's environment; (image, change lines)."""
    from ..image import ImageConfig

    env, notes = apply_env(image.config.env, plan.env)
    if not notes:
        return image, []
    data = json.loads(json.dumps(image.config.data))
    cfg = data.get("config")
    if not isinstance(cfg, dict):
        cfg = data["config"] = {}
    cfg["Env"] = env
    config = ImageConfig(json.dumps(data, sort_keys=True).encode(), data)
    return replace(image, config=config), notes


def choose_compression(requested: str, profile) -> tuple[str, Check | None]:
    """'auto' -> the first compression the site mounts that hpcconv writes, else gzip."""
    site = list(profile.host.squashfs) if profile else []
    if requested == "auto":
        pick = next((c for c in site if c in SQUASHFS_WRITABLE), "gzip")
        if profile is None:
            return pick, None
        if pick in site:
            return pick, Check(STAGE, "prepare.compression", PASS,
                               f"squashfs {pick}: the first of what {profile.name} mounts ({', '.join(site)})")
        return pick, Check(STAGE, "prepare.compression", WARN,
                           f"{profile.name} lists only {', '.join(site)}, which hpcconv does not write; gzip "
                           "chosen (the most widely mountable): check the site can read it")
    if profile is not None and requested not in site:
        return requested, Check(STAGE, "prepare.compression", WARN,
                                f"--compression {requested}, but {profile.name} can mount {', '.join(site)}: the "
                                f"image may not mount there; use --compression auto or {site[0]}")
    return requested, (Check(STAGE, "prepare.compression", PASS, f"squashfs {requested} (asked for; the site "
                             f"mounts {', '.join(site)})") if profile else None)


# the pass ----------------------------------------------------------------------------------------------
class PreparePass(Pass):
    """Applies a profile's plan to the entry stream (see the module docstring)."""

    name = "prepare"
    stage = STAGE

    def __init__(self, profile, plan: Plan | None = None, env_notes: list[str] | None = None):
        self.profile = profile
        self.plan = plan or make_plan(profile)
        self.env_notes = list(env_notes or [])
        self._watched: set[str] = set()
        for p in list(self.plan.dirs) + list(self.plan.files) + ["etc/ld.so.conf"]:
            self._watched.add(p)
            self._watched.update(_ancestors(p))
        self.seen: dict[str, str] = {}           # watched path -> type
        self.conf_d: dict[str, list[str]] = {}   # /etc/ld.so.conf.d name -> directories it lists
        self.mpi_dirs: set[str] = set()          # directories holding an MPI library in the image
        self.has_glibc = False
        self.has_cache = False
        self._changes: dict[str, Change] = {}
        self.blocked: list[tuple[str, str]] = []
        self.ld_conf_fixed = False
        self.rpaths: list[tuple[str, str]] = []   # (ELF path, DT_RPATH) of MPI users with an RPATH

    # changes -------------------------------------------------------------------------------------------
    def change(self, kind: str, description: str, what: str) -> None:
        c = self._changes.get(kind)
        if c is None:
            c = self._changes[kind] = Change(kind, description)
        c.hit(what)

    @property
    def changes(self) -> list[dict]:
        out = [c.to_json() for c in self._changes.values()]
        if self.env_notes:
            out.append({"kind": "env", "description": "environment set for the site (image config Env)",
                        "count": len(self.env_notes), "examples": self.env_notes[:EXAMPLES]})
        return out

    # streaming -----------------------------------------------------------------------------------------
    def observe(self, entry: Entry, head):
        p = entry.path
        if p in self._watched:
            self.seen[p] = entry.type
        if p.startswith("etc/ld.so.conf.d/") and p.count("/") == 2 and p not in self.plan.files:
            dirs = []
            if entry.type == FILE and head is not None and entry.size <= len(head):
                dirs = [ln.strip().rstrip("/") for ln in head.decode("utf-8", "replace").splitlines()
                        if ln.strip().startswith("/")]
            self.conf_d[p.rsplit("/", 1)[1]] = dirs
        if entry.type != DIR and ".so" in p and _MPI_LIB.search(p):
            self.mpi_dirs.add("/" + p.rsplit("/", 1)[0])
        elif p == "etc/ld.so.cache":
            self.has_cache = True
        if entry.type in (FILE, HARDLINK, SYMLINK) and ".so" in p and _LIBC6.search(p):
            self.has_glibc = True
        return None

    def observe_elf(self, entry: Entry, elf) -> None:
        if self.profile.mpi.mode == "host" and elf.rpath and not elf.runpath \
                and any(_MPI_LIB.search(n) for n in elf.needed):
            self.rpaths.append((entry.path, elf.rpath))

    def _rpath_problems(self) -> list[str]:
        """MPI users whose DT_RPATH (searched before LD_LIBRARY_PATH) names a directory with the
        image's MPI: there the container's MPI wins over the bound host MPI."""
        out = []
        for path, rpath in self.rpaths:
            origin = "/" + path.rsplit("/", 1)[0] if "/" in path else "/"
            for d in rpath.split(":"):
                d = d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin).rstrip("/")
                d = "/" + "/".join(p for p in _normpath(d).split("/") if p)
                if d in self.mpi_dirs:
                    out.append(f"/{path} has DT_RPATH {rpath}, searched before LD_LIBRARY_PATH, and {d} holds the "
                               "image's MPI: the container's MPI wins over the host's; relink with "
                               "-Wl,--enable-new-dtags (DT_RUNPATH) or remove the RPATH (patchelf --remove-rpath)")
                    break
        return out

    def edit(self, entry: Entry, head):
        p = entry.path
        if p in self.plan.files:
            self.seen.pop(p, None)
            self.change("replaced", "files of an earlier hpcconv preparation replaced", "/" + p)
            return None
        if self.plan.drop_driver_libs and entry.type != DIR and "/compat/" not in "/" + p \
                and _DRIVER_LIB.search(p):
            self.change("driver-lib-dropped", "NVIDIA driver libraries dropped (the runtime binds the host's)",
                        "/" + p)
            return None
        if p == "etc/ld.so.conf" and entry.type == FILE and head is not None and entry.size <= len(head):
            if not _INCLUDE.search(head.decode("utf-8", "replace")):
                data = head.rstrip(b"\n") + (b"\n" if head.strip() else b"") + b"include /etc/ld.so.conf.d/*.conf\n"
                self.ld_conf_fixed = True
                self.change("ld-so-conf", "/etc/ld.so.conf made to include /etc/ld.so.conf.d", "/etc/ld.so.conf")
                return entry.with_(size=len(data), reader=io.BytesIO(data))
        return entry

    def _blocked(self, path: str) -> str | None:
        t = self.seen.get(path)
        if t is not None and t != DIR:
            return f"/{path} is a {t} in the image"
        for a in _ancestors(path):
            t = self.seen.get(a)
            if t is not None and t != DIR:
                return f"/{a} is a {t} in the image"
        return None

    def additions(self) -> Iterable[Entry]:
        for path, concern in sorted(self.plan.dirs.items()):
            if self.seen.get(path) == DIR:
                continue
            why = self._blocked(path)
            if why:
                self.blocked.append((concern, f"/{path} not created: {why}"))
                continue
            self.seen[path] = DIR
            self.change(f"{concern}-dir", {"mpi": "host MPI bind targets created (empty directories)",
                                           "gpu": "GPU driver bind targets created (empty directories)",
                                           "site": "site mount points and bind targets created"}[concern], "/" + path)
            yield Entry(path, DIR, 0o755, 0, 0, 0, uname="root", gname="root")
        for path, (data, concern) in self.plan.files.items():
            why = self._blocked(path)
            if why:
                self.blocked.append((concern, f"/{path} not written: {why}"))
                continue
            self.seen[path] = FILE
            self.change(f"{concern}-ld-conf", "loader configuration for the bind targets added (sorts first)",
                        "/" + path)
            yield Entry(path, FILE, 0o644, 0, 0, 0, size=len(data), uname="root", gname="root",
                        reader=io.BytesIO(data))
        if self.plan.files and "etc/ld.so.conf" not in self.seen and self.has_glibc \
                and not self._blocked("etc/ld.so.conf"):
            data = b"include /etc/ld.so.conf.d/*.conf\n"
            self.ld_conf_fixed = True
            self.change("ld-so-conf", "/etc/ld.so.conf added to include /etc/ld.so.conf.d", "/etc/ld.so.conf")
            yield Entry("etc/ld.so.conf", FILE, 0o644, 0, 0, 0, size=len(data), uname="root", gname="root",
                        reader=io.BytesIO(data))

    # report --------------------------------------------------------------------------------------------
    def _summary(self, concern: str) -> tuple[list[str], list[str]]:
        made = [e for k, c in self._changes.items() if k.startswith(concern + "-") for e in c.examples]
        problems = [w for c, w in self.blocked if c == concern] + [w for c, w in self.plan.skipped if c == concern]
        return made, problems

    def _earlier_mpi_confs(self) -> list[str]:
        """ld.so.conf.d files that may sort before hpcconv's (byte order, as in the C locale, or ignoring
        punctuation, as a UTF-8 locale's collation does) and list a directory with an MPI library."""
        ours = MPI_CONF.rsplit("/", 1)[1]

        def alnum(n: str) -> str:
            return re.sub(r"[^0-9A-Za-z]", "", n).lower()

        out = []
        for name, dirs in sorted(self.conf_d.items()):
            if not (name < ours or alnum(name) < alnum(ours)):
                continue
            hit = [d for d in dirs if d in self.mpi_dirs]
            if hit:
                out.append(f"/etc/ld.so.conf.d/{name} may sort before hpcconv's entry and lists {hit[0]}, which "
                           "holds the image's MPI: a rebuilt loader cache could prefer it (LD_LIBRARY_PATH still "
                           "wins); rename or remove that file in the image")
        return out

    def finish(self, profile=None) -> Checks:
        c = Checks()
        prof = self.profile
        made, problems = self._summary("mpi")
        if prof.mpi.mode == "host":
            dirs = ", ".join(prof.mpi.lib_dirs)
            earlier = self._earlier_mpi_confs() + self._rpath_problems()
            problems += earlier
            detail = (f"host MPI ({prof.mpi.implementation or prof.mpi.family}) bind targets {dirs}; "
                      f"/{MPI_CONF} lists them first; LD_LIBRARY_PATH starts with them"
                      + (f"; {'; '.join(problems)}" if problems else ""))
            bad = earlier or any(c == "mpi" for c, _ in self.blocked)
            c.add(STAGE, "prepare.mpi", WARN if bad else PASS, detail)
            if not self.has_cache and self.has_glibc and "sarus" in prof.site.runtimes:
                c.add(STAGE, "prepare.ld-cache", WARN,
                      "the image has no /etc/ld.so.cache: Sarus' MPI hook finds the container's MPI through it "
                      "('No MPI libraries found in the container'); run ldconfig as the last step of the Dockerfile")
        made, problems = self._summary("gpu")
        if prof.gpu.vendor == "nvidia":
            dropped = self._changes.get("driver-lib-dropped")
            detail = ("NVIDIA bind targets /usr/local/nvidia/{lib64,lib,bin}, /" + GPU_CONF
                      + ", NVIDIA_VISIBLE_DEVICES/NVIDIA_DRIVER_CAPABILITIES defaults; no driver library baked in"
                      + (f"; {dropped.count} stale driver libraries dropped" if dropped else "")
                      + (f"; {'; '.join(problems)}" if problems else ""))
            c.add(STAGE, "prepare.gpu", WARN if problems else PASS, detail)
        elif prof.gpu.vendor == "amd":
            c.add(STAGE, "prepare.gpu", PASS, "AMD: ROCm user space stays in the image, /dev/kfd and /dev/dri come "
                                              "from the runtime; nothing baked in")
        made, problems = self._summary("site")
        site_dirs = [d for d, k in self.plan.dirs.items() if k == "site"]
        if site_dirs or problems:
            c.add(STAGE, "prepare.site", WARN if problems else PASS,
                  "mount points and bind targets: " + ", ".join("/" + d for d in site_dirs)
                  + (f"; {'; '.join(problems)}" if problems else ""))
        if self.env_notes:
            c.add(STAGE, "prepare.env", PASS, "; ".join(self.env_notes))
        if self.plan.files:
            dropped = self._changes.get("driver-lib-dropped")
            c.add(STAGE, "prepare.ldconfig", SKIP if not self.has_glibc else PASS,
                  ("no glibc in the image: ld.so.conf entries are inert, LD_LIBRARY_PATH does the work; "
                   if not self.has_glibc else "") + LDCONFIG_NOTE
                  + (f"; the {dropped.count} dropped driver libraries may leave stale cache entries, which ld.so "
                     "skips (it falls back to its search path) and GPU runtimes rewrite (nvidia-container-cli runs "
                     "ldconfig)" if dropped and self.has_cache else "")
                  + ("; /etc/ld.so.conf now includes /etc/ld.so.conf.d" if self.ld_conf_fixed else ""))
        return c

    def facts(self) -> dict:
        return {"dirs": sorted("/" + d for d in self.plan.dirs), "files": sorted("/" + f for f in self.plan.files),
                "env": [f"{e.op} {e.key}={e.value}" for e in self.plan.env]}
