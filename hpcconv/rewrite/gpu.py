"""GPU pass: the CUDA runtime in the image (``libcudart.so.X.Y[.Z]`` file names, CUDA compat libraries)
against the site's NVIDIA driver (NVIDIA's minimum-driver table, minor-version and forward
compatibility), driver libraries that must not be baked into the image, and ROCm (``libamdhip64``
sonames) against the site's ROCm release (+-2 releases)."""

from __future__ import annotations

import re

from ..entries import DIR, Entry
from ..harness.checks import FAIL, PASS, SKIP, WARN, Checks
from .base import Pass

# CUDA (major, minor) -> Linux x86_64 driver of the GA toolkit (NVIDIA CUDA toolkit release notes,
# Table 3; 13.2 from secondary copies, 13.3 a single secondary source). Updates within a minor may need a
# slightly newer driver (e.g. 12.4 Update 1: 550.54.15).
TOOLKIT_DRIVER = {
    (10, 0): "410.48", (10, 1): "418.39", (10, 2): "440.33",
    (11, 0): "450.51.05", (11, 1): "455.23", (11, 2): "460.27.03", (11, 3): "465.19.01", (11, 4): "470.42.01",
    (11, 5): "495.29.05", (11, 6): "510.39.01", (11, 7): "515.43.04", (11, 8): "520.61.05",
    (12, 0): "525.60.13", (12, 1): "530.30.02", (12, 2): "535.54.03", (12, 3): "545.23.06", (12, 4): "550.54.14",
    (12, 5): "555.42.02", (12, 6): "560.28.03", (12, 8): "570.26", (12, 9): "575.51.03",
    (13, 0): "580.65.06", (13, 1): "590.44.01", (13, 2): "595.45.04", (13, 3): "610.43.02",
}
# CUDA major -> lowest driver for minor-version compatibility (none before CUDA 11)
MINOR_COMPAT_MIN = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

_VERSION_JSON = re.compile(r"(^|/)usr/local/cuda[^/]*/version\.json$")
_VERSION_TXT = re.compile(r"(^|/)usr/local/cuda[^/]*/version\.txt$")
_CUDART = re.compile(r"(^|/)libcudart\.so\.(\d+)\.(\d+)(?:\.(\d+))?$")
_COMPAT = re.compile(r"(^|/)compat/libcuda\.so\.(\d+(?:\.\d+)+)$")
_DRIVER_LIB = re.compile(r"(^|/)(libcuda|libnvidia-ml|libnvidia-ptxjitcompiler)\.so\.(\d+\.\d+(?:\.\d+)?)$")
_HIP = re.compile(r"(^|/)libamdhip64\.so\.(\d+)(?:\.(\d+))?(?:\.\d+)*$")
_ROCM_DIR = re.compile(r"(^|/)opt/rocm-(\d+\.\d+(?:\.\d+)?)(/|$)")


def _v(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split("."))


def _where(path: str) -> str:
    return path if path.startswith(("/", "image ")) else "/" + path


def driver_ok(host: str, need: str) -> bool:
    """host >= need, comparing only as many components as the host gives (a profile may say '550')."""
    h = _v(host)
    return h >= _v(need)[:len(h)]


def _cuda_tuple(s: str) -> tuple[int, int, int] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", s.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


class GpuPass(Pass):
    """``config_env``: the image config's Env (``KEY=VALUE`` strings); CUDA_VERSION there (set by
    nvidia/cuda base images) is the most reliable probe, then version.json/.txt, then libcudart names."""

    name = "gpu"

    def __init__(self, config_env: list[str] | None = None):
        self.declared: list[tuple[tuple[int, int, int], str]] = []     # from env and version files
        for kv in config_env or []:
            k, _, v = kv.partition("=")
            if k == "CUDA_VERSION" and _cuda_tuple(v):
                self.declared.append((_cuda_tuple(v), "image env CUDA_VERSION"))
        self.cudart: list[tuple[tuple[int, int, int], str]] = []
        self.compat: list[tuple[str, str]] = []
        self.driver_libs: list[str] = []
        self.hip: list[tuple[tuple[int, int], str]] = []
        self.rocm_dirs: set[str] = set()

    def observe(self, entry: Entry, head):
        if entry.type == DIR:
            m = _ROCM_DIR.search(entry.path + "/") if "opt/rocm-" in entry.path else None
            if m:
                self.rocm_dirs.add(m.group(2))
            return None
        p = entry.path
        if head is not None and entry.size and len(head) >= entry.size and "usr/local/cuda" in p:
            if _VERSION_JSON.search(p):
                import json

                try:
                    v = _cuda_tuple(str(json.loads(head)["cuda"]["version"]))
                except (ValueError, KeyError, TypeError):
                    v = None
                if v:
                    self.declared.append((v, f"/{p}"))
            elif _VERSION_TXT.search(p):
                m = re.search(rb"CUDA Version (\d+\.\d+(?:\.\d+)?)", head)
                if m:
                    self.declared.append((_cuda_tuple(m.group(1).decode()), f"/{p}"))
        if ".so." not in p and "opt/rocm-" not in p:
            return None                      # every pattern below needs one of the two (a fast path)
        m = _CUDART.search(p)
        if m:
            self.cudart.append(((int(m.group(2)), int(m.group(3)), int(m.group(4) or 0)), p))
        m = _COMPAT.search(p)
        if m:
            self.compat.append((m.group(2), p))
        elif _DRIVER_LIB.search(p):
            self.driver_libs.append(p)
        m = _HIP.search(p)
        if m:
            self.hip.append(((int(m.group(2)), int(m.group(3) or 0)), p))
        m = _ROCM_DIR.search(p)
        if m:
            self.rocm_dirs.add(m.group(2))
        return None

    def cuda_version(self) -> tuple[tuple[int, int, int], str] | None:
        """(version, where it was found): declared (env, version files) first, else the newest libcudart."""
        if self.declared:
            return self.declared[0]
        return max(self.cudart) if self.cudart else None

    def facts(self) -> dict:
        cuda = self.cuda_version()
        return {"cuda": ".".join(map(str, cuda[0])) if cuda else None,
                "cuda_compat": sorted(v for v, _ in self.compat),
                "rocm": max(self.rocm_dirs, key=_v) if self.rocm_dirs else None,
                "hip_soname_major": max(self.hip)[0][0] if self.hip else None,
                "driver_libs": ["/" + p for p in self.driver_libs]}

    def finish(self, profile) -> Checks:
        c = Checks()
        cuda = self.cuda_version()
        vendor = profile.gpu.vendor if profile else None
        if self.driver_libs:
            c.add(self.stage, "gpu.driver-libs", WARN if vendor == "nvidia" or profile is None else PASS,
                  f"NVIDIA driver libraries are baked into the image (/{', /'.join(self.driver_libs[:3])}): the "
                  "runtime injects the host's, and a stale copy here breaks them; remove them from the image")
        if cuda:
            (maj, mnr, patch), path = cuda
            ver = f"{maj}.{mnr}" + (f".{patch}" if patch else "")
            if profile is None:
                c.add(self.stage, "gpu.cuda", PASS, f"CUDA runtime {ver} ({_where(path)})")
            elif vendor != "nvidia":
                c.add(self.stage, "gpu.cuda", WARN,
                      f"the image carries a CUDA runtime {ver} ({_where(path)}) but the site has no NVIDIA GPU "
                      f"(gpu.vendor = {vendor})")
            else:
                c.items.append(self._cuda_check(maj, mnr, ver, path, profile))
        if self.hip or self.rocm_dirs:
            c.items.append(self._rocm_check(profile, vendor))
        if not c.items:
            c.add(self.stage, "gpu.detect", SKIP, "no CUDA or ROCm runtime in the image")
        return c

    def _cuda_check(self, maj: int, mnr: int, ver: str, path: str, profile):
        from ..harness.checks import Check

        host = profile.gpu.driver
        need = TOOLKIT_DRIVER.get((maj, mnr))
        mk = lambda status, detail: Check(self.stage, "gpu.cuda", status, detail)  # noqa: E731
        if host is None:
            return mk(SKIP, f"CUDA {ver} ({_where(path)}) needs driver >= {need or 'unknown'}; the site's driver is "
                            f"unknown (gpu.driver in profile {profile.name}): check /proc/driver/nvidia/version")
        if need is None:
            return mk(WARN, f"CUDA {ver} ({_where(path)}) is not in the driver table; site driver {host}")
        if driver_ok(host, need):
            return mk(PASS, f"CUDA {ver} needs driver >= {need}, the site has {host}")
        floor = MINOR_COMPAT_MIN.get(maj)
        if floor and driver_ok(host, floor):
            return mk(WARN, f"CUDA {ver} needs driver >= {need} for full support; the site's {host} runs it only "
                            f"through minor-version compatibility (CUDA {maj}.x, driver >= {floor}): a limited feature "
                            "set, and JIT of newer PTX fails (cudaErrorUnsupportedPtxVersion); to be safe use a CUDA "
                            f"base image whose toolkit driver is <= {host}")
        host_major = _v(host)[0]
        fwd = [(cv, p) for cv, p in self.compat if _v(cv)[0] > host_major]
        if fwd and profile.gpu.gpu_class == "datacenter":
            cv, p = max(fwd)
            return mk(WARN, f"CUDA {ver} needs driver >= {need}, the site has {host}; the image ships CUDA forward "
                            f"compatibility libraries (/{p}, driver {cv}), which work on datacenter GPUs when the "
                            "compat directory comes first in the loader path")
        best = max(((k, d) for k, d in TOOLKIT_DRIVER.items() if driver_ok(host, d)), default=None)
        hint = (f"rebuild on a CUDA {best[0][0]}.{best[0][1]} (or older) base image" if best else
                "the site's driver is older than any CUDA this table knows")
        return mk(FAIL, f"CUDA {ver} ({_where(path)}) needs driver >= {need}"
                        + (f" (or >= {floor} with minor-version compatibility)" if floor else "")
                        + f"; the site's driver is {host}: the runtime fails with 'driver too old'; {hint}")

    def _rocm_check(self, profile, vendor):
        from ..harness.checks import Check

        ver = None
        if self.rocm_dirs:
            ver = max(self.rocm_dirs, key=_v)
        hip = max(self.hip) if self.hip else None
        what = f"ROCm {ver}" if ver else f"HIP runtime libamdhip64.so.{hip[0][0]} (ROCm {hip[0][0]}.x)"
        mk = lambda status, detail: Check(self.stage, "gpu.rocm", status, detail)  # noqa: E731
        if profile is None:
            return mk(PASS, what)
        if vendor != "amd":
            return mk(WARN, f"the image carries {what} but the site has no AMD GPU (gpu.vendor = {vendor})")
        host = profile.gpu.rocm
        if host is None:
            return mk(SKIP, f"{what} in the image; the site's ROCm/driver release is unknown (gpu.rocm in profile "
                            f"{profile.name})")
        hv = _v(host)
        iv = _v(ver) if ver else (hip[0][0],)
        if iv[0] != hv[0] and not ver:
            return mk(FAIL, f"{what} vs site ROCm {host}: different major releases")
        if ver and len(iv) > 1 and len(hv) > 1:
            # +-2 releases, counted within one major release (across majors: see the AMD matrix)
            if iv[0] != hv[0] or abs(iv[1] - hv[1]) > 2:
                return mk(FAIL, f"{what} in the image, the site's driver goes with ROCm {host}: ROCm supports "
                                "kernel driver and user space only within +-2 releases; rebuild on a ROCm "
                                f"{hv[0]}.{max(hv[1] - 2, 0)}-{hv[0]}.{hv[1] + 2} base image")
        return mk(PASS, f"{what} in the image, site ROCm {host}: within +-2 releases")
