"""MPI pass: which MPI the image carries, from library file names (sonames plus the helper libraries
that tell Open MPI from MPICH), and, when the profile injects the host MPI, the Sarus-style ABI check:
same family, soname major equal (else fail), host minor >= container minor (else warn; `strict`:
equal).

Families: ``libmpi.so.12``/``libmpich.so.12`` without ``libopen-pal`` = MPICH ABI (MPICH >= 3.1,
Intel MPI, MVAPICH2, ParaStation, Cray MPICH ABI); ``libmpi.so.40`` (+ ``libopen-pal``/``libopen-rte``
or ``libprrte``/``libpmix`` in 5.x) = Open MPI 3.0-5.0; ``libmpi.so.12`` *with* ``libopen-pal`` =
Open MPI 1.10 (same soname, incompatible); ``libmpi.so.20`` = Open MPI 2.x; ``libmpi_abi.so`` = the
MPI-5 standard ABI."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..entries import DIR, SYMLINK, Entry
from ..harness.checks import FAIL, PASS, SKIP, WARN, Checks
from .base import Pass

_LIB = re.compile(r"(^|/)(libmpi|libmpich|libmpi_abi|libopen-pal|libopen-rte|libprrte|libpmix)\.so\.(\d+(?:\.\d+)*)$")
# Open MPI series by libmpi.so.40 minor (spack's table in the reference notes)
OMPI_SERIES = {0: "3.0.x", 10: "3.1.x", 20: "4.0.x", 30: "4.1.x", 40: "5.0.x"}


@dataclass
class Found:
    family: str          # mpich-abi | openmpi | openmpi-1.10 | openmpi-2 | mpi-abi
    soname: str          # e.g. libmpi.so.12
    version: tuple[int, ...]   # full file version, e.g. (12, 1, 8)
    path: str
    implementation: str

    @property
    def major(self) -> int:
        return self.version[0]

    @property
    def minor(self) -> int:
        return self.version[1] if len(self.version) > 1 else 0


def _ver(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split("."))


class MpiPass(Pass):
    name = "mpi"

    def __init__(self):
        self.libs: dict[str, list[tuple[tuple[int, ...], str]]] = {}   # base name -> [(version, path)]

    def observe(self, entry: Entry, head):
        if entry.type == DIR or ".so." not in entry.path:
            return None                      # _LIB needs ".so." (a fast path)
        m = _LIB.search(entry.path)
        if m:
            v = _ver(m.group(3))
            if entry.type == SYMLINK:
                # libmpi.so.12 -> libmpich.so.12.2.2 (MPICH's alias): the target's full version counts
                t = _LIB.search("/" + entry.linkname.rsplit("/", 1)[-1])
                if t and t.group(2) in ("libmpi", "libmpich") and _ver(t.group(3))[0] == v[0]:
                    v = max(v, _ver(t.group(3)))
            self.libs.setdefault(m.group(2), []).append((v, entry.path))
        return None

    def _best(self, base: str, major: int | None = None):
        cands = [(v, p) for v, p in self.libs.get(base, []) if major is None or v[0] == major]
        return max(cands) if cands else None     # longest/highest file version: the real file

    def detect(self) -> list[Found]:
        out: list[Found] = []
        helpers = bool(self.libs.get("libopen-pal") or self.libs.get("libopen-rte"))
        majors = sorted({v[0] for v, _ in self.libs.get("libmpi", [])})
        for major in majors:
            v, p = self._best("libmpi", major)
            if major == 12 and helpers:
                out.append(Found("openmpi-1.10", "libmpi.so.12", v, p, "Open MPI 1.10"))
            elif major == 12:
                out.append(Found("mpich-abi", "libmpi.so.12", v, p, "MPICH-ABI MPI"))
            elif major == 40:
                series = OMPI_SERIES.get(v[1] if len(v) > 1 else -1)
                if self.libs.get("libprrte") or any(vv[0] == 80 for vv, _ in self.libs.get("libopen-pal", [])):
                    series = series or "5.0.x"
                out.append(Found("openmpi", "libmpi.so.40", v, p, f"Open MPI {series or '3.0-5.0'}"))
            elif major == 20:
                out.append(Found("openmpi-2", "libmpi.so.20", v, p, "Open MPI 2.x"))
            else:
                out.append(Found(f"unknown-{major}", f"libmpi.so.{major}", v, p, f"libmpi.so.{major}"))
        if not any(f.family == "mpich-abi" for f in out) and self._best("libmpich", 12) and not helpers:
            v, p = self._best("libmpich", 12)
            out.append(Found("mpich-abi", "libmpich.so.12", v, p, "MPICH"))
        if self._best("libmpi_abi"):
            v, p = self._best("libmpi_abi")
            out.append(Found("mpi-abi", f"libmpi_abi.so.{v[0]}", v, p, "MPI standard ABI"))
        return out

    def facts(self) -> dict:
        return {"found": [{"family": f.family, "soname": f.soname, "version": ".".join(map(str, f.version)),
                           "implementation": f.implementation, "path": "/" + f.path} for f in self.detect()]}

    def finish(self, profile) -> Checks:
        c = Checks()
        found = self.detect()
        desc = "; ".join(f"{f.implementation} (/{f.path}, {f.soname} version {'.'.join(map(str, f.version))})"
                         for f in found)
        if not found:
            if profile is not None and profile.mpi.mode == "host":
                c.add(self.stage, "mpi.detect", SKIP,
                      "no shared MPI library in the image: nothing for the host MPI to replace (an MPI linked "
                      "statically cannot be swapped)")
            else:
                c.add(self.stage, "mpi.detect", SKIP, "no shared MPI library in the image")
            return c
        families = {f.family for f in found}
        if len(families) > 1:
            c.add(self.stage, "mpi.detect", WARN,
                  f"more than one MPI family in the image: {desc}; host-MPI injection (Sarus, Shifter) needs "
                  "exactly one libmpi family in the loader cache: remove the other")
        else:
            c.add(self.stage, "mpi.detect", PASS, desc)
        if profile is None or profile.mpi.mode != "host":
            return c
        host_fam = profile.mpi.family
        host_abi = profile.mpi.abi
        host_v = _ver(host_abi) if host_abi else None
        where = ", ".join(profile.mpi.lib_dirs)
        impl = profile.mpi.implementation or host_fam
        want = {"mpich-abi": "libmpi.so.12", "openmpi": "libmpi.so.40", "mpi-abi": "libmpi_abi.so"}[host_fam]
        match = [f for f in found if f.family == host_fam]
        if not match:
            f = found[0]
            extra = (" (libmpi.so.12 here comes with libopen-pal: it is Open MPI 1.10, not the MPICH ABI)"
                     if f.family == "openmpi-1.10" else "")
            fix = {"mpich-abi": "rebuild the application against an MPICH-ABI MPI (MPICH >= 3.1, Intel MPI, "
                                "MVAPICH2) so the site's host MPI can replace it",
                   "openmpi": "rebuild the application against Open MPI 3.0-5.0 (libmpi.so.40)",
                   "mpi-abi": "rebuild against an MPI with the MPI-5 standard ABI"}[host_fam]
            c.add(self.stage, "mpi.abi", FAIL,
                  f"the image has {f.implementation} ({f.soname}){extra}; the site injects its host MPI "
                  f"({impl}, {want}): the ABIs differ and the application would not load; {fix}, or use a "
                  "profile with mpi.mode = 'container'")
            return c
        f = max(match, key=lambda x: x.version)
        if host_v is None:
            c.add(self.stage, "mpi.abi", PASS,
                  f"{f.soname} in the image, host {impl} is the same family (host soname version unknown); "
                  f"host MPI is bound at {where}")
        elif host_v[0] != f.major and f.family != "mpi-abi":
            c.add(self.stage, "mpi.abi", FAIL,
                  f"soname majors differ: image {f.soname} vs host .so.{host_v[0]} ({impl}); rebuild against "
                  f"an MPI with the host's soname")
        elif len(host_v) < 2:
            c.add(self.stage, "mpi.abi", PASS,
                  f"image {f.soname} (version {'.'.join(map(str, f.version))}) matches the host's major "
                  f"({impl}; host minor unknown, so newer container minors are not checked); host MPI is bound "
                  f"at {where}, searched first by the loader")
        else:
            hmin, cmin = host_v[1], f.minor
            rule = profile.mpi.compat
            if (rule == "strict" and hmin != cmin) or (rule == "full" and hmin < cmin):
                status = FAIL if rule == "strict" else WARN
                c.add(self.stage, "mpi.abi", status,
                      f"host {impl} is .so.{host_abi}, the image's {f.soname} is minor {cmin}: the host MPI is "
                      f"older than the container's (partial ABI compatibility, Sarus '{rule}' rule); build the "
                      f"image against an MPI no newer than the host's (minor <= {hmin})")
            else:
                c.add(self.stage, "mpi.abi", PASS,
                      f"image {f.soname} version {'.'.join(map(str, f.version))}, host .so.{host_abi} ({impl}): "
                      f"compatible ({rule} rule); host MPI is bound at {where}, searched first by the loader")
        return c
