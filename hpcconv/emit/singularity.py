"""Singularity/Apptainer emitter: an entry stream + the image config -> a SIF file or a sandbox dir.

What goes into the root filesystem follows what `apptainer build x.sif docker://…` writes
(docs/reference/sif-and-apptainer.md B.1-B.5); the scripts themselves are hpcconv's own:

* `/.singularity.d/env/10-docker2singularity.sh`: the config's Env in order, `PATH` overwritten, every
  other variable defaulted (`export K="${K:-"V"}"`, so a host or `--env` value wins, as in
  Apptainer), values escaped for double quotes (`\\ " ` $`). Names that are not shell names are
  skipped (as Apptainer does) and reported. Plus `01-base.sh`, `90-environment.sh` (the `/environment`
  target), `94-appsbase.sh` (empty), `95-apps.sh`, `99-base.sh` (`/.singularity.d/libs` on
  `LD_LIBRARY_PATH`, the prompt), `99-runtimevars.sh` (`SING_USER_DEFINED_*PATH`).
* `/.singularity.d/runscript`: ENTRYPOINT + CMD, with ARGS replacing CMD, as `docker run`. It keeps
  the line `eval "set ${SINGULARITY_OCI_RUN}"`, which makes Apptainer run the script in its built-in
  interpreter (images without `/bin/sh` still run). Difference from Apptainer's own runscript, on
  purpose: user ARGS are not evaluated a second time by the shell (Apptainer needs `--no-eval` for
  that), so `$`, quotes and backslashes in ARGS reach the program unchanged, as with Docker.
* `/.singularity.d/actions/{exec,run,shell,start,test}` for runtimes that run them (Singularity 2/3,
  `ch-run`): source `env/*.sh` in order, then run.
* `/.singularity.d/labels.json` (image labels + build labels, tab-indented, sorted, Go HTML escaping),
  `/.singularity.d/Singularity` (the definition text), `startscript`.
* Links `/singularity -> .singularity.d/runscript`, `/environment -> .singularity.d/env/90-environment.sh`,
  `/.run /.exec /.shell /.test -> .singularity.d/actions/*`; empty `/etc/hosts` and `/etc/resolv.conf`
  (the runtime binds the host's onto them); mount points `/dev /proc /sys /tmp /var/tmp /home /root
  /etc` and `/.singularity.d/{libs,actions,env}` added when missing (an existing path of any type wins).
* Permissions: Apptainer runs as the invoking user, so every file is made world-readable and every
  directory and executable world-searchable (`a+rX`) unless it is a secret (`/etc/shadow`, ...);
  each change is reported with a count and examples.

The SIF holds, like Apptainer's: the definition (`Def.FILE`), `inspect-metadata.json` and
`oci-config.json` (`JSON.Generic`, sorted by name), then the squashfs partition (`emit/sif.py`).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

from .. import __version__
from ..entries import DIR, FILE, HARDLINK, SYMLINK, Entry
from ..harness.checks import PASS, WARN, Checks
from ..image import Image, ImageConfig, digest_bytes
from ..progress import NULL, Reporter
from . import sif, sinks
from .charliecloud import EmitResult, _Change

STAGE = "emit"
FORMATS = ("sif", "sandbox")
SD = ".singularity.d"
NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# paths of the image that are always replaced by ours (as Apptainer's makeBaseEnv(overwrite=true))
LINKS = {"singularity": f"{SD}/runscript", ".run": f"{SD}/actions/run", ".exec": f"{SD}/actions/exec",
         ".test": f"{SD}/actions/test", ".shell": f"{SD}/actions/shell",
         "environment": f"{SD}/env/90-environment.sh"}
SD_DIRS = [SD, f"{SD}/libs", f"{SD}/actions", f"{SD}/env"]
MOUNT_DIRS = ["dev", "proc", "sys", "tmp", "var", "var/tmp", "home", "root", "etc"]
EMPTY_FILES = ["etc/hosts", "etc/resolv.conf"]
# never made world-readable: secrets that a non-root user has no business reading
PRIVATE = re.compile(r"^(etc/(g?shadow-?|security/opasswd|sudoers|ssh/ssh_host_[^/]*_key)|root/\.ssh(/.*)?)$")
EXAMPLES = 5


# the scripts -------------------------------------------------------------------------------------------
def sh_escape(value: str) -> str:
    """Escape for the inside of a double-quoted shell word (Apptainer's shell.Escape)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`").replace("$", "\\$")


def sq(value: str) -> str:
    """Single-quoted shell word."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def parse_env(lines: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Config Env -> [(name, value or None)] in order, a later duplicate replacing an earlier one;
    plus the skipped elements (names that are not shell names)."""
    out: dict[str, str | None] = {}
    bad = []
    for line in lines:
        name, eq, value = line.partition("=")
        if not NAME_RE.match(name):
            bad.append(line)
            continue
        out.pop(name, None)
        out[name] = value if eq else None
    return list(out.items()), bad


def env_script(config: ImageConfig) -> str:
    lines = ["#!/bin/sh"]
    for name, value in parse_env(config.env)[0]:
        if value is None:
            lines.append(f'export {name}="${{{name}:-}}"')
        elif name == "PATH":
            lines.append(f'export PATH="{sh_escape(value)}"')
        else:
            lines.append(f'export {name}="${{{name}:-"{sh_escape(value)}"}}"')
    return "\n".join(lines) + "\n"


def _words(args: list[str]) -> str:
    return " ".join(f'"{sh_escape(a)}"' for a in args)


def runscript(config: ImageConfig) -> str:
    ep, cmd = config.entrypoint, config.cmd
    return f"""#!/bin/sh
# Written by hpcconv from the image's ENTRYPOINT and CMD. `apptainer run IMAGE [ARGS...]` runs
# ENTRYPOINT followed by ARGS, or by CMD when there are no ARGS, as `docker run` does. ARGS are
# passed on unchanged (they are not evaluated by the shell a second time).
OCI_ENTRYPOINT={sq(_words(ep))}
OCI_CMD={sq(_words(cmd))}
if [ $# -eq 0 ] && [ -z "${{OCI_ENTRYPOINT}}${{OCI_CMD}}" ]; then
    echo "This image has no ENTRYPOINT or CMD: name the command to run." >&2
    exit 1
fi
CMDLINE_ARGS=""
i=1
while [ "$i" -le $# ]; do
    CMDLINE_ARGS="${{CMDLINE_ARGS}} \\"\\${{$i}}\\""
    i=$((i + 1))
done
if [ $# -gt 0 ]; then
    SINGULARITY_OCI_RUN="-- ${{OCI_ENTRYPOINT}}${{CMDLINE_ARGS}}"
else
    SINGULARITY_OCI_RUN="-- ${{OCI_ENTRYPOINT}} ${{OCI_CMD}}"
fi
# Apptainer runs this script in its own interpreter when it holds the next line verbatim.
eval "set ${{SINGULARITY_OCI_RUN}}"
exec "$@"
"""


_SOURCE_ENV = """for script in /.singularity.d/env/*.sh; do
    if [ -f "$script" ]; then
        . "$script"
    fi
done
"""

ACTIONS = {
    "exec": "#!/bin/sh\n" + _SOURCE_ENV + 'exec "$@"\n',
    "run": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/runscript ]; then
    exec /.singularity.d/runscript "$@"
fi
echo "No runscript in this container." >&2
exit 1
""",
    "shell": "#!/bin/sh\n" + _SOURCE_ENV + 'exec "${SINGULARITY_SHELL:-/bin/sh}" "$@"\n',
    "start": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/startscript ]; then
    exec /.singularity.d/startscript "$@"
fi
""",
    "test": "#!/bin/sh\n" + _SOURCE_ENV + """if [ -x /.singularity.d/test ]; then
    exec /.singularity.d/test "$@"
fi
echo "No test script in this container." >&2
exit 0
""",
}

ENV_FILES = {
    "01-base.sh": "#!/bin/sh\n# Base environment (hpcconv). The image's own variables are in 10-docker2singularity.sh.\n",
    "90-environment.sh": "#!/bin/sh\n# Custom environment shell code should follow\n",
    "94-appsbase.sh": "",
    "95-apps.sh": "#!/bin/sh\n# SCIF apps: none in images converted from Docker/OCI.\n",
    "99-base.sh": """#!/bin/sh
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH=/.singularity.d/libs
else
    LD_LIBRARY_PATH="${LD_LIBRARY_PATH}:/.singularity.d/libs"
fi
PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
""",
    "99-runtimevars.sh": """#!/bin/sh
if [ -n "${SING_USER_DEFINED_PREPEND_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PREPEND_PATH}:${PATH}"
fi
if [ -n "${SING_USER_DEFINED_APPEND_PATH:-}" ]; then
    PATH="${PATH}:${SING_USER_DEFINED_APPEND_PATH}"
fi
if [ -n "${SING_USER_DEFINED_PATH:-}" ]; then
    PATH="${SING_USER_DEFINED_PATH}"
fi
unset SING_USER_DEFINED_PREPEND_PATH SING_USER_DEFINED_APPEND_PATH SING_USER_DEFINED_PATH
export PATH
""",
}

STARTSCRIPT = "#!/bin/sh\n# instance start script: images converted from Docker/OCI define none.\n"


# metadata ----------------------------------------------------------------------------------------------
def go_json(obj, indent: str | None = None) -> str:
    """JSON as Go's encoding/json writes it (HTML-safe escapes, sorted map keys when asked by caller)."""
    if indent is None:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    else:
        text = json.dumps(obj, indent=indent, ensure_ascii=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                 ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text


def source_of(image: Image) -> tuple[str, str]:
    """(bootstrap agent, from) for the definition file, in Apptainer's spelling."""
    ref = image.reference
    src = image.source or "docker"
    for t in ("docker-daemon", "docker-archive", "oci", "bundle", "docker"):
        if ref.startswith(t + "://"):
            return t, ref[len(t) + 3:]
        if ref.startswith(t + ":"):
            return t, ref[len(t) + 1:]
    return src, ref


def deffile(image: Image) -> str:
    boot, frm = source_of(image)
    lines = [f"bootstrap: {boot}", f"from: {frm}", "",
             f"# converted by hpcconv {__version__}",
             f"# manifest: {image.digest}", f"# platform: {image.platform}"]
    if image.index is not None:
        lines.insert(4, f"# index: {digest_bytes(image.index.raw)}")
    return "\n".join(lines) + "\n"


def _weekday_date(t: time.struct_time) -> str:
    return (f"{time.strftime('%A', t)}_{t.tm_mday}_{time.strftime('%B', t)}_{t.tm_year}_"
            f"{t.tm_hour}:{t.tm_min}:{t.tm_sec}_UTC")


def labels(image: Image, when: int) -> dict[str, str]:
    out = dict(image.config.labels)
    t = time.gmtime(when)
    boot, frm = source_of(image)
    out.update({
        "org.label-schema.schema-version": "1.0",
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", t),
        "org.label-schema.build-date": _weekday_date(t),
        "org.label-schema.usage.singularity.deffile.bootstrap": boot,
        "org.label-schema.usage.singularity.deffile.from": frm,
        "org.label-schema.usage.hpcconv.version": __version__,
        "org.opencontainers.image.architecture": image.platform.architecture,
        "org.label-schema.build-arch": image.platform.architecture,
    })
    if image.platform.variant:
        out["org.opencontainers.image.variant"] = image.platform.variant
    if boot == "docker":
        out["org.opencontainers.image.base.name"] = frm
        out["org.opencontainers.image.base.digest"] = (digest_bytes(image.index.raw) if image.index is not None
                                                       else image.digest)
    return out


def labels_json(lab: dict[str, str]) -> str:
    return go_json(dict(sorted(lab.items())), indent="\t")


# ggcr v1.Config field order (what Apptainer marshals into oci-config.json)
_CONFIG_ORDER = ["AttachStderr", "AttachStdin", "AttachStdout", "Cmd", "Healthcheck", "Domainname", "Entrypoint",
                 "Env", "Hostname", "Image", "Labels", "OnBuild", "OpenStdin", "StdinOnce", "Tty", "User",
                 "Volumes", "WorkingDir", "ExposedPorts", "ArgsEscaped", "NetworkDisabled", "MacAddress",
                 "StopSignal", "Shell"]


def oci_config_json(config: ImageConfig) -> str:
    c = config.config

    def sort_maps(v):
        return {k: sort_maps(v[k]) for k in sorted(v)} if isinstance(v, dict) else v

    out = {k: sort_maps(c[k]) for k in _CONFIG_ORDER if c.get(k) not in (None, "", [], {}, False)}
    return go_json(out)


def inspect_metadata_json(env_sh: str, lab: dict[str, str], run: str, definition: str) -> str:
    attrs = {"environment": {f"/{SD}/env/10-docker2singularity.sh": env_sh.rstrip("\n"),
                             f"/{SD}/env/90-environment.sh": ENV_FILES["90-environment.sh"].rstrip("\n")},
             "labels": dict(sorted(lab.items())), "runscript": run.rstrip("\n"), "deffile": definition.rstrip("\n"),
             "startscript": STARTSCRIPT.rstrip("\n")}
    return go_json({"data": {"attributes": attrs}, "type": "container"})


# the stream transform ----------------------------------------------------------------------------------
def _ancestors(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


class Changes:
    def __init__(self):
        self._c: dict[str, _Change] = {}

    def hit(self, kind: str, description: str, path: str) -> None:
        c = self._c.get(kind)
        if c is None:
            c = self._c[kind] = _Change(kind, description)
        c.hit(path)

    def to_json(self) -> list[dict]:
        return [{"kind": c.kind, "description": c.description, "count": c.count, "examples": c.examples}
                for c in self._c.values()]


def readable_mode(e: Entry) -> int:
    """`a+rX`: files world-readable, directories and executables world-searchable."""
    mode = e.mode
    if e.type == DIR:
        return mode | 0o555
    if e.type == FILE:
        return mode | 0o444 | (0o111 if mode & 0o111 else 0)
    return mode


def fix_readable(e: Entry, changes: Changes) -> Entry:
    """Apply `a+rX` to one entry unless it is a secret; report the change."""
    if e.type not in (DIR, FILE):
        return e
    if PRIVATE.match(e.path):
        if e.mode & 0o004 == 0:
            changes.hit("kept-private", "secrets left unreadable to other users on purpose", e.path)
        return e
    new = readable_mode(e)
    if new != e.mode:
        if e.type == DIR:
            changes.hit("dir-a+rx", "directories made readable and searchable by every user (a+rx)", e.path)
        else:
            changes.hit("file-a+r", "files made readable by every user (a+r, a+x where executable)", e.path)
        return e.with_(mode=new)
    return e


class SingularityFixups:
    """Drop what we replace, make the tree usable by a non-root user, append Apptainer's items."""

    def __init__(self, image: Image, checks: Checks, when: int):
        self.image = image
        self.when = when                  # mtime of what we add: the build time (SOURCE_DATE_EPOCH)
        self.checks = checks
        self.changes = Changes()
        self.env_sh = env_script(image.config)
        self.run = runscript(image.config)
        self.definition = deffile(image)
        self.labels = labels(image, when)
        self.files: dict[str, tuple[str, int]] = {f"{SD}/runscript": (self.run, 0o755),
                                                   f"{SD}/startscript": (STARTSCRIPT, 0o755),
                                                   f"{SD}/env/10-docker2singularity.sh": (self.env_sh, 0o755),
                                                   f"{SD}/labels.json": (labels_json(self.labels), 0o644),
                                                   f"{SD}/Singularity": (self.definition, 0o644)}
        for name, text in ACTIONS.items():
            self.files[f"{SD}/actions/{name}"] = (text, 0o755)
        for name, text in ENV_FILES.items():
            self.files[f"{SD}/env/{name}"] = (text, 0o755)
        self.seen: dict[str, str] = {}
        self._watch = set(MOUNT_DIRS) | set(SD_DIRS) | set(EMPTY_FILES) | set(LINKS)
        self._dropped: set[str] = set()

    def _drop(self, e: Entry, kind: str, description: str) -> None:
        self.changes.hit(kind, description, e.path)
        self._dropped.add(e.path)

    def transform(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for e in entries:
            p = e.path
            if e.type == HARDLINK and e.linkname in self._dropped:
                self._drop(e, "hardlink-dropped", "hardlinks to replaced files dropped")
                continue
            if p in self.files:
                self._drop(e, "replaced", "Apptainer metadata already in the image replaced by hpcconv's")
                continue
            if p in LINKS and e.type == SYMLINK and e.linkname != LINKS[p]:
                self._drop(e, "replaced", "Apptainer metadata already in the image replaced by hpcconv's")
                continue
            if p in SD_DIRS and e.type != DIR:
                self._drop(e, "replaced-by-dir", f"/{p} is not a directory in the image; replaced by one")
                continue
            if any(p.startswith(d + "/") for d in self._dropped if d in SD_DIRS):
                continue
            if p in EMPTY_FILES and e.type in (FILE, HARDLINK):
                self._drop(e, "emptied", "/etc/hosts and /etc/resolv.conf emptied (the runtime binds the host's)")
                continue
            e = fix_readable(e, self.changes)
            if p in self._watch:
                self.seen[p] = e.type
            yield e
        yield from self._additions()

    def _missing(self, path: str) -> bool:
        if path in self.seen:
            return False
        return all(self.seen.get(a, DIR) == DIR for a in _ancestors(path)[:-1])

    def _additions(self) -> Iterator[Entry]:
        blocked = []
        for d in SD_DIRS + MOUNT_DIRS:
            if self._missing(d):
                self.seen[d] = DIR
                self.changes.hit("added-dir", "Apptainer directories and mount points added", d)
                yield Entry(d, DIR, 0o755, 0, 0, self.when, uname="root", gname="root")
            elif self.seen.get(d) != DIR and d not in ("var/tmp", "tmp"):
                blocked.append(f"/{d} is a {self.seen.get(d, 'missing parent')}, not a directory")
        for p, (text, mode) in self.files.items():
            data = text.encode()
            yield Entry(p, FILE, mode, 0, 0, self.when, size=len(data), uname="root", gname="root",
                        reader=io.BytesIO(data))
        for p in EMPTY_FILES:
            if self._missing(p) or p in self._dropped:
                yield Entry(p, FILE, 0o644, 0, 0, self.when, size=0, uname="root", gname="root",
                            reader=io.BytesIO(b""))
            elif self.seen.get(p) == SYMLINK:
                self.checks.add(STAGE, f"/{p}", WARN, f"/{p} is a symlink in the image; the runtime may not be "
                                "able to bind the host's file onto it")
        for name, target in LINKS.items():
            if name in self.seen:
                if self.seen[name] != SYMLINK:
                    blocked.append(f"/{name} is a {self.seen[name]} in the image and was kept")
                continue
            yield Entry(name, SYMLINK, 0o777, 0, 0, self.when, linkname=target, uname="root", gname="root")
        self.checks.add(STAGE, "apptainer layout", WARN if blocked else PASS,
                        "; ".join(blocked) if blocked else
                        f"/{SD} (runscript, env, actions, labels.json), links and mount points in place")


def environment_checks(config: ImageConfig, checks: Checks) -> None:
    env, bad = parse_env(config.env)
    if bad:
        checks.add(STAGE, "environment", WARN, "Env elements whose names are not shell names were skipped (as "
                   f"Apptainer does): {', '.join(repr(b) for b in bad[:3])}")
    else:
        checks.add(STAGE, "environment", PASS, f"{len(env)} variables in /{SD}/env/10-docker2singularity.sh")
    ignored = [k for k in ("User", "WorkingDir") if config.config.get(k) not in (None, "", "root", "0", "0:0", "root:root", "/")]
    if ignored:
        checks.add(STAGE, "ignored config", WARN, f"{' and '.join(ignored)} are not applied by `apptainer run` "
                   "(it runs as the calling user in the current directory); use --pwd for WORKDIR")


def compression_check(compression: str, checks: Checks, who: str) -> None:
    if compression == "gzip":
        checks.add(STAGE, "compression", PASS, "gzip: mountable by every kernel and squashfuse")
    else:
        checks.add(STAGE, "compression", WARN, f"{compression}: {who}; kernels before 4.14 (or built without "
                   f"SQUASHFS_{compression.upper()}) and older squashfuse builds cannot read it; gzip is the safe choice")


def emit(entries: Iterable[Entry], image: Image, out: Path | str, fmt: str = "sif", compression: str = "gzip",
         reporter: Reporter = NULL, force: bool = False, level: int | None = None,
         block_size: int = sinks.BLOCK_SIZE) -> EmitResult:
    """Write a SIF file (fmt 'sif') or a sandbox directory (fmt 'sandbox')."""
    from ..errors import UsageError

    out = Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"unknown Singularity format {fmt!r}", hint="use sif or sandbox")
    sinks.check_output(out, force)
    when = sif.epoch()
    when = int(time.time()) if when is None else when
    checks = Checks()
    if fmt == "sif":
        compression_check(compression, checks, "Apptainer mounts SIF partitions with the kernel or squashfuse")
    environment_checks(image.config, checks)
    fix = SingularityFixups(image, checks, when)
    stream = fix.transform(entries)
    with checks.timed(STAGE, f"write {fmt}") as c:
        if fmt == "sandbox":
            n = sinks.write_dir(stream, out, reporter=reporter, force=force)
            c.detail = f"{out} ({n} entries)"
        else:
            objects = [sif.DataObject(sif.DT_DEFFILE, fix.definition.encode()),
                       sif.DataObject(sif.DT_GENERIC_JSON, inspect_metadata_json(
                           fix.env_sh, fix.labels, fix.run, fix.definition).encode(), "inspect-metadata.json"),
                       sif.DataObject(sif.DT_GENERIC_JSON, oci_config_json(image.config).encode(), "oci-config.json")]
            res = sif.write_sif(stream, out, objects, fallback_arch=image.platform.architecture,
                                compression=compression, level=level, block_size=block_size, force=force,
                                reporter=reporter)
            n = res.entries
            c.detail = (f"{out} ({n} entries, squashfs {compression} partition {res.partition_size} B at "
                        f"{res.partition_offset}{res.reuse_note})")
            st = PASS if res.arch == image.platform.architecture else WARN
            checks.add(STAGE, "sif architecture", st, f"{res.arch} from the {res.arch_source}"
                       + ("" if st == PASS else f"; the image config says {image.platform.architecture}"))
    hint = (f"apptainer run {out}" if fmt == "sif" else f"apptainer run {out}/   (or: apptainer build image.sif {out}/)")
    return EmitResult(checks, fix.changes.to_json(), hint, out, n)
