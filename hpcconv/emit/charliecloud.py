"""Charliecloud emitter: an entry stream + the image config -> a `ch-run` image (dir, tar.gz, squashfs).

What `ch-run` needs and what `ch-image` writes are in docs/reference/charliecloud.md; this module
follows its "Implications for hpcconv" checklist:

* Fix-ups as `ch-image pull` does them (each reported as a change with a count and example paths):
  owners 0:0 (uname/gname root), setuid/setgid cleared, files u+rw, dirs u+rwx, device nodes and FIFOs
  dropped, anything under `dev/` dropped (and a hardlink to something dropped is dropped with it).
  Not copied from ch-image on purpose: absolute symlinks are kept (inside ch-run the image is `/`, so
  they resolve correctly), no "tarbomb" top-directory strip, no `.git*` filtering, links that climb
  above `/` are left to the flattener (which repairs or rejects them).
* Added when missing, checked against the stream itself (an existing path of any type, a symlink
  such as `/etc/resolv.conf -> ../run/...` included, is never replaced or followed):
  `/dev /proc /sys /tmp /home /mnt /mnt/0..9` (0755), empty `/etc/passwd /etc/group /etc/hosts
  /etc/resolv.conf` (0644), each config `Volumes` directory (ch-image mkdirs them) and the
  `WorkingDir` (Docker creates a missing one when a container starts; `ch-run -c` needs it).
* `/ch/metadata.json` exactly as ch-image 0.31 writes it (8 keys, `indent=2, sort_keys=True`, trailing
  newline; `arg` = ch-image's saved ARG defaults), `/ch/environment` (sorted `K=V` lines, unquoted,
  as ch-image), `/ch/environment0` (NUL-terminated `K=V`, for `ch-run --set-env0` ≥0.34, which keeps
  values with newlines intact), `/ch/config.pulled.json` (the raw config bytes), and `/ch/run.sh`,
  which applies WORKDIR, ENTRYPOINT and CMD (which ch-run ignores; charliecloud#780): run the image
  the Docker way with `ch-run --set-env IMG -- /ch/run.sh [ARGS]` (ARGS replace CMD). Items of the
  same names already in the image are replaced (reported).

Known limitation: a regular file that is dropped (under `dev/`, or one of our `/ch` names) takes the
hardlinks to it along, because its content cannot be moved to a later name without buffering it.

Ordering: the stream is passed through untouched in order, only metadata of a few watched paths is
remembered, and the missing items are appended at the end (new paths, so the "directories first"
contract holds; hpcconv's SquashFS writer, tar2sqfs and tar accept that order; file content is never buffered).
"""

from __future__ import annotations

import io
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, Entry
from ..harness.checks import FAIL, PASS, WARN, Checks
from ..image import Image, ImageConfig, host_platform
from ..progress import NULL, Reporter
from . import sinks

STAGE = "emit"
FORMATS = ("dir", "tar", "squashfs")

# ch-image 0.31 image.py ARG_DEFAULTS (the "magic" proxy/USER args are not saved)
ARG_DEFAULTS = {
    "FAKEROOTDONTTRYCHOWN": "1",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TAR_OPTIONS": "--no-same-owner",
}
MOUNT_DIRS = ["dev", "proc", "sys", "tmp", "home", "mnt"] + [f"mnt/{i}" for i in range(10)]
ETC_FILES = ["etc/passwd", "etc/group", "etc/hosts", "etc/resolv.conf"]
CH_FILES = ["ch/metadata.json", "ch/environment", "ch/environment0", "ch/config.pulled.json", "ch/run.sh"]
EXAMPLES = 5


@dataclass
class EmitResult:
    checks: Checks
    changes: list[dict]
    run_hint: str
    output: Path | None = None
    entries: int = 0


# metadata --------------------------------------------------------------------------------------------
def parse_env(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """Config Env -> dict (split on the first `=`, later wins); returns the bad lines too."""
    env: dict[str, str] = {}
    bad = []
    for line in lines:
        if "=" not in line or line.startswith("="):
            bad.append(line)
            continue
        k, v = line.split("=", 1)
        env[k] = v
    return env, bad


def metadata(config: ImageConfig) -> dict:
    """`/ch/metadata.json` content as ch-image's metadata_init + metadata_merge_from_config."""
    data = config.data
    c = config.config

    def given(v):
        return v is not None and v != ""

    vols = c.get("Volumes")
    return {
        "arch": data["architecture"] if given(data.get("architecture")) else host_platform().architecture,
        "arg": dict(ARG_DEFAULTS),
        "cwd": c["WorkingDir"] if given(c.get("WorkingDir")) else "/",
        "env": parse_env(config.env)[0],
        "history": data.get("history") if isinstance(data.get("history"), list) else [],
        "labels": c["Labels"] if given(c.get("Labels")) else {},
        "shell": c["Shell"] if given(c.get("Shell")) else ["/bin/sh", "-c"],
        "volumes": list(vols.keys()) if isinstance(vols, dict) else [],
    }


def metadata_json(config: ImageConfig) -> bytes:
    return (json.dumps(metadata(config), indent=2, sort_keys=True) + "\n").encode()


def environment_file(env: dict[str, str]) -> bytes:
    return ("\n".join(f"{k}={v}" for k, v in sorted(env.items())) + "\n").encode("utf-8", "surrogateescape")


def environment0_file(env: dict[str, str]) -> bytes:
    return "".join(f"{k}={v}\0" for k, v in sorted(env.items())).encode("utf-8", "surrogateescape")


def command_of(config: ImageConfig) -> list[str]:
    return config.entrypoint + config.cmd


def run_script(config: ImageConfig) -> bytes:
    wd = config.workdir or "/"
    q = shlex.join
    lines = ["#!/bin/sh",
             "# Written by hpcconv. ch-run ignores the image's WORKDIR, ENTRYPOINT and CMD; this applies them.",
             "#   ch-run --set-env IMAGE -- /ch/run.sh [ARGS...]   (ARGS replace CMD, as with docker run)",
             f"cd {shlex.quote(wd)} || exit 1"]
    if config.cmd:
        lines.append(f'if [ "$#" -eq 0 ]; then set -- {q(config.cmd)}; fi')
    elif not config.entrypoint:
        lines.append('if [ "$#" -eq 0 ]; then set -- /bin/sh; fi')
    lines.append(f'exec {q(config.entrypoint) + " " if config.entrypoint else ""}"$@"')
    return ("\n".join(lines) + "\n").encode()


def run_hint(config: ImageConfig, out: Path, fmt: str) -> str:
    cmd = command_of(config) or ["/bin/sh"]
    wd = config.workdir
    opts = ["--set-env"] + (["-c", wd] if wd and wd != "/" else [])
    if fmt == "tar":
        name = out.name
        for suf in (".tar.gz", ".tgz", ".tar.zst", ".tar"):
            if name.endswith(suf):
                name = name[: -len(suf)]
                break
        img = str(out.parent / (name or "image"))
        return (f"ch-convert {shlex.quote(str(out))} {shlex.quote(img)} && "
                + shlex.join(["ch-run", *opts, img, "--", *cmd]))
    return shlex.join(["ch-run", *opts, str(out), "--", *cmd])


# the fix-up transform --------------------------------------------------------------------------------
@dataclass
class _Change:
    kind: str
    description: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def hit(self, path: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append("/" + path)


def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _norm_volume(v: str) -> str | None:
    parts = [p for p in str(v).split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


class ChFixups:
    """Stream transform applying ch-image's fix-ups and appending what ch-run needs."""

    def __init__(self, image: Image, checks: Checks):
        self.config = image.config
        self.checks = checks
        self._changes: dict[str, _Change] = {}
        self.volumes = [p for p in (_norm_volume(v) for v in metadata(self.config)["volumes"]) if p]
        self.workdir = _norm_volume(self.config.workdir) if self.config.workdir else None
        watched = set(MOUNT_DIRS) | set(CH_FILES) | {"ch", "etc"} | set(ETC_FILES)
        for v in self.volumes + ([self.workdir] if self.workdir else []):
            watched.update(_ancestors(v))
        self._watched = watched
        self.seen: dict[str, str] = {}        # watched path -> entry type
        self._dropped: set[str] = set()       # paths dropped from the stream (hardlinks to them go too)

    def change(self, kind: str, description: str, path: str) -> None:
        c = self._changes.get(kind)
        if c is None:
            c = self._changes[kind] = _Change(kind, description)
        c.hit(path)

    @property
    def changes(self) -> list[dict]:
        return [{"kind": c.kind, "description": c.description, "count": c.count, "examples": c.examples}
                for c in self._changes.values()]

    def _drop(self, e: Entry, kind: str, description: str) -> None:
        self.change(kind, description, e.path)
        self._dropped.add(e.path)

    def transform(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for e in entries:
            p = e.path
            if p.startswith("dev/"):
                self._drop(e, "dev-content-dropped", "anything under /dev dropped (ch-run binds the host's /dev)")
                continue
            if e.type in (CHAR, BLOCK, FIFO):
                self._drop(e, "special-dropped", "device nodes and FIFOs dropped")
                continue
            if p in CH_FILES:
                self._drop(e, "ch-replaced", "existing /ch metadata replaced by hpcconv's")
                continue
            if p in ("dev", "ch") and e.type != DIR:
                self._drop(e, "replaced-by-dir", f"/{p} is not a directory in the image; replaced by one")
                continue
            if e.type == HARDLINK and e.linkname in self._dropped:
                self._drop(e, "hardlink-dropped", "hardlinks to dropped entries dropped")
                continue
            if e.uid != 0 or e.gid != 0:
                self.change("owner", "owner set to root 0:0 (as ch-image)", p)
            mode = e.mode
            if e.type != HARDLINK and mode & 0o6000:
                self.change("setid-cleared", "setuid/setgid bits cleared", p)
                mode &= ~0o6000
            if e.type == FILE and mode & 0o600 != 0o600:
                self.change("user-rw", "files made user-readable/writable (u+rw)", p)
                mode |= 0o600
            elif e.type == DIR and mode & 0o700 != 0o700:
                self.change("user-rwx", "directories made user-accessible (u+rwx)", p)
                mode |= 0o700
            if p in self._watched:
                self.seen[p] = e.type
            yield e.with_(uid=0, gid=0, uname="root", gname="root", mode=mode)
        yield from self._additions()

    # appended entries ----------------------------------------------------------------------------------
    def _can_create(self, path: str, what: str, blocked: list[str]) -> bool:
        """True if `path` is missing and every ancestor is (or will be) a directory."""
        if path in self.seen:
            if self.seen[path] != DIR and path in MOUNT_DIRS + self.volumes + ["etc", "ch", self.workdir]:
                blocked.append(f"/{path} is a {self.seen[path]}, not a directory ({what})")
            return False
        for a in _ancestors(path)[:-1]:
            t = self.seen.get(a)
            if t is not None and t != DIR:
                blocked.append(f"/{path} cannot be added: /{a} is a {t} ({what})")
                return False
        return True

    def _dir(self, path: str, kind: str, desc: str) -> Entry:
        self.seen[path] = DIR
        self.change(kind, desc, path)
        return Entry(path, DIR, 0o755, 0, 0, 0, uname="root", gname="root")

    def _file(self, path: str, data: bytes, mode: int = 0o644, kind: str | None = None, desc: str = "") -> Entry:
        self.seen[path] = FILE
        if kind:
            self.change(kind, desc, path)
        return Entry(path, FILE, mode, 0, 0, 0, size=len(data), uname="root", gname="root",
                     reader=io.BytesIO(data))

    def _additions(self) -> Iterator[Entry]:
        blocked: list[str] = []
        for d in MOUNT_DIRS:
            if self._can_create(d, "ch-run mount point", blocked):
                yield self._dir(d, "added-mount-point", "directories ch-run binds onto added")
        if self._can_create("etc", "for /etc files", blocked):
            yield self._dir("etc", "added-mount-point", "directories ch-run binds onto added")
        for f in ETC_FILES:
            if self._can_create(f, "ch-run bind target", blocked):
                yield self._file(f, b"", kind="added-etc-file", desc="empty files ch-run binds onto added")
        for v in self.volumes:
            for a in _ancestors(v):
                if self._can_create(a, "VOLUME", blocked):
                    yield self._dir(a, "added-volume-dir", "VOLUME directories created (as ch-image)")
        if self.workdir:
            for a in _ancestors(self.workdir):
                if self._can_create(a, "WORKDIR", blocked):
                    yield self._dir(a, "added-workdir", "missing WORKDIR created (docker run creates it too)")
        if self._can_create("ch", "metadata", blocked):
            self.seen["ch"] = DIR
            yield Entry("ch", DIR, 0o755, 0, 0, 0, uname="root", gname="root")
        if self.seen.get("ch") != DIR:
            self.checks.add(STAGE, "charliecloud metadata", FAIL, "/ch is not a directory; metadata not written")
        else:
            env, _ = parse_env(self.config.env)
            yield self._file("ch/metadata.json", metadata_json(self.config))
            yield self._file("ch/environment", environment_file(env))
            yield self._file("ch/environment0", environment0_file(env))
            yield self._file("ch/config.pulled.json", self.config.raw)
            yield self._file("ch/run.sh", run_script(self.config), 0o755)
        bad = [b for b in blocked if "ch-run" in b]
        self.checks.add(STAGE, "ch-run mount points", WARN if bad else PASS,
                        "; ".join(bad) if bad else "/dev /proc /sys /tmp /home /mnt/0-9 and /etc files present")
        other = [b for b in blocked if "ch-run" not in b]
        if other:
            self.checks.add(STAGE, "volumes", WARN, "; ".join(other))
        for p in ("etc/resolv.conf", "etc/hosts"):
            if self.seen.get(p) == "symlink":
                self.checks.add(STAGE, f"/{p}", WARN, f"/{p} is a symlink; ch-run binds the host's file only "
                                "onto a regular file (DNS may not work in the container)")


def environment_checks(config: ImageConfig, checks: Checks) -> None:
    env, bad = parse_env(config.env)
    problems = []
    if bad:
        problems.append(f"Env lines without '=' skipped: {', '.join(repr(b) for b in bad[:3])}")
    for k, v in sorted(env.items()):
        if "\n" in v:
            problems.append(f"{k} holds a newline: /ch/environment breaks it, use ch-run --set-env0 "
                            "with /ch/environment0")
        elif len(v) >= 2 and v[0] == "'" and v[-1] == "'":
            problems.append(f"{k} is wrapped in single quotes, which ch-run --set-env strips")
        elif any(item.startswith("$") for item in v.split(":")):
            problems.append(f"{k} has a ':'-item starting with '$', which ch-run --set-env expands")
    checks.add(STAGE, "environment", WARN if problems else PASS,
               "; ".join(problems) if problems else f"{len(env)} variables in /ch/environment")
    user = str(config.config.get("User") or "")
    if user and user not in ("root", "0", "0:0", "root:root"):
        checks.add(STAGE, "user", WARN, f"USER {user} is ignored: ch-run runs as the invoking user")
    if not isinstance(config.data.get("history"), list):
        checks.add(STAGE, "history", WARN, "the config has no history (ch-image would refuse the image)")


def emit(entries: Iterable[Entry], image: Image, out: Path | str, fmt: str = "squashfs",
         compression: str = "gzip", reporter: Reporter = NULL, force: bool = False,
         level: int | None = None, block_size: int = sinks.BLOCK_SIZE) -> EmitResult:
    """Write a ch-run image. `fmt`: dir | tar (tar.gz, or tar.zst with compression='zstd') | squashfs."""
    out = Path(out)
    if fmt not in FORMATS:
        from ..errors import UsageError

        raise UsageError(f"unknown Charliecloud format {fmt!r}", hint="use dir, tar or squashfs")
    sinks.check_output(out, force)
    checks = Checks()
    if fmt == "tar":
        want = (".tar.zst",) if compression == "zstd" else (".tar.gz", ".tgz")
        if not out.name.endswith(want):
            checks.add(STAGE, "output name", WARN, f"{out.name} does not end in {' or '.join(want)}; "
                       "ch-convert infers the format from the name")
    environment_checks(image.config, checks)
    fix = ChFixups(image, checks)
    stream = fix.transform(entries)
    with checks.timed(STAGE, f"write {fmt}") as c:
        stats: dict = {}
        if fmt == "dir":
            n = sinks.write_dir(stream, out, reporter=reporter, force=force)
        elif fmt == "tar":
            n = sinks.write_tar(stream, out, compression=compression, reporter=reporter, level=level, force=force)
        else:
            n = sinks.write_squashfs(stream, out, compression=compression, reporter=reporter, level=level,
                                     block_size=block_size, force=force, stats=stats)
        c.detail = f"{out} ({n} entries{stats.get('reuse', '')})"
    return EmitResult(checks, fix.changes, run_hint(image.config, out, fmt), out, n)
