"""ELF pass: machine/class of every executable and shared object against the profile's CPU, and for
x86-64 the ISA level the image needs (GNU property notes: enforced by glibc >= 2.33, so a fail), the
glibc-hwcaps directories it ships (level-specific builds with fallbacks: fine), and an instruction
scan for AVX2/AVX-512 encodings (a warning: libraries often dispatch at run time)."""

from __future__ import annotations

import re

from ..entries import Entry
from ..harness.checks import FAIL, PASS, SKIP, WARN, Checks
from .base import Pass
from .x86scan import probable_level

ARCH_MACHINE = {"x86_64": (62, 64), "aarch64": (183, 64)}
# foreign but usually harmless companions (multilib): warn instead of fail
COMPANIONS = {"x86_64": {3}, "aarch64": {40}}
_HWCAPS = re.compile(r"(^|/)glibc-hwcaps/(x86-64-v[234])/")
MAX_LISTED = 5


def _listing(paths: list[str]) -> str:
    more = f" and {len(paths) - MAX_LISTED} more" if len(paths) > MAX_LISTED else ""
    return ", ".join("/" + p for p in paths[:MAX_LISTED]) + more


class ElfPass(Pass):
    name = "elf"
    scan_instructions = True

    def __init__(self):
        self.machines: dict[str, list[str]] = {}       # machine name -> paths
        self.machine_nums: dict[str, int] = {}
        self.needed: dict[int, list[str]] = {}          # ISA level from notes -> paths
        self._probable: dict[int, list[str]] = {}       # level from the scan -> paths
        self._scans: list = []                          # (path, IsaScan) whose scan may still run
        self.hwcaps: set[str] = set()
        self.count = 0

    def observe(self, entry: Entry, head):
        m = _HWCAPS.search(entry.path) if "glibc-hwcaps/" in entry.path else None
        if m:
            self.hwcaps.add(m.group(2))
        return None

    def observe_elf(self, entry: Entry, elf) -> None:
        if elf.kind not in ("exec", "dyn") or elf.error:
            return
        self.count += 1
        key = f"{elf.machine_name}/{elf.elf_class}"
        self.machines.setdefault(key, []).append(entry.path)
        self.machine_nums[key] = elf.machine
        lvl = elf.isa_level_needed
        if lvl and lvl > 1:
            self.needed.setdefault(lvl, []).append(entry.path)
        if elf.isa_scan is not None:
            self._scans.append((entry.path, elf.isa_scan))

    @property
    def probable(self) -> dict[int, list[str]]:
        """Level from the instruction scan -> paths. The scans run on a worker thread (x86scan):
        their verdicts are taken here, when the report needs them."""
        for path, scan in self._scans:
            p = probable_level(scan)
            if p > 1:
                self._probable.setdefault(p, []).append(path)
        self._scans = []
        return self._probable

    def facts(self) -> dict:
        return {"elf_files": self.count,
                "machines": {k: len(v) for k, v in sorted(self.machines.items())},
                "isa_needed": f"x86-64-v{max(self.needed)}" if self.needed else None,
                "isa_probable": f"x86-64-v{max(self.probable)}" if self.probable else None,
                "hwcaps": sorted(self.hwcaps)}

    def finish(self, profile) -> Checks:
        c = Checks()
        if not self.count:
            c.add(self.stage, "elf.machine", SKIP, "no ELF executables or shared objects in the image")
            return c
        found = ", ".join(f"{k} ({len(v)})" for k, v in sorted(self.machines.items(), key=lambda kv: -len(kv[1])))
        arch = profile.cpu.arch if profile else None
        if arch is None:
            c.add(self.stage, "elf.machine", PASS, f"{self.count} ELF files: {found}")
        else:
            want_m, want_cls = ARCH_MACHINE[arch]
            foreign = {k: v for k, v in self.machines.items()
                       if not (self.machine_nums[k] == want_m and k.endswith(f"/{want_cls}"))}
            hard = {k: v for k, v in foreign.items() if self.machine_nums[k] not in COMPANIONS[arch]}
            if hard:
                paths = [p for v in hard.values() for p in v]
                c.add(self.stage, "elf.machine", FAIL,
                      f"{len(paths)} ELF files are built for {', '.join(sorted(hard))}, the site runs {arch}: "
                      f"{_listing(paths)}; rebuild the image for {arch} (e.g. --platform linux/{profile.oci_arch})")
            elif foreign:
                paths = [p for v in foreign.values() for p in v]
                c.add(self.stage, "elf.machine", WARN,
                      f"{len(paths)} ELF files are {', '.join(sorted(foreign))} (32-bit companions of {arch}): "
                      f"{_listing(paths)}; they run only if the site allows 32-bit code")
            else:
                c.add(self.stage, "elf.machine", PASS, f"{self.count} ELF files, all {arch}")
        if arch not in (None, "x86_64") and not self.needed and not self.probable:
            return c
        site_level = profile.cpu.level_num if profile else None
        if self.needed:
            top = max(self.needed)
            paths = self.needed[top]
            if site_level is not None and top > site_level:
                c.add(self.stage, "elf.isa-needed", FAIL,
                      f"{len(paths)} files are marked as needing x86-64-v{top} (GNU property note), the site CPU is "
                      f"x86-64-v{site_level}; glibc refuses to load them: {_listing(paths)}; rebuild with "
                      f"-march=x86-64-v{site_level} (or lower)")
            else:
                c.add(self.stage, "elf.isa-needed", PASS,
                      f"highest ISA level in GNU property notes: x86-64-v{top} ({_listing(paths)})")
        if self.hwcaps:
            c.add(self.stage, "elf.hwcaps", PASS,
                  "image ships glibc-hwcaps builds for " + ", ".join(sorted(self.hwcaps))
                  + " with baseline fallbacks; the loader picks what the CPU supports")
        if self.probable:
            top = max(self.probable)
            paths = self.probable[top]
            what = "AVX-512 (EVEX)" if top == 4 else "AVX/AVX2/FMA (VEX)"
            if site_level is not None and top > site_level:
                c.add(self.stage, "elf.isa-scan", WARN,
                      f"{len(paths)} files contain {what} instructions (x86-64-v{top}), the site CPU is "
                      f"x86-64-v{site_level}: {_listing(paths)}; unless they check the CPU at run time they will "
                      f"crash with SIGILL: rebuild with -march=x86-64-v{site_level} or for the site's CPU "
                      f"({profile.cpu.target or 'see profile'})")
            else:
                c.add(self.stage, "elf.isa-scan", PASS,
                      f"vector instructions up to x86-64-v{top} ({what}) in {_listing(paths)}")
        elif site_level is not None and arch == "x86_64":
            c.add(self.stage, "elf.isa-scan", PASS, "no AVX/AVX-512 code found outside run-time dispatching libraries")
        return c
