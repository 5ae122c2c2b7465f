"""SIF v1 writer (the Singularity/Apptainer image file) and the ELF architecture probe.

Byte layout as the Sylabs SIF library v2.8.3 reads and writes it (docs/reference/sif-and-apptainer.md
A.1-A.6); every integer little-endian, structures packed:

* global header, 128 bytes at 0: launch script (32), `SIF_MAGIC\\0`, version `01\\0`, primary arch
  code (`02\\0` = amd64), UUID (16 raw bytes), created/modified (int64 s), descriptors free/total
  (48 slots), descriptors offset (4096) and size (48 x 585), data offset (32176) and data size;
* the descriptor table at 4096, all 48 slots written, 585 bytes each (unused = zeros): data type,
  used, id (slot + 1), group id | 0xF0000000, linked id, offset, size, size with padding, times,
  uid/gid (0), name (128), extra (384: for a partition `int32 fstype, int32 parttype, [3]byte arch`);
* the data objects from 32176 on, in order, packed except the partition, which starts at the next
  4096-aligned absolute offset; `SizeWithPadding` counts the gap before an object; the file ends
  exactly at the end of the last object.

Streaming: the metadata objects are small and known before the root filesystem is built, so the
partition offset is known too. hpcconv's own SquashFS writer (emit/sqfs.py; gzip and zstd) then
writes the squashfs straight into the SIF file at its aligned offset from the entry stream, and the
header, descriptors and metadata objects are written into that prefix afterwards. No rootfs on disk,
no temporary squashfs, no second copy of the partition. It follows mksquashfs's time rules under
Apptainer: with `SOURCE_DATE_EPOCH` the filesystem time and the root directory get it and newer file
times are clamped to it; without, they get the current time. With HPCCONV_SQUASHFS_BUILDER=external
(and for xz, lz4, lzo) `mksquashfs - SIF -tar -o OFFSET` does the same from a tar of the stream on
its stdin (it zero-fills the bytes before the offset and reads `SOURCE_DATE_EPOCH` itself;
`tar2sqfs` cannot write at an offset).

Determinism: with `SOURCE_DATE_EPOCH` the UUID is nil and every header/descriptor time is that
epoch, so two conversions of the same image are byte-identical.
"""

from __future__ import annotations

import os
import struct
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..entries import FILE, HARDLINK, SYMLINK, Entry, provenance_of, reader_of
from ..errors import CorruptInput, UsageError
from ..progress import NULL, Reporter
from . import sinks

HEADER = struct.Struct("<32s10s3s3s16s8q")          # 128 bytes
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")  # 585 bytes
PART_EXTRA = struct.Struct("<ii3s")
assert HEADER.size == 128 and DESCRIPTOR.size == 585

LAUNCH_SCRIPT = b"#!/usr/bin/env run-singularity\n"
MAGIC = b"SIF_MAGIC\0"
VERSION = b"01\0"
DESCRIPTORS_OFFSET = 4096
DESCRIPTORS_TOTAL = 48
PARTITION_ALIGN = 4096
GROUP_MASK = 0xF0000000
GROUP_ID = 1                                        # Apptainer puts every object in group 1

DT_DEFFILE, DT_ENVVAR, DT_LABELS, DT_PARTITION = 0x4001, 0x4002, 0x4003, 0x4004
DT_SIGNATURE, DT_GENERIC_JSON, DT_GENERIC = 0x4005, 0x4006, 0x4007
FS_SQUASHFS = 1
PART_SYSTEM, PART_PRIMSYS, PART_DATA, PART_OVERLAY = 1, 2, 3, 4

# SIF architecture codes (pkg/sif/arch.go; 13 is newer than v2.8.3)
ARCH_CODES = {"386": "01", "amd64": "02", "arm": "03", "arm64": "04", "ppc64": "05", "ppc64le": "06",
              "mips": "07", "mipsle": "08", "mips64": "09", "mips64le": "10", "s390x": "11",
              "riscv64": "12", "loong64": "13"}
ARCH_NAMES = {v: k for k, v in ARCH_CODES.items()}


def arch_code(arch: str) -> bytes:
    return ARCH_CODES.get(arch, "00").encode() + b"\0"


# layout --------------------------------------------------------------------------------------------
@dataclass
class DataObject:
    datatype: int
    data: bytes = b""
    name: str = ""
    align: int = 0                   # 0 = packed
    extra: bytes = b""
    size: int | None = None          # for the partition: its length, known only once it is written

    @property
    def length(self) -> int:
        return len(self.data) if self.size is None else self.size


@dataclass
class Placed:
    obj: DataObject
    id: int
    offset: int
    padded: int                      # SizeWithPadding


def data_offset(total: int = DESCRIPTORS_TOTAL) -> int:
    return DESCRIPTORS_OFFSET + total * DESCRIPTOR.size


def place(objects: list[DataObject], total: int = DESCRIPTORS_TOTAL) -> list[Placed]:
    """Offsets as the SIF library's writer chooses them: appended in order, each start rounded up to
    its alignment (absolute file offset). An object whose size is not yet known must be last."""
    if len(objects) > total:
        raise ValueError("more objects than descriptor slots")
    end = data_offset(total)
    out = []
    for i, o in enumerate(objects):
        start = end if not o.align else -(-end // o.align) * o.align
        out.append(Placed(o, i + 1, start, start - end + o.length))
        end = start + o.length
    return out


def pack_header(placed: list[Placed], arch: bytes, uid: bytes, created: int, modified: int,
                total: int = DESCRIPTORS_TOTAL, launch: bytes = LAUNCH_SCRIPT) -> bytes:
    dsize = sum(p.padded for p in placed)
    return HEADER.pack(launch, MAGIC, VERSION, arch, uid, created, modified, total - len(placed), total,
                       DESCRIPTORS_OFFSET, total * DESCRIPTOR.size, data_offset(total), dsize)


def pack_descriptor(p: Placed, created: int, modified: int, group: int = GROUP_ID) -> bytes:
    name = p.obj.name.encode()
    if len(name) > 128 or len(p.obj.extra) > 384:
        raise ValueError(f"SIF descriptor name or extra too long: {p.obj.name!r}")
    return DESCRIPTOR.pack(p.obj.datatype, True, p.id, group | GROUP_MASK, 0, p.offset, p.obj.length,
                           p.padded, created, modified, 0, 0, name, p.obj.extra)


def partition_extra(arch: str, fstype: int = FS_SQUASHFS, parttype: int = PART_PRIMSYS) -> bytes:
    return PART_EXTRA.pack(fstype, parttype, arch_code(arch))


def pack_prefix(placed: list[Placed], arch: str, uid: bytes, created: int, modified: int,
                total: int = DESCRIPTORS_TOTAL) -> list[tuple[int, bytes]]:
    """(offset, bytes) pieces of everything except the partition's content."""
    pieces = [(0, pack_header(placed, arch_code(arch), uid, created, modified, total))]
    table = b"".join(pack_descriptor(p, created, modified) for p in placed)
    table += b"\0" * (DESCRIPTOR.size * (total - len(placed)))
    pieces.append((DESCRIPTORS_OFFSET, table))
    pieces += [(p.offset, p.obj.data) for p in placed if p.obj.size is None and p.obj.data]
    return pieces


# reading (our own self-check; the tests use the Sylabs siftool as the independent oracle) --------------
@dataclass
class SifDescriptor:
    datatype: int
    id: int
    group: int
    link: int
    offset: int
    size: int
    padded: int
    name: str
    extra: bytes


@dataclass
class SifFile:
    launch: bytes
    arch: str
    uuid: bytes
    created: int
    modified: int
    free: int
    total: int
    data_offset: int
    data_size: int
    descriptors: list[SifDescriptor] = field(default_factory=list)

    def primary(self) -> SifDescriptor | None:
        for d in self.descriptors:
            if d.datatype == DT_PARTITION and PART_EXTRA.unpack_from(d.extra)[1] == PART_PRIMSYS:
                return d
        return None


def read_sif(path: Path | str) -> SifFile:
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise CorruptInput(f"{path} is too short for a SIF header")
        launch, magic, ver, arch, uid, ctime, mtime, free, total, doff, dsize, dataoff, datasize = HEADER.unpack(head)
        if magic != MAGIC or ver != VERSION:
            raise CorruptInput(f"{path} is not a SIF v1 file")
        out = SifFile(launch.rstrip(b"\0"), ARCH_NAMES.get(arch[:2].decode(errors="replace"), "unknown"), uid,
                      ctime, mtime, free, total, dataoff, datasize)
        f.seek(doff)
        table = f.read(dsize)
    for i in range(total):
        dt, used, did, gid, lid, off, size, pad, _c, _m, _u, _g, name, extra = DESCRIPTOR.unpack_from(
            table, i * DESCRIPTOR.size)
        if used:
            out.descriptors.append(SifDescriptor(dt, did, gid & ~GROUP_MASK, lid, off, size, pad,
                                                 name.rstrip(b"\0").decode(errors="replace"), extra))
    return out


# architecture from the image's ELF binaries ---------------------------------------------------------
def elf_arch(head: bytes) -> str | None:
    """Go-style architecture name from the first 20 bytes of an ELF file, or None."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    from elftools.elf.enums import ENUM_E_MACHINE

    cls, data = head[4], head[5]
    machine = int.from_bytes(head[18:20], "little" if data == 1 else "big")
    names = {v: k for k, v in ENUM_E_MACHINE.items() if isinstance(v, int)}
    em = names.get(machine, "")
    le = data == 1
    if em == "EM_X86_64":
        return "amd64"
    if em == "EM_386":
        return "386"
    if em == "EM_AARCH64":
        return "arm64"
    if em == "EM_ARM":
        return "arm"
    if em == "EM_PPC64":
        return "ppc64le" if le else "ppc64"
    if em == "EM_S390" and cls == 2:
        return "s390x"
    if em == "EM_RISCV" and cls == 2:
        return "riscv64"
    if em == "EM_MIPS":
        return ("mips64" if cls == 2 else "mips") + ("le" if le else "")
    if machine == 258:  # EM_LOONGARCH
        return "loong64"
    return None


class _Peek:
    """Reader wrapper remembering the first bytes that pass through it."""

    def __init__(self, reader, n: int = 20):
        self._r, self._n = reader, n
        self.head = b""

    def read(self, n: int = -1) -> bytes:
        return self._seen(self._r.read(n))

    def read_view(self, n: int = -1):
        """As read, maybe a memoryview (entries.reader_of): the wrapped reader's."""
        return self._seen(reader_of(self._r)(n))

    def _seen(self, data):
        if len(self.head) < self._n and data:
            self.head += bytes(data[: self._n - len(self.head)])
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def provenance(self):
        """The wrapped reader's (see flatten._Named): the bytes pass unchanged."""
        return provenance_of(self._r)


class ArchProbe:
    """Stream transform that notes the ELF machine of every executable regular file as its content
    streams past (no extra read), and resolves `/bin/sh` through the image's symlinks at the end,
    as Apptainer's `machine.ArchFromContainer` does on the extracted rootfs."""

    def __init__(self):
        self.symlinks: dict[str, str] = {}
        self.hardlinks: dict[str, str] = {}
        self.elf: dict[str, str] = {}
        self._peeks: list[tuple[str, _Peek]] = []
        self.first: str | None = None

    def transform(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        for e in entries:
            if e.type == FILE and e.mode & 0o111 and e.size >= 20 and e.reader is not None:
                pk = _Peek(e.reader)
                e = e.with_(reader=pk)
                yield e
                self._note(e.path, pk.head)
                continue
            if e.type == SYMLINK:
                self.symlinks[e.path] = e.linkname
            elif e.type == HARDLINK:
                self.hardlinks[e.path] = e.linkname
            yield e

    def _note(self, path: str, head: bytes) -> None:
        a = elf_arch(head)
        if a:
            self.elf[path] = a
            if self.first is None:
                self.first = a

    def resolve(self, path: str, hops: int = 40) -> str | None:
        """Follow symlinks (absolute ones from the image root) component by component."""
        parts = [p for p in path.split("/") if p]
        done: list[str] = []
        while parts:
            p = parts.pop(0)
            if p == ".":
                continue
            if p == "..":
                if done:
                    done.pop()
                continue
            cur = "/".join(done + [p])
            if cur in self.symlinks:
                hops -= 1
                if hops < 0:
                    return None
                target = self.symlinks[cur]
                if target.startswith("/"):
                    done = []
                parts = [x for x in target.split("/") if x] + parts
                continue
            done.append(p)
        res = "/".join(done)
        return self.hardlinks.get(res, res)

    def arch(self) -> tuple[str | None, str]:
        """(arch, where it came from)."""
        sh = self.resolve("bin/sh")
        if sh and sh in self.elf:
            return self.elf[sh], f"ELF header of /bin/sh (/{sh})"
        if self.elf:
            arch, n = Counter(self.elf.values()).most_common(1)[0]
            return arch, f"ELF headers of {n} of {len(self.elf)} executables"
        return None, "no ELF executable in the image"


# writing -------------------------------------------------------------------------------------------
def epoch() -> int | None:
    v = os.environ.get("SOURCE_DATE_EPOCH")
    if v is None or v == "":
        return None
    if not v.isdigit() or int(v) >= 1 << 32:
        raise UsageError(f"SOURCE_DATE_EPOCH={v!r} is not a time in seconds since 1970",
                         hint="use a non-negative integer, e.g. $(git log -1 --format=%ct)")
    return int(v)


SIF_MKSQUASHFS_MEM = os.environ.get("HPCCONV_MKSQUASHFS_MEM", "160M")


def mksquashfs_command(out: Path, offset: int, compression: str, level: int | None, block_size: int) -> list[str]:
    exe = sinks._which("mksquashfs")
    if not exe or not sinks._mksquashfs_has_tar(exe):
        raise sinks.OutputError("mksquashfs with -tar (squashfs-tools >= 4.5) is needed to write a SIF",
                                hint="apt-get install squashfs-tools")
    if compression not in ("gzip", "zstd", "xz", "lz4", "lzo"):
        raise UsageError(f"unknown squashfs compression {compression!r}", hint="use gzip or zstd")
    jobs = str(sinks.cores())
    cmd = [exe, "-", str(out), "-tar", "-o", str(offset), "-noappend", "-no-progress", "-quiet",
           "-comp", compression, "-b", str(block_size), "-processors", jobs, "-root-mode", "0755",
           # mksquashfs sizes its caches to a quarter of RAM (6 GB here, 1.2 GB resident on a 1.2 GB
           # rootfs); 160M keeps it near 155 MB at the same speed (benchmarks/README.md)
           "-mem", SIF_MKSQUASHFS_MEM]
    if level is None:
        level = getattr(sinks, "SQFS_LEVELS", {}).get(compression)   # the measured defaults the other sinks use
    if level is not None:
        cmd += ["-Xcompression-level", str(level)]
    return cmd


def _squashfs_into(entries: Iterable[Entry], tmp: Path, offset: int, compression: str, level: int | None,
                   block_size: int, reporter: Reporter, label: str):
    """The partition at `offset` of `tmp`. Returns (entries, writer, BlockReuse): the last two are
    None with mksquashfs."""
    if sinks.squashfs_builder(compression) == "hpcconv":
        # hpcconv's own writer at the partition offset, with mksquashfs's time rules: the image and
        # root directory get SOURCE_DATE_EPOCH (else now), which also clamps newer file times
        when = epoch()
        now = when if when is not None else int(time.time())
        fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            w, reuse = sinks.write_squashfs_native(entries, fd, offset, compression, level, block_size,
                                                   reporter, f"writing {label}", mod_time=now, root_mtime=now,
                                                   clamp_mtime=when, flush_behind=True)   # (fsynced below)
            return w.count, w, reuse
        finally:
            os.close(fd)
    cmd = mksquashfs_command(tmp, offset, compression, level, block_size)
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)          # mksquashfs reads an empty value as 0
    when = epoch()
    if when is not None:
        env["SOURCE_DATE_EPOCH"] = str(when)
    dropped: list[str] = []
    n, rc, msg = sinks.pipe_tar(cmd, entries, dropped, reporter, f"writing {label}", env=env)
    if rc != 0:
        tail = " / ".join(msg.splitlines()[-3:]) or f"exit status {rc}"
        if "No space left" in msg:
            raise sinks.OutputError(f"disk full while writing {label}", hint="free space or write elsewhere")
        raise sinks.OutputError(f"mksquashfs failed writing {label}: {tail}")
    if dropped:
        reporter.log("warn", f"{len(dropped)} xattrs SquashFS cannot store were dropped, e.g. {dropped[0]}")
    return n, None, None


@dataclass
class SifResult:
    path: Path
    entries: int
    arch: str
    arch_source: str
    partition_offset: int
    partition_size: int
    objects: list[tuple[int, str, int, int]]   # (id, type name, offset, size)
    reuse_note: str = ""                       # what block reuse saved (emit/sinks.write_squashfs_native)


def write_sif(entries: Iterable[Entry], out: Path | str, objects: list[DataObject], *, fallback_arch: str,
              compression: str = "gzip", level: int | None = None, block_size: int = sinks.BLOCK_SIZE,
              force: bool = False, reporter: Reporter = NULL) -> SifResult:
    """Write a SIF: `objects` (deffile, JSON...) then the entry stream as the primary squashfs partition.

    The architecture code comes from the stream's ELF binaries (`/bin/sh` first), else `fallback_arch`."""
    out = Path(out)
    when = epoch()
    created = when if when is not None else int(time.time())
    uid = b"\0" * 16 if when is not None else uuidlib.uuid4().bytes
    part = DataObject(DT_PARTITION, name="", align=PARTITION_ALIGN, size=0)
    placed = place(list(objects) + [part])
    offset = placed[-1].offset
    probe = ArchProbe()
    with sinks._atomic(out, force) as tmp:
        n, writer, reuse = _squashfs_into(probe.transform(entries), tmp, offset, compression, level, block_size,
                                          reporter, out.name)
        size = os.path.getsize(tmp) - offset
        with open(tmp, "rb") as f:
            f.seek(offset)
            if size < 96 or f.read(4) != b"hsqs":
                raise sinks.OutputError("no SquashFS partition was written into the SIF")
        arch, where = probe.arch()
        if arch is None:
            arch, where = fallback_arch, f"image config ({where})"
        part.size = size
        part.extra = partition_extra(arch)
        placed = place(list(objects) + [part])
        assert placed[-1].offset == offset
        with open(tmp, "r+b") as f:
            for off, data in pack_prefix(placed, arch, uid, created, created):
                f.seek(off)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(out, 0o777 & ~umask)  # SIF files are executable (the launch script), as Apptainer makes them
    if reuse is not None:
        reuse.save(out, offset, writer)
    names = {DT_DEFFILE: "Def.FILE", DT_LABELS: "JSON.Labels", DT_GENERIC_JSON: "JSON.Generic",
             DT_PARTITION: "FS", DT_ENVVAR: "Env.Vars", DT_GENERIC: "Generic/Raw"}
    return SifResult(out, n, arch, where, offset, size,
                     [(p.id, names.get(p.obj.datatype, hex(p.obj.datatype)), p.offset, p.obj.length)
                      for p in placed], writer.reuse_note if writer is not None else "")
