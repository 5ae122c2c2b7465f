"""Write an entry stream (entries.py) as a tar, a SquashFS image or a directory tree.

Common rules for every sink:

* The output is built under a temporary name next to it (`.NAME.hpcconv-HOST-PID-XXXX.tmp`, same file
  system) and renamed into place only when complete. On any error the temporary is removed: there is
  never a partial output. What a killed process (SIGKILL, power loss) left is removed by the next
  write of the same output on that host, once its PID is gone (`reclaim_stale`). An existing output is refused unless `force`; with `force` it is replaced only
  after the new one is complete.
* ENOSPC becomes a one-line `OutputError` naming the output.
* No rootfs is staged on disk for `tar` and `squashfs`: the stream is written as a tar straight into
  the compressor, or into hpcconv's own SquashFS writer (or `tar2sqfs`'s stdin).

SquashFS (`write_squashfs`): for gzip and zstd, hpcconv's own writer (emit/sqfs.py: the same
block size and levels as below, byte-reproducible, duplicates removed, compressed blocks of
earlier images reused inside `block_reuse_in`). With HPCCONV_SQUASHFS_BUILDER=external, and for
xz/lz4/lzo: `tar2sqfs` (squashfs-tools-ng) reading the tar from stdin,
`--no-skip` (a record it cannot read is an error, never silently dropped), `-j NCPU` compressor
threads, `--defaults mtime=0,uid=0,gid=0,mode=0755` for the root inode (the stream never has one),
which with `tar2sqfs`'s fixed superblock time makes the image byte-for-byte reproducible.
Block size: **1 MiB** (`BLOCK_SIZE`), not Charliecloud's 64 KiB or the 128 KiB default: images are
read from parallel file systems whose stripes are ≥1 MiB, a larger block means a smaller block index
and better zstd ratios; the price is that a random small read of a big file decompresses up to
1 MiB, which squashfuse's block cache amortises. Levels: gzip 6 and zstd 6 (`SQFS_LEVELS`), not the
tools' default of 9 (gzip) and 15 (zstd). Measured with tar2sqfs -j2 on /usr/lib/python3.11
(53 MB tar, 2 noisy vCPUs): gzip-9/1M 15.1 MB in 15.9 s, gzip-6/1M 15.3 MB in 2-3 s, gzip-6/64K
15.7 MB; zstd-3/1M 15.1 MB in 0.4-0.5 s, zstd-6/1M 14.0 MB in 1.2 s, zstd-9/1M 13.7 MB in 1.5-2.3 s,
zstd-15/1M 13.6 MB in 9.4 s; zstd-3 at 64K/128K/1M: 16.5/16.2/15.1 MB. So gzip barely cares about
the block size (deflate's window is 32 KiB) and zstd gains ~8% from 64 KiB to 1 MiB; level 9+
costs far more time than it saves space. Pass `block_size=65536` to match `ch-convert` exactly. `tar2sqfs` accepts entries in any order
(a directory entry after its children only sets that directory's attributes; verified), so the
Charliecloud emitter may append missing items at the end. Fallback when `tar2sqfs` is missing:
`mksquashfs - OUT -tar -noappend` (squashfs-tools ≥ 4.6, or distributions that backport `-tar`,
as Debian 12's 4.5.1 does; there `-root-time 0` is not honoured, so that fallback is not
byte-reproducible).
Owners are taken from the stream (the Charliecloud emitter has already made them 0:0), so no
`-all-root` is needed.

Directory (`write_dir`): safe against hostile streams. Every parent is opened component by component
from the output root with `O_DIRECTORY|O_NOFOLLOW` and every object is created with `*at()` calls
relative to that descriptor, so no symlink, hardlink or `..` in the stream can make us write
outside the output (a symlink where a directory is needed is an `UnsafeInput` error). Hardlinks
become real links (`linkat` without following), symlinks are stored as they are (never followed),
xattrs are set best effort, ownership is applied when running as root. Directories are created
0700 and get their real mode and mtime at the end (deepest first), so read-only directories in the
image do not stop the extraction.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from ..entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry, TarWriter, raw
from ..errors import CorruptInput, HpcconvError, UnsafeInput, UsageError
from ..progress import NULL, Reporter

BLOCK_SIZE = 1 << 20
CHUNK = 1 << 20
SQFS_XATTR_PREFIXES = ("user.", "trusted.", "security.")
SQFS_LEVELS = {"gzip": 6, "zstd": 6}   # see the module docstring for the measurements


def _level_overrides() -> None:
    """HPCCONV_SQUASHFS_LEVEL=N (or gzip=N,zstd=N) overrides the SquashFS levels (benchmarks/ sets
    zstd 3 to compare with peers at the same level)."""
    raw = os.environ.get("HPCCONV_SQUASHFS_LEVEL", "").strip()
    for part in filter(None, (p.strip() for p in raw.split(","))):
        comp, _, val = part.rpartition("=")
        if val.isdigit():
            for c in ([comp] if comp else list(SQFS_LEVELS)):
                SQFS_LEVELS[c] = int(val)


_level_overrides()


class OutputError(HpcconvError):
    """The output could not be written (disk full, tool failed, permission denied)."""

    exit_code = 1


# output files: temp name next to the output, rename at the end ---------------------------------------
def check_output(out: Path, force: bool) -> None:
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise UsageError(f"output {out} already exists", hint="use --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} for the output does not exist")


def _tmp_prefix(out: Path) -> str:
    """`.NAME.hpcconv-HOST-PID-`: a later run can tell a dead process's leftover from a live one's."""
    import socket

    return f".{out.name}.hpcconv-{socket.gethostname()}-{os.getpid()}-"


def _tmp_name(out: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=_tmp_prefix(out), suffix=".tmp")
    os.close(fd)
    return Path(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(out: Path) -> list[str]:
    """Remove what a killed hpcconv left next to `out` (temporaries of this host's dead processes);
    an output moved aside by a process killed before it put the new one in place is moved back.
    Returns the names removed or restored."""
    import re
    import socket

    out = Path(out)
    host = socket.gethostname()
    done = []
    try:
        names = [n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.hpcconv-")]
    except OSError:
        return done
    for n in names:
        rest = n[len(f".{out.name}.hpcconv-"):]
        m = re.fullmatch(r"old-(\d+)", rest)
        if m:
            pid, owner = int(m.group(1)), host
        else:
            m = re.fullmatch(r"(.+)-(\d+)-[^-]+\.tmp", rest)
            if not m:
                continue                      # an older hpcconv's temporary: its owner is unknown
            owner, pid = m.group(1), int(m.group(2))
        if owner != host or pid == os.getpid() or _pid_alive(pid):
            continue
        path = out.parent / n
        with contextlib.suppress(OSError):
            if rest.startswith("old-") and not os.path.lexists(out):
                os.rename(path, out)          # killed between moving the old output aside and the new in
            else:
                _remove(path)
            done.append(n)
    return done


def _remove(path: Path) -> None:
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        def onerror(func, p, exc):
            with contextlib.suppress(OSError):
                os.chmod(os.path.dirname(p), 0o700)
                func(p)
        shutil.rmtree(path, onerror=onerror)
    else:
        path.unlink()


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary into place, replacing an existing output (force was checked).
    A file replaces a file atomically; anything involving a directory (or a symlink to one, which is
    replaced, never followed) is moved aside first and removed after the new output is in place."""
    if os.path.lexists(out) and (tmp.is_dir() or (out.is_dir() and not out.is_symlink())):
        aside = out.parent / f".{out.name}.hpcconv-old-{os.getpid()}"
        os.rename(out, aside)
        os.rename(tmp, out)
        _remove(aside)
    else:
        os.replace(tmp, out)


def _nearly_full(d: Path) -> bool:
    """Whether the file system of `d` has little room left (under 64 MiB): a tool that failed with an
    I/O error writing there most likely ran out of space."""
    try:
        st = os.statvfs(d)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 20) or (st.f_favail == 0 and st.f_files > 0)


def _os_error(e: OSError, out: Path) -> HpcconvError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {out}", hint="free space or write the output elsewhere")
    if e.errno == errno.EDQUOT:
        return OutputError(f"disk quota exceeded while writing {out}")
    return OutputError(f"cannot write {out}: {e.strerror or e}")


@contextlib.contextmanager
def _atomic(out: Path, force: bool, kind: str = "file") -> Iterator[Path]:
    out = Path(out)
    if out.parent.is_dir():
        reclaim_stale(out)
    check_output(out, force)
    if kind == "dir":
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_tmp_prefix(out), suffix=".tmp"))
    else:
        tmp = _tmp_name(out)
    try:
        yield tmp
        if kind != "dir":
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        _publish(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise _os_error(e, out) from None
    except BaseException:
        _remove(tmp)
        raise


class _CountingWriter(io.RawIOBase):
    def __init__(self, raw: BinaryIO, task):
        self._raw, self._task = raw, task
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = self._raw.write(b)
        n = len(b) if n is None else n
        self.n += n
        self._task.advance(n)
        return n

    def flush(self) -> None:
        self._raw.flush()


# tar ---------------------------------------------------------------------------------------------------
def _compressor(fileobj: BinaryIO, compression: str | None, level: int | None):
    if compression in (None, "none"):
        return fileobj, lambda: None
    if compression == "gzip":
        # ISA-L level 3 (the default): on /usr/lib/python3.11 17.4 MB in 0.36 s, where zlib -6 gives
        # 15.3 MB in 4.7 s. An explicit level 4-9 selects zlib for the smallest output.
        if level is not None and level > 3:
            import gzip

            z = gzip.GzipFile(filename="", mode="wb", fileobj=fileobj, compresslevel=min(level, 9), mtime=0)
            return z, z.close
        from isal import igzip

        z = igzip.IGzipFile(filename="", mode="wb", fileobj=fileobj, compresslevel=3 if level is None else max(0, level),
                            mtime=0)
        return z, z.close
    if compression == "zstd":
        import zstandard

        z = zstandard.ZstdCompressor(level=3 if level is None else level, threads=-1).stream_writer(
            fileobj, closefd=False)
        return z, z.close
    raise UsageError(f"unknown tar compression {compression!r}", hint="use gzip or zstd")


def _abandon(w: TarWriter) -> None:
    """Mark a failed tar writer closed so that it does not flush a trailer into a dead output later."""
    tf = getattr(w, "_tf", None)
    if tf is not None:
        tf.closed = True
        if getattr(tf, "fileobj", None) is not None:
            tf.fileobj.closed = True


def _write_tar_to(entries: Iterable[Entry], raw: BinaryIO, compression: str | None, level: int | None,
                  reporter: Reporter, what: str) -> int:
    task = reporter.task(what)
    counted = _CountingWriter(raw, task)
    if compression not in (None, "none"):
        counted = io.BufferedWriter(counted, CHUNK)     # the compressor writes in small pieces
    # (uncompressed, the TarWriter gathers small writes into 1 MiB ones itself)
    z, finish = _compressor(counted, compression, level)
    w = TarWriter(z)
    try:
        n = w.write_all(entries)
    except BaseException:
        _abandon(w)
        raise
    w.close()
    finish()
    counted.flush()
    task.done()
    return n


def write_tar(entries: Iterable[Entry], path: Path | str | None, compression: str | None = None,
              reporter: Reporter = NULL, level: int | None = None, force: bool = False) -> int:
    """Write the stream as a PAX tar (optionally gzip/zstd) to `path`, or stdout when None.
    Returns the number of entries written."""
    if path is None:
        return _write_tar_to(entries, sys.stdout.buffer, compression, level, reporter, "writing tar")
    path = Path(path)
    with _atomic(path, force) as tmp:
        with open(tmp, "wb") as f:
            n = _write_tar_to(entries, f, compression, level, reporter, f"writing {path.name}")
            f.flush()
            os.fsync(f.fileno())
    return n


# squashfs ----------------------------------------------------------------------------------------------
def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _mksquashfs_has_tar(exe: str) -> bool:
    r = subprocess.run([exe, "-help"], capture_output=True, text=True)
    return "-tar" in (r.stdout + r.stderr)


def cores() -> int:
    """The CPUs this process may run on (its affinity mask: a batch job's cpuset, not the node's
    count), at least 1: the builders' and hashers' thread counts."""
    return max(1, len(os.sched_getaffinity(0)))


def squashfs_command(out: Path, compression: str, level: int | None, block_size: int) -> list[str]:
    if compression not in ("gzip", "zstd", "xz", "lz4", "lzo"):
        raise UsageError(f"unknown squashfs compression {compression!r}", hint="use gzip or zstd")
    jobs = str(cores())
    if level is None:
        level = SQFS_LEVELS.get(compression)
    exe = _which("tar2sqfs")
    if exe:
        cmd = [exe, "--quiet", "--no-skip", "--force", "--compressor", compression, "--block-size",
               str(block_size), "--num-jobs", jobs, "--defaults", "mtime=0,uid=0,gid=0,mode=0755"]
        if level is not None:
            cmd += ["--comp-extra", f"level={level}"]
        return cmd + [str(out)]
    exe = _which("mksquashfs")
    if exe and _mksquashfs_has_tar(exe):
        cmd = [exe, "-", str(out), "-tar", "-noappend", "-no-progress", "-quiet", "-comp", compression,
               "-b", str(block_size), "-processors", jobs, "-mkfs-time", "0", "-root-time", "0",
               "-root-mode", "755", "-root-uid", "0", "-root-gid", "0", "-exit-on-error"]
        if level is not None:
            cmd += ["-Xcompression-level", str(level)]
        return cmd
    raise OutputError("neither tar2sqfs nor a mksquashfs with -tar is installed",
                      hint="apt-get install squashfs-tools-ng")


def _sqfs_entries(entries: Iterable[Entry], dropped: list[str]) -> Iterator[Entry]:
    for e in entries:
        if e.xattrs and any(not k.startswith(SQFS_XATTR_PREFIXES) for k in e.xattrs):
            keep = {k: v for k, v in e.xattrs.items() if k.startswith(SQFS_XATTR_PREFIXES)}
            dropped.extend(f"{e.path}: {k}" for k in e.xattrs if k not in keep)
            e = e.with_(xattrs=keep)
        yield e


def widen_pipe(f) -> None:
    """Give the pipe into a SquashFS builder 1 MiB instead of 64 KiB (best effort: the limit is
    /proc/sys/fs/pipe-max-size for non-root). With the default the writer and the builder wake each
    other every 64 KiB; measured on the benchmark image, cold registry -> zstd SquashFS took about
    12 s instead of 14 s (median of 6 interleaved runs each, 2 vCPUs)."""
    import fcntl

    try:
        fcntl.fcntl(f.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), CHUNK)
    except OSError:
        pass


def squashfs_builder(compression: str) -> str:
    """Which program builds a SquashFS: "hpcconv" (emit/sqfs.py, for gzip and zstd) or "external"
    (tar2sqfs, or mksquashfs -tar; for a SIF mksquashfs, which can write at an offset).
    HPCCONV_SQUASHFS_BUILDER=external picks the external tools for every compressor."""
    choice = os.environ.get("HPCCONV_SQUASHFS_BUILDER", "").strip() or "hpcconv"
    if choice not in ("hpcconv", "external"):
        raise UsageError(f"HPCCONV_SQUASHFS_BUILDER={choice!r} is not a SquashFS builder",
                         hint="use hpcconv or external")
    from . import sqfs

    if choice == "hpcconv" and compression not in sqfs.COMPRESSORS:
        return "external"
    return choice


_REUSE_DIR: "contextvars.ContextVar[tuple[Path, list[str] | None] | None]" = contextvars.ContextVar(
    "hpcconv_block_reuse", default=None)


@contextlib.contextmanager
def block_reuse_in(directory: Path | None, blobs: list[str] | None = None) -> Iterator[None]:
    """SquashFS images written inside take their compressed blocks from earlier images recorded in
    `directory` where they can, and are recorded there (the store's block-reuse/; emit/sqfs.py);
    `blobs`: the digests of the layers the images are made of (what an index knows of other
    layers is not loaded)."""
    token = _REUSE_DIR.set((directory, blobs) if directory is not None else None)
    try:
        yield
    finally:
        _REUSE_DIR.reset(token)


def write_squashfs_native(entries: Iterable[Entry], fd: int, base: int, compression: str, level: int | None,
                          block_size: int, reporter: Reporter, what: str, **kw):
    """The stream into hpcconv's own SquashFS writer at `base` of `fd`; xattrs SquashFS cannot store
    are dropped with a warning, as with the external tools. Returns the finished writer and the
    BlockReuse (or None) to record the image in once it is in place (`reuse.save`)."""
    from . import sqfs

    if compression not in sqfs.COMPRESSORS:
        raise UsageError(f"unknown squashfs compression {compression!r}", hint="use gzip or zstd")
    if level is None:
        level = SQFS_LEVELS.get(compression)
    reuse = None
    where = _REUSE_DIR.get()
    if where is not None and os.environ.get("HPCCONV_BLOCK_REUSE", "1") != "0":
        reuse = sqfs.BlockReuse(where[0], sqfs.settings_name(compression, level, block_size), blobs=where[1])
    dropped: list[str] = []
    task = reporter.task(what)
    try:
        w = sqfs.write(_sqfs_entries(entries, dropped), fd, base, compression=compression, level=level,
                       block_size=block_size, progress=task.advance, reuse=reuse, **kw)
    finally:
        if reuse is not None:
            reuse.close()
    task.done()
    if dropped:
        reporter.log("warn", f"{len(dropped)} xattrs SquashFS cannot store were dropped, e.g. {dropped[0]}")
    # said in the emit check's detail (the report), so a pipeline sees what a warm run saved
    w.reuse_note = (f"; {w.blocks_reused} of {w.blocks_written} compressed blocks reused from "
                    f"{reuse.images} earlier image{'s' if reuse.images > 1 else ''}") if w.blocks_reused else ""
    return w, reuse


def pipe_tar(cmd: list[str], entries: Iterable[Entry], dropped: list[str], reporter: Reporter, label: str,
             env: dict | None = None) -> tuple[int, int, str]:
    """Stream the entries as a tar into the stdin of `cmd` (tar2sqfs, mksquashfs -tar). Returns the
    entry count, the tool's exit status and what it said on stderr; `dropped` receives the xattrs
    SquashFS cannot store. On any exception (an interrupt included) the tool is killed and waited
    for before it passes on, so the tool never writes its output after the caller removed it."""
    from ..interrupts import held, reap

    n = 0
    proc = None
    with tempfile.TemporaryFile() as err:
        try:
            with held():        # an interrupt inside Popen, after the fork, would leave the tool unknown here
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env)
            widen_pipe(proc.stdin)
            try:
                n = _write_tar_to(_sqfs_entries(entries, dropped), proc.stdin, None, None, reporter, label)
                proc.stdin.close()
            except BrokenPipeError:
                pass            # the tool died: what it said tells why
            rc = proc.wait()
        except BaseException:
            if proc is not None:
                reap(proc)
            raise
        finally:
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        err.seek(0)
        return n, rc, err.read().decode(errors="replace").strip()


def write_squashfs(entries: Iterable[Entry], path: Path | str, compression: str = "gzip",
                   reporter: Reporter = NULL, level: int | None = None, block_size: int = BLOCK_SIZE,
                   force: bool = False, record_later: list | None = None, stats: dict | None = None) -> int:
    """Write the stream as a SquashFS image with hpcconv's own writer (gzip, zstd), or piped as a tar
    into tar2sqfs (or mksquashfs -tar). Returns the entry count. The image is recorded for block
    reuse at `path`; a caller that moves it elsewhere passes `record_later`, a list that receives a
    `record(final_path)` function to call once the image is there. `stats`, if given, receives
    "reuse": what block reuse saved, as a clause for a check's detail ("" if nothing)."""
    path = Path(path)
    dropped: list[str] = []
    if squashfs_builder(compression) == "hpcconv":
        with _atomic(path, force) as tmp:
            # no O_TRUNC (the temporary is new and empty): on ext4 a file truncated to 0 has all its
            # dirty pages pushed to the disk queue on close (auto_da_alloc), 0.2 s on this thread for
            # the benchmark image's 361 MB, for nothing (no fsync is asked)
            fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            try:
                w, reuse = write_squashfs_native(entries, fd, 0, compression, level, block_size, reporter,
                                                 f"writing {path.name}")
            finally:
                os.close(fd)
        if stats is not None:
            stats["reuse"] = w.reuse_note
        if reuse is not None:
            if record_later is not None:
                record_later.append(lambda final: reuse.save(final, 0, w))
            else:
                reuse.save(path, 0, w)
        return w.count
    with _atomic(path, force) as tmp:
        cmd = squashfs_command(tmp, compression, level, block_size)
        n, rc, msg = pipe_tar(cmd, entries, dropped, reporter, f"writing {path.name}")
        if rc != 0:
            tail = " / ".join(msg.splitlines()[-3:]) or f"exit status {rc}"
            if "No space left" in msg or ("I/O error" in msg and _nearly_full(path.parent)):
                # tar2sqfs reports ENOSPC as "I/O error" and removes its output, freeing the space
                raise OutputError(f"disk full while writing {path}", hint="free space or write the output elsewhere")
            raise OutputError(f"{os.path.basename(cmd[0])} failed writing {path}: {tail}")
        with open(tmp, "rb") as f:
            if f.read(4) != b"hsqs":
                raise OutputError(f"{os.path.basename(cmd[0])} did not write a SquashFS image")
    if dropped:
        reporter.log("warn", f"{len(dropped)} xattrs SquashFS cannot store were dropped, e.g. {dropped[0]}")
    return n


# directory ---------------------------------------------------------------------------------------------
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(path: str, what: str) -> list[str]:
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise UnsafeInput(f"{what} {path!r} is not a plain relative path")
    return parts


class _DirWriter:
    def __init__(self, root: Path, reporter: Reporter):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.is_root = os.geteuid() == 0
        self.dirs: list[tuple[tuple[str, ...], int, int, int, float]] = []
        self._cache: tuple[tuple[str, ...], int] | None = None
        self.reporter = reporter
        self.skipped_devices = 0

    def close(self) -> None:
        if self._cache:
            os.close(self._cache[1])
            self._cache = None
        os.close(self.root_fd)

    def _open_dir(self, parts: tuple[str, ...], create: bool, path: str) -> int:
        """A new fd for the directory `parts` below the root, never following a symlink."""
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(parts):
                bp = raw(p)                         # the layer's bytes whatever the locale
                try:
                    nfd = os.open(bp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise CorruptInput(f"entry {path!r}: {'/'.join(parts[:i + 1])} does not exist") from None
                    os.mkdir(bp, 0o755, dir_fd=fd)  # implicit parent, like tar
                    nfd = os.open(bp, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafeInput(f"entry {path!r} would be written through "
                                          f"{'/'.join(parts[:i + 1])!r}, which is a symlink or not a directory",
                                          hint="the image's layers are inconsistent or hostile") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def parent(self, parts: list[str], path: str) -> int:
        key = tuple(parts[:-1])
        if self._cache and self._cache[0] == key:
            return self._cache[1]
        fd = self._open_dir(key, True, path)
        if self._cache:
            os.close(self._cache[1])
        self._cache = (key, fd)
        return fd

    def _clear(self, name: bytes, pfd: int, e: Entry) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise CorruptInput(f"entry {e.path!r} ({e.type}) would replace a directory")
        os.unlink(name, dir_fd=pfd)

    def _owner(self, name_or_fd, e: Entry, pfd: int | None = None) -> None:
        if not self.is_root:
            return
        if isinstance(name_or_fd, int):
            os.fchown(name_or_fd, e.uid, e.gid)
        else:
            os.chown(name_or_fd, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)

    @staticmethod
    def _xattrs(fd: int, e: Entry) -> None:
        for k, v in e.xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(fd, k, v)

    def add(self, e: Entry) -> None:
        parts = _parts(e.path, "entry")
        pfd = self.parent(parts, e.path)
        name = raw(parts[-1])      # the layer's bytes whatever the locale (os would encode a str by it)
        if e.type == DIR:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=pfd)
                    os.mkdir(name, 0o700, dir_fd=pfd)
            if e.xattrs:
                fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
                try:
                    self._xattrs(fd, e)
                finally:
                    os.close(fd)
            self.dirs.append((tuple(parts), e.mode, e.uid, e.gid, e.mtime))
            return
        self._clear(name, pfd, e)
        if e.type == FILE:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=pfd)
            try:
                left = e.size
                while left > 0:
                    data = e.reader.read(min(CHUNK, left)) if e.reader is not None else b""
                    if not data:
                        raise CorruptInput(f"content of {e.path!r} ended {left} bytes early")
                    mv = memoryview(data)
                    while mv:
                        mv = mv[os.write(fd, mv):]
                    left -= len(data)
                self._owner(fd, e)
                os.fchmod(fd, e.mode & 0o7777)
                self._xattrs(fd, e)
                os.utime(fd, (e.mtime, e.mtime))
            finally:
                os.close(fd)
        elif e.type == SYMLINK:
            os.symlink(raw(e.linkname), name, dir_fd=pfd)
            self._owner(name, e, pfd)
            os.utime(name, (e.mtime, e.mtime), dir_fd=pfd, follow_symlinks=False)
        elif e.type == HARDLINK:
            tparts = _parts(e.linkname.lstrip("/"), f"hardlink target of {e.path!r}:")
            tfd = self._open_dir(tuple(tparts[:-1]), False, e.path)
            try:
                os.link(raw(tparts[-1]), name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise CorruptInput(f"hardlink {e.path!r} points to {e.linkname!r}, which does not exist") from None
            except PermissionError:
                raise UnsafeInput(f"hardlink {e.path!r} points to {e.linkname!r}, which cannot be linked") from None
            finally:
                os.close(tfd)
        elif e.type == FIFO:
            os.mkfifo(name, e.mode & 0o7777, dir_fd=pfd)
            self._owner(name, e, pfd)
            os.chmod(name, e.mode & 0o7777, dir_fd=pfd)
        elif e.type in (CHAR, BLOCK):
            if not self.is_root:
                self.skipped_devices += 1
                return
            kind = stat.S_IFCHR if e.type == CHAR else stat.S_IFBLK
            os.mknod(name, kind | (e.mode & 0o777), os.makedev(e.devmajor, e.devminor), dir_fd=pfd)
            self._owner(name, e, pfd)
            os.chmod(name, e.mode & 0o7777, dir_fd=pfd)
        else:
            raise CorruptInput(f"entry {e.path!r} has an unknown type {e.type!r}")

    def finish(self) -> None:
        if self._cache:
            os.close(self._cache[1])
            self._cache = None
        for parts, mode, uid, gid, mtime in reversed(self.dirs):
            fd = self._open_dir(parts, False, "/".join(parts))
            try:
                if self.is_root:
                    os.fchown(fd, uid, gid)
                os.fchmod(fd, mode & 0o7777)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
        os.fchmod(self.root_fd, 0o755)


def write_dir(entries: Iterable[Entry], out: Path | str, reporter: Reporter = NULL, force: bool = False) -> int:
    """Write the stream as a directory tree at `out` (safely; see the module docstring)."""
    out = Path(out)
    n = 0
    with _atomic(out, force, kind="dir") as tmp:
        w = _DirWriter(tmp, reporter)
        task = reporter.task(f"writing {out.name}")
        try:
            for e in entries:
                w.add(e)
                n += 1
                task.advance(e.size)
            w.finish()
        finally:
            w.close()
        task.done()
        if w.skipped_devices:
            reporter.log("warn", f"{w.skipped_devices} device nodes skipped (creating them needs root)")
    return n
