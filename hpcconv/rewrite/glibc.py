"""glibc pass: the C library in the image (glibc version, or musl), the minimum kernel its ELF ABI
notes ask for against the site's host kernel, and, where the profile injects host libraries (host MPI,
NVIDIA driver libraries), whether the image's glibc is at least what those host libraries need."""

from __future__ import annotations

import re

from ..entries import FILE, HARDLINK, SYMLINK, Entry
from ..harness.checks import FAIL, PASS, SKIP, WARN, Checks
from .base import Pass, Scanner

_LIBC_NAME = re.compile(r"(^|/)libc-(2\.\d+)\.so$")
_LIBC6 = re.compile(r"(^|/)(usr/)?lib(64|32)?(/[^/]+-linux-gnu[^/]*)?/libc\.so\.6$")
_MUSL = re.compile(r"(^|/)ld-musl-[^/]+\.so\.1$")
_BANNER = re.compile(rb"GNU C Library \(([^)\n]*)\) [^\n]{0,40}?version (2\.\d+)")
_BANNER_LIMIT = 200


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


class BannerScanner(Scanner):
    """Streams a libc.so.6 looking for the 'GNU C Library (...) ... version 2.N' string, keeping only a
    small overlap between chunks."""

    def __init__(self):
        self._tail = b""
        self.version: str | None = None
        self.build: str | None = None

    def feed(self, offset: int, data: bytes) -> None:
        if self.version:
            return
        buf = self._tail + data
        m = _BANNER.search(buf)
        if m:
            self.build, self.version = m.group(1).decode("utf-8", "replace"), m.group(2).decode()
            self._tail = b""
        else:
            self._tail = buf[-_BANNER_LIMIT:]


class GlibcPass(Pass):
    name = "glibc"

    def __init__(self):
        self.from_names: set[str] = set()
        self.banners: list[BannerScanner] = []
        self.musl: list[str] = []
        self.min_kernel: tuple[int, int, int] | None = None
        self.min_kernel_from: str | None = None
        self.has_libc6 = False

    def observe(self, entry: Entry, head) -> Scanner | None:
        p = entry.path
        if ".so" not in p:
            return None                      # every name pattern here needs it (a fast path)
        m = _LIBC_NAME.search(p)
        if m:
            self.from_names.add(m.group(2))
        if entry.type == SYMLINK and _LIBC6.search(p):
            self.has_libc6 = True
            t = _LIBC_NAME.search(entry.linkname)
            if t:
                self.from_names.add(t.group(2))
        if _MUSL.search(p):
            self.musl.append(p)
        if entry.type in (FILE, HARDLINK) and _LIBC6.search(p):
            self.has_libc6 = True
            if entry.type == FILE and head is not None:
                s = BannerScanner()
                self.banners.append(s)
                return s
        return None

    def observe_elf(self, entry: Entry, elf) -> None:
        if elf.abi_tag and elf.abi_tag[0] == 0:   # Linux
            k = elf.abi_tag[1]
            if self.min_kernel is None or k > self.min_kernel:
                self.min_kernel, self.min_kernel_from = k, entry.path

    @property
    def version(self) -> str | None:
        vs = {s.version for s in self.banners if s.version} | self.from_names
        return max(vs, key=vtuple) if vs else None

    def facts(self) -> dict:
        v = self.version
        return {"libc": "glibc" if v or self.has_libc6 else ("musl" if self.musl else None), "version": v,
                "min_kernel": ".".join(map(str, self.min_kernel)) if self.min_kernel else None}

    def finish(self, profile) -> Checks:
        c = Checks()
        v = self.version
        if v:
            builds = sorted({s.build for s in self.banners if s.build})
            c.add(self.stage, "glibc.version", PASS, f"glibc {v}" + (f" ({builds[0]})" if builds else ""))
        elif self.musl:
            c.add(self.stage, "glibc.version", PASS, f"musl libc (/{self.musl[0]}), not glibc")
        elif self.has_libc6:
            c.add(self.stage, "glibc.version", WARN, "libc.so.6 present but its version was not found")
        else:
            c.add(self.stage, "glibc.version", SKIP, "no C library in the image (static binaries only?)")
        # minimum kernel --------------------------------------------------------------------------
        if self.min_kernel:
            need = ".".join(map(str, self.min_kernel))
            host = profile.host.kernel if profile else None
            if profile is None:
                c.add(self.stage, "glibc.kernel", PASS, f"needs Linux >= {need} (ABI note of /{self.min_kernel_from})")
            elif host is None:
                c.add(self.stage, "glibc.kernel", SKIP,
                      f"needs Linux >= {need}; the site's kernel is unknown (host.kernel in profile {profile.name})")
            elif (vtuple(host) + (0, 0, 0))[:3] < self.min_kernel:
                c.add(self.stage, "glibc.kernel", FAIL,
                      f"/{self.min_kernel_from} needs Linux >= {need} (ELF ABI note), the site runs {host}: "
                      f"programs stop with 'FATAL: kernel too old'; use a base image whose glibc supports "
                      f"kernel {host}")
            else:
                c.add(self.stage, "glibc.kernel", PASS, f"needs Linux >= {need}, the site runs {host}")
        # host-library injection --------------------------------------------------------------------
        if profile is not None:
            injects = []
            if profile.mpi.mode == "host":
                injects.append("host MPI")
            if profile.gpu.vendor == "nvidia":
                injects.append("NVIDIA driver libraries")
            if injects:
                what = " and ".join(injects)
                need = profile.host.container_glibc_min
                if self.musl and not v:
                    c.add(self.stage, "glibc.injection", FAIL,
                          f"the site injects {what}, built against glibc; this image uses musl and cannot load "
                          "them: use a glibc-based image (Debian, Ubuntu, Rocky)")
                elif need is None:
                    c.add(self.stage, "glibc.injection", SKIP,
                          f"the site injects {what}; the glibc they need is unknown (host.glibc / "
                          f"host.container_glibc_min in profile {profile.name})")
                elif v is None:
                    c.add(self.stage, "glibc.injection", WARN,
                          f"the site injects {what} needing glibc >= {need}; the image's glibc version is unknown")
                elif vtuple(v) < vtuple(need):
                    c.add(self.stage, "glibc.injection", FAIL,
                          f"the site injects {what} needing glibc >= {need}; the image has glibc {v}: use a newer "
                          f"base image (glibc >= {need})")
                else:
                    c.add(self.stage, "glibc.injection", PASS,
                          f"image glibc {v} >= {need}, what the injected {what} need")
        return c
