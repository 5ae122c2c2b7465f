"""Streaming ELF facts: what the passes need from an ELF file, read while its bytes flow by once.

From the head (first bytes): the ELF header and program headers. While streaming: the note segments
(ISA-level GNU property, ABI tag), the interpreter, the dynamic segment, a bounded prefix that holds
``.dynstr`` in every common layout (for ``DT_NEEDED``/``DT_SONAME``), and, when asked, a scan of
executable segments for VEX/EVEX-encoded instructions (AVX/AVX2/FMA vs AVX-512). Memory per file is
bounded by the caps below, whatever the file's size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE, PT_GNU_PROPERTY = 1, 2, 3, 4, 0x6474E553
PF_X = 1
DT_NEEDED, DT_STRTAB, DT_SONAME, DT_STRSZ, DT_RPATH, DT_RUNPATH = 1, 5, 14, 10, 15, 29
NT_GNU_ABI_TAG, NT_GNU_PROPERTY_TYPE_0 = 1, 5
GNU_PROPERTY_X86_ISA_1_USED = 0xC0010002
GNU_PROPERTY_X86_ISA_1_NEEDED = 0xC0008002
X86_ISA_BITS = {1: "baseline", 2: "v2", 4: "v3", 8: "v4"}

EM_NAMES = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 20: "ppc", 21: "ppc64", 22: "s390",
            243: "riscv", 8: "mips", 2: "sparc", 43: "sparcv9", 258: "loongarch"}
ET_NAMES = {1: "rel", 2: "exec", 3: "dyn", 4: "core"}

PREFIX_CAP = 1 << 20        # bytes of the file start kept for .dynstr / version sections
SEGMENT_CAP = 64 * 1024     # per captured note/interp/dynamic segment


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC and len(head) >= 52


@dataclass
class IsaScan:
    """Counts of instruction encodings seen in executable segments (a heuristic, see x86scan)."""

    bytes_scanned: int = 0
    vex: int = 0            # VEX (C4/C5) encodings: AVX, AVX2, FMA, BMI -> x86-64-v3
    evex: int = 0           # EVEX (62) encodings: AVX-512 -> x86-64-v4
    vex_clusters: int = 0
    evex_clusters: int = 0
    pending: object = field(default=None, repr=False, compare=False)   # the scan's Future (x86scan)

    def wait(self) -> None:
        """Let a scan still running on the worker thread finish (its errors are raised here)."""
        if self.pending is not None:
            fut, self.pending = self.pending, None
            fut.result()


@dataclass
class ElfInfo:
    path: str
    elf_class: int = 0             # 32 or 64
    little_endian: bool = True
    machine: int = 0
    etype: int = 0
    interp: str | None = None
    soname: str | None = None
    needed: list[str] = field(default_factory=list)
    rpath: str | None = None        # DT_RPATH (searched before LD_LIBRARY_PATH, ignored when DT_RUNPATH is set)
    runpath: str | None = None      # DT_RUNPATH
    dynamic_resolved: bool = False  # needed/soname could be read
    isa_needed: int | None = None   # GNU_PROPERTY_X86_ISA_1_NEEDED bitmask
    isa_used: int | None = None
    abi_tag: tuple[int, tuple[int, int, int]] | None = None   # (os, (major, minor, patch))
    isa_scan: IsaScan | None = None
    complete: bool = True
    error: str | None = None

    @property
    def machine_name(self) -> str:
        return EM_NAMES.get(self.machine, f"machine {self.machine}")

    @property
    def kind(self) -> str:
        return ET_NAMES.get(self.etype, "unknown")

    @property
    def isa_level_needed(self) -> int | None:
        """Highest x86-64 level in the ISA_1_NEEDED note: 1 (baseline) .. 4, or None without a note."""
        if not self.isa_needed:
            return None
        return max((i + 1 for i in range(4) if self.isa_needed & (1 << i)), default=None)


class ElfScanner:
    """A runner scanner: parse from the head, capture bounded ranges while streaming, report at close."""

    def __init__(self, entry, head: bytes, done, scan_instructions: bool = False):
        self.entry, self._done = entry, done
        self.info = ElfInfo(entry.path)
        self._ranges: list[tuple[str, int, int]] = []     # (what, start, end) to capture
        self._note_align: dict[int, int] = {}               # note segment offset -> p_align
        self._captured: dict[tuple[str, int], bytearray] = {}
        self._exec: list[tuple[int, int]] = []
        self._x86 = None
        self._loads: list[tuple[int, int, int, int]] = []  # (vaddr, offset, filesz, flags)
        try:
            self._parse_header(head)
        except (struct.error, ValueError) as e:
            self.info.error = f"bad ELF header: {e}"
            self._ranges = []
        if scan_instructions and self.info.machine == 62 and self._exec and not _dispatching(entry.path):
            from .x86scan import DeferredScanner

            self.info.isa_scan = IsaScan()
            self._x86 = DeferredScanner(self.info.isa_scan)

    def _parse_header(self, h: bytes) -> None:
        cls, data = h[4], h[5]
        if cls not in (1, 2) or data not in (1, 2):
            raise ValueError("unknown class or data encoding")
        self.info.elf_class = 32 if cls == 1 else 64
        self.info.little_endian = data == 1
        e = "<" if data == 1 else ">"
        self._e = e
        if cls == 2:
            etype, machine, _v, _entry, phoff, _shoff, _fl, _ehs, phentsize, phnum = struct.unpack_from(
                e + "HHIQQQIHHH", h, 16)
        else:
            etype, machine, _v, _entry, phoff, _shoff, _fl, _ehs, phentsize, phnum = struct.unpack_from(
                e + "HHIIIIIHHH", h, 16)
        self.info.etype, self.info.machine = etype, machine
        if phnum == 0 or phoff + phnum * phentsize > len(h):
            return  # no program headers in the head (object files, odd layouts): header facts only
        first_load = None
        for i in range(phnum):
            o = phoff + i * phentsize
            if cls == 2:
                ptype, flags, off, vaddr, _pa, filesz, _memsz, align = struct.unpack_from(e + "IIQQQQQQ", h, o)
            else:
                ptype, off, vaddr, _pa, filesz, _memsz, flags, align = struct.unpack_from(e + "IIIIIIII", h, o)
            if ptype == PT_LOAD:
                self._loads.append((vaddr, off, filesz, flags))
                if first_load is None:
                    first_load = (off, filesz)
                if flags & PF_X and filesz:
                    self._exec.append((off, off + filesz))
            elif ptype in (PT_NOTE, PT_GNU_PROPERTY, PT_INTERP, PT_DYNAMIC) and filesz:
                name = {PT_NOTE: "note", PT_GNU_PROPERTY: "note", PT_INTERP: "interp", PT_DYNAMIC: "dynamic"}[ptype]
                if name == "note":
                    self._note_align[off] = 8 if align == 8 else 4
                self._ranges.append((name, off, off + min(filesz, SEGMENT_CAP)))
        if first_load is not None and first_load[0] == 0:
            self._ranges.append(("prefix", 0, min(first_load[1], PREFIX_CAP)))
        # one range per (what, start): PT_GNU_PROPERTY repeats a PT_NOTE; keep the longer
        merged: dict[tuple[str, int], int] = {}
        for what, a, b in self._ranges:
            merged[(what, a)] = max(b, merged.get((what, a), b))
        self._ranges = [(w, a, b) for (w, a), b in merged.items()]

    # Scanner interface --------------------------------------------------------------------------
    def feed(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for what, a, b in self._ranges:
            if a < end and b > offset:
                buf = self._captured.setdefault((what, a), bytearray())
                lo, hi = max(a, offset), min(b, end)
                if a + len(buf) == lo:   # contiguous (always, since bytes arrive in order)
                    buf += data[lo - offset:hi - offset]
        if self._x86 is not None:
            for a, b in self._exec:
                if a < end and b > offset:
                    lo, hi = max(a, offset), min(b, end)
                    self._x86.feed(lo, data[lo - offset:hi - offset])

    def close(self, complete: bool) -> None:
        self.info.complete = complete
        try:
            self._finish()
        except (struct.error, ValueError, IndexError) as e:
            self.info.error = f"bad ELF structure: {e}"
        if self._x86 is not None:
            self._x86.close()
        self._done(self.entry, self.info)

    # parsing captured pieces ---------------------------------------------------------------------
    def _finish(self) -> None:
        e = self._e if hasattr(self, "_e") else "<"
        prefix = bytes(self._captured.get(("prefix", 0), b""))
        for (what, a), buf in self._captured.items():
            if what == "note":
                self._notes(bytes(buf), e, self._note_align.get(a, 4))
            elif what == "interp":
                self.info.interp = bytes(buf).split(b"\0", 1)[0].decode("utf-8", "replace")
        dyn = next((bytes(b) for (w, _), b in self._captured.items() if w == "dynamic"), None)
        if dyn is not None:
            self._dynamic(dyn, prefix, e)

    def _notes(self, buf: bytes, e: str, seg_align: int) -> None:
        """Notes of one segment; name and descriptor are padded to the segment's alignment (4 or 8)."""
        o = 0
        pad = seg_align
        prop_align = 8 if self.info.elf_class == 64 else 4
        while o + 12 <= len(buf):
            namesz, descsz, ntype = struct.unpack_from(e + "III", buf, o)
            name = buf[o + 12:o + 12 + namesz]
            # the name is padded to 4; the descriptor starts at the segment's alignment (binutils' layout)
            doff = o + 12 + ((namesz + 3) & ~3)
            doff = (doff + pad - 1) & ~(pad - 1)
            desc = buf[doff:doff + descsz]
            if name == b"GNU\0" and ntype == NT_GNU_ABI_TAG and len(desc) >= 16:
                os_, a, b, c = struct.unpack_from(e + "IIII", desc)
                self.info.abi_tag = (os_, (a, b, c))
            elif name == b"GNU\0" and ntype == NT_GNU_PROPERTY_TYPE_0:
                self._properties(desc, e, prop_align)
            o = doff + ((descsz + pad - 1) & ~(pad - 1))

    def _properties(self, desc: bytes, e: str, align: int) -> None:
        o = 0
        while o + 8 <= len(desc):
            ptype, datasz = struct.unpack_from(e + "II", desc, o)
            data = desc[o + 8:o + 8 + datasz]
            if ptype == GNU_PROPERTY_X86_ISA_1_NEEDED and datasz >= 4:
                self.info.isa_needed = struct.unpack_from(e + "I", data)[0]
            elif ptype == GNU_PROPERTY_X86_ISA_1_USED and datasz >= 4:
                self.info.isa_used = struct.unpack_from(e + "I", data)[0]
            o += 8 + ((datasz + align - 1) & ~(align - 1))

    def _vaddr_to_offset(self, vaddr: int) -> int | None:
        for va, off, filesz, _fl in self._loads:
            if va <= vaddr < va + filesz:
                return off + (vaddr - va)
        return None

    def _dynamic(self, dyn: bytes, prefix: bytes, e: str) -> None:
        fmt, size = (e + "qQ", 16) if self.info.elf_class == 64 else (e + "iI", 8)
        needed_off, soname_off, strtab = [], None, None
        paths: dict[int, int] = {}
        for o in range(0, len(dyn) - size + 1, size):
            tag, val = struct.unpack_from(fmt, dyn, o)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                needed_off.append(val)
            elif tag == DT_SONAME:
                soname_off = val
            elif tag == DT_STRTAB:
                strtab = val
            elif tag in (DT_RPATH, DT_RUNPATH):
                paths[tag] = val
        if strtab is None:
            self.info.dynamic_resolved = not needed_off and soname_off is None
            return
        base = self._vaddr_to_offset(strtab)
        if base is None:
            return

        def s(off: int) -> str | None:
            a = base + off
            if a >= len(prefix):
                return None
            z = prefix.find(b"\0", a)
            return prefix[a:z if z >= 0 else len(prefix)].decode("utf-8", "replace")

        names = [s(o) for o in needed_off]
        so = s(soname_off) if soname_off is not None else None
        if None in names or (soname_off is not None and so is None):
            return
        self.info.needed = names  # type: ignore[assignment]
        self.info.soname = so
        self.info.rpath = s(paths[DT_RPATH]) if DT_RPATH in paths else None
        self.info.runpath = s(paths[DT_RUNPATH]) if DT_RUNPATH in paths else None
        self.info.dynamic_resolved = True


# Libraries known to carry AVX/AVX-512 code paths chosen at run time (ifunc, cpu dispatch): an
# instruction scan of them says nothing about what the image needs.
_DISPATCHING = ("libc.so", "libc-", "libm.so", "libm-", "libmvec", "ld-linux", "libopenblas", "libblas",
                "liblapack", "libmkl_", "libfftw3", "libcrypto", "libssl", "libz.so", "libz-ng", "libstdc++",
                "libgcc_s", "libcuda", "libcublas", "libcudnn", "libnccl", "libamdhip", "librocblas",
                "libgomp", "libpython", "libnumpy", "libisal", "libzstd", "liblzma", "libsimd", "libgmp",
                "libhwy", "libjpeg", "libpng", "libavcodec", "libdnnl", "libtorch", "libtbb")


def _dispatching(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith(_DISPATCHING) or "/glibc-hwcaps/" in f"/{path}"
