"""Shifter emitter: an entry stream + the image config -> `<ID>.squashfs` and `<ID>.meta` in a directory.

Format and runtime rules: docs/reference/shifter-sarus-enroot.md A2, A4, A5.

* `<ID>.meta` is what the runtime's parser (`shifter_parseConfig` + `_ImageData_assign`) reads:
  `KEY: value` lines, split at the first `:`, key and value whitespace-trimmed, a value ending in
  `\\` continued on the next line. Written: `FORMAT: squashfs`, `ENTRY:` / `CMD:` as single-quoted
  lists (`['a', 'b']`: the parser takes each element between single quotes, with no escapes, so
  an element holding `'` or a newline cannot be written: the key is left out and reported),
  `WORKDIR:` when set, one `ENV: K=V` line per config Env element (an element holding a newline
  is left out; a value that ends in `\\` or in blanks would be altered by the parser: reported).
  No `USER:`/`LABELS:` or other keys (the runtime warns on every run about keys it does not know).
* `<ID>`: `hpcconv-` + the sha256 of the sha256s of the squashfs's 64 MiB pieces (in order), a NUL
  and the meta text (`make_id`: the pieces are hashed on every core, the last serial step of a
  conversion: 0.28 s for the benchmark's 362 MB on one). Gateway ids are bare 64-hex digests
  (manifest digest, fasthash, layer id), so ours can never collide with them, and the same content
  always gets the same id. The runtime accepts `[A-Za-z0-9_:.+@-]` in ids.
* The squashfs, built from the entry stream like every other sink (`sinks.write_squashfs`), is made
  as the image gateway makes it: owners root (`-all-root`), no xattrs (`-no-xattrs`), nothing under
  `/dev`, no device nodes, and `a+rX` (the runtime runs everything as the calling user; secrets such
  as `/etc/shadow` are left alone). `/etc /var /opt /tmp /proc /sys /dev /home` are added when
  missing. Every change is reported.
* Shifter runs CMD when given no command, and ENTRYPOINT only with `--entrypoint`; WORKDIR only with
  `--workdir`. The install note printed at the end says so.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, Entry
from ..errors import UsageError
from ..harness.checks import PASS, WARN, Checks
from ..image import Image, ImageConfig
from ..progress import NULL, Reporter
from . import sinks
from .charliecloud import EmitResult
from .singularity import Changes, compression_check, fix_readable

STAGE = "emit"
MOUNT_DIRS = ["etc", "var", "opt", "tmp", "proc", "sys", "dev", "home"]
ETC_BIG = 5 << 20
ID_PREFIX = "hpcconv-"
ID_PIECE = 64 << 20
DOCKER_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class ShifterResult(EmitResult):
    image_id: str = ""
    squashfs: Path | None = None
    meta: Path | None = None
    note: str = ""


def _list(args: list[str]) -> str:
    return "[" + ", ".join(f"'{a}'" for a in args) + "]"


def meta_text(config: ImageConfig, checks: Checks | None = None) -> str:
    checks = checks if checks is not None else Checks()
    lines = ["FORMAT: squashfs"]
    problems = []
    for key, args in (("ENTRY", config.entrypoint), ("CMD", config.cmd)):
        if not args:
            continue
        bad = [a for a in args if "'" in a or "\n" in a or "\r" in a]
        if bad:
            problems.append(f"{key} left out: Shifter's meta parser cannot hold the element {bad[0]!r} "
                            "(single quote or newline)")
            continue
        lines.append(f"{key}: {_list(args)}")
    wd = config.workdir
    if wd:
        if "\n" in wd or wd != wd.strip() or wd.endswith("\\"):
            problems.append(f"WORKDIR {wd!r} left out: the meta parser would alter it")
        else:
            lines.append(f"WORKDIR: {wd}")
    env = list(config.env)
    if not any(item.startswith("PATH=") for item in env):
        # docker run gives such an image Docker's default PATH; Shifter would leave the host's
        env.insert(0, "PATH=" + DOCKER_DEFAULT_PATH)
        problems.append("the image sets no PATH: Docker's default PATH written, as docker run uses it")
    for item in env:
        if "\n" in item or "\r" in item:
            problems.append(f"ENV {item.split('=', 1)[0]} left out: its value holds a newline")
            continue
        if "=" not in item or item.startswith("="):
            problems.append(f"ENV element {item!r} left out: not NAME=VALUE")
            continue
        if item != item.strip() or item.endswith("\\"):
            problems.append(f"ENV {item.split('=', 1)[0]}: the meta parser strips surrounding blanks and joins "
                            "a value ending in a backslash with the next line; written anyway")
        lines.append(f"ENV: {item}")
    checks.add(STAGE, "shifter meta", WARN if problems else PASS,
               "; ".join(problems) if problems else
               f"FORMAT, {sum(l.startswith('ENV:') for l in lines)} ENV lines"
               + (", ENTRY" if config.entrypoint else "") + (", CMD" if config.cmd else "")
               + (", WORKDIR" if wd else ""))
    return "\n".join(lines) + "\n"


class ShifterFixups:
    def __init__(self, checks: Checks):
        self.checks = checks
        self.changes = Changes()
        self.seen: dict[str, str] = {}
        self._dropped: set[str] = set()
        self.big_etc: list[str] = []
        self.has_sh = False
        self.symlinks: dict[str, str] = {}

    def _drop(self, e: Entry, kind: str, desc: str) -> None:
        self.changes.hit(kind, desc, e.path)
        self._dropped.add(e.path)

    def transform(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for e in entries:
            p = e.path
            if p.startswith("dev/"):
                self._drop(e, "dev-content-dropped", "anything under /dev dropped (the runtime binds the host's /dev)")
                continue
            if e.type in (CHAR, BLOCK, FIFO):
                self._drop(e, "special-dropped", "device nodes and FIFOs dropped")
                continue
            if e.type == HARDLINK and e.linkname in self._dropped:
                self._drop(e, "hardlink-dropped", "hardlinks to dropped entries dropped")
                continue
            if p == "dev" and e.type != DIR:
                self._drop(e, "replaced-by-dir", "/dev is not a directory in the image; replaced by one")
                continue
            if e.uid or e.gid:
                self.changes.hit("owner", "owner set to root (as the image gateway's mksquashfs -all-root)", p)
            if e.xattrs:
                self.changes.hit("xattrs-dropped", "extended attributes dropped (-no-xattrs, as the gateway)", p)
            e = fix_readable(e.with_(uid=0, gid=0, uname="root", gname="root", xattrs={}), self.changes)
            if "/" not in p:
                self.seen[p] = e.type
            if p.startswith("etc/") and p.count("/") == 1 and e.type == FILE and e.size >= ETC_BIG:
                self.big_etc.append("/" + p)
            if p == "bin/sh" or p == "usr/bin/sh":
                self.has_sh = True
            yield e
        for d in MOUNT_DIRS:
            if d not in self.seen:
                self.changes.hit("added-dir", "top-level directories added", d)
                yield Entry(d, DIR, 0o755, 0, 0, 0, uname="root", gname="root")
        if self.big_etc:
            self.checks.add(STAGE, "big /etc files", WARN, "Shifter's runtime silently skips top-level /etc files of "
                            f"5 MiB or more: {', '.join(self.big_etc[:5])}")
        if not self.has_sh:
            self.checks.add(STAGE, "/bin/sh", WARN, "the image has no /bin/sh: Shifter's default command and module "
                            "hooks need one")


def install_note(image_id: str, out: Path, config: ImageConfig) -> str:
    cmd = shlex.join(config.cmd) if config.cmd else "/bin/sh"
    ep = shlex.join(config.entrypoint)
    lines = [
        f"Shifter image {image_id} in {out}/:",
        f"  {image_id}.squashfs  {image_id}.meta",
        "For the centre's Shifter administrators: copy both files (as root, mode 0600 or 0644) into the",
        "imagePath directory named in udiRoot.conf (the image gateway's imageDir), e.g.",
        f"  install -m 0644 -o root -g root {out}/{image_id}.squashfs {out}/{image_id}.meta /path/to/imagePath/",
        "Users then run it by id, without the image gateway:",
        f"  shifter --image=id:{image_id}" + (f"   runs CMD ({cmd})" if config.cmd else "   runs /bin/sh"),
        f"  shifter --image=id:{image_id} COMMAND [ARGS...]",
        f"  #SBATCH --image=id:{image_id}   then   srun shifter COMMAND [ARGS...]",
    ]
    if ep:
        lines.append(f"  shifter --image=id:{image_id} --entrypoint [ARGS]   runs the ENTRYPOINT ({ep})")
    if config.workdir:
        lines.append(f"  add --workdir to start in WORKDIR ({config.workdir}); Shifter otherwise keeps the current dir")
    return "\n".join(lines)


def _reclaim_stale(out: Path) -> None:
    """Remove the temporaries a killed hpcconv (this host, PID gone) left in the output directory."""
    import re

    host = socket.gethostname()
    for name in os.listdir(out):
        m = re.match(r"\.\.?hpcconv-shifter-(.+)-(\d+)-[0-9a-f]+\.squashfs", name)
        if not m or m.group(1) != host or int(m.group(2)) == os.getpid() or sinks._pid_alive(int(m.group(2))):
            continue
        try:
            os.unlink(out / name)
        except OSError:
            pass


def make_id(squashfs: Path, meta: bytes) -> str:
    """The image id (see the module docstring): the pieces hashed in parallel (pread and sha256
    release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(squashfs)
    fd = os.open(squashfs, os.O_RDONLY | os.O_CLOEXEC)

    def piece(start: int) -> bytes:
        h = hashlib.sha256()
        pos, end = start, min(start + ID_PIECE, size)
        while pos < end:
            data = os.pread(fd, min(1 << 20, end - pos), pos)
            if not data:
                raise sinks.OutputError(f"{squashfs} shrank while its id was computed")
            h.update(data)
            pos += len(data)
        return h.digest()

    try:
        with ThreadPoolExecutor(min(sinks.cores(), 8)) as ex:
            digests = list(ex.map(piece, range(0, size, ID_PIECE)))
    finally:
        os.close(fd)
    return ID_PREFIX + hashlib.sha256(b"".join(digests) + b"\0" + meta).hexdigest()


def emit(entries: Iterable[Entry], image: Image, out: Path | str, fmt: str | None = None,
         compression: str = "gzip", reporter: Reporter = NULL, force: bool = False, level: int | None = None,
         block_size: int = sinks.BLOCK_SIZE) -> ShifterResult:
    """Write `<ID>.squashfs` and `<ID>.meta` into the directory `out` (created if missing)."""
    out = Path(out)
    if fmt not in (None, "squashfs"):
        raise UsageError(f"Shifter images are squashfs only, not {fmt!r}", hint="drop --format")
    if os.path.lexists(out) and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory",
                         hint="for --target shifter, -o names a directory that receives <id>.squashfs and <id>.meta")
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} for the output does not exist")
    out.mkdir(exist_ok=True)
    checks = Checks()
    compression_check(compression, checks, "Shifter mounts the image with the kernel's squashfs driver")
    meta = meta_text(image.config, checks).encode()
    fix = ShifterFixups(checks)
    _reclaim_stale(out)
    tmp = out / f".hpcconv-shifter-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.squashfs"
    try:
        with checks.timed(STAGE, "write squashfs") as c:
            record: list = []
            stats: dict = {}
            n = sinks.write_squashfs(fix.transform(entries), tmp, compression=compression, reporter=reporter,
                                     level=level, block_size=block_size, record_later=record, stats=stats)
            image_id = make_id(tmp, meta)
            sq, mt = out / f"{image_id}.squashfs", out / f"{image_id}.meta"
            for p in (sq, mt):
                if os.path.lexists(p) and not force and not p.is_file():
                    raise UsageError(f"{p} exists and is not a file", hint="use --force to replace it")
            os.replace(tmp, sq)
            for later in record:
                later(sq)
            mtmp = out / f".{image_id}.meta.hpcconv-{secrets.token_hex(4)}.tmp"
            mtmp.write_bytes(meta)
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(mtmp, 0o666 & ~umask)
            os.replace(mtmp, mt)
            c.detail = f"{sq} ({n} entries, {compression}{stats.get('reuse', '')}) and {mt.name}"
    finally:
        if tmp.exists():
            tmp.unlink()
    note = install_note(image_id, out, image.config)
    return ShifterResult(checks, fix.changes.to_json(), f"shifter --image=id:{image_id}", out, n,
                         image_id=image_id, squashfs=sq, meta=mt, note=note)
