"""Fabric pass: which interconnect user space the image carries (PSM2, rdma-core verbs and providers,
UCX with its IB transport, libfabric and its providers, built in or as plug-ins, libcxi), against the
profile's interconnect; warns, with the fix, when MPI in the image would silently fall back to TCP."""

from __future__ import annotations

import re

from ..entries import DIR, Entry
from ..harness.checks import PASS, WARN, Checks
from .base import Pass

_PATTERNS = {
    "psm2": re.compile(r"(^|/)libpsm2\.so\.2(\.|$)"),
    "ibverbs": re.compile(r"(^|/)libibverbs\.so\.1(\.|$)"),
    "rdmacm": re.compile(r"(^|/)librdmacm\.so\.1(\.|$)"),
    "ucx": re.compile(r"(^|/)libucp\.so\.0(\.|$)"),
    "ucx_ib": re.compile(r"(^|/)ucx/libuct_ib\.so\.0(\.|$)"),
    "libfabric": re.compile(r"(^|/)libfabric\.so\.1(\.|$)"),
    "cxi": re.compile(r"(^|/)libcxi\.so\.1(\.|$)"),
    "ompi_psm2": re.compile(r"(^|/)openmpi\d*/mca_mtl_psm2\.so$"),
    "ompi_ofi": re.compile(r"(^|/)openmpi\d*/mca_mtl_ofi\.so$"),
    "ompi_ucx": re.compile(r"(^|/)openmpi\d*/mca_pml_ucx\.so$"),
    "ompi_openib": re.compile(r"(^|/)openmpi\d*/mca_btl_openib\.so$"),
    # any Open MPI network component as a DSO: components are built as plug-ins, so a missing one is missing
    "ompi_dso": re.compile(r"(^|/)openmpi\d*/mca_(mtl|pml|btl)_\w+\.so$"),
}
_VERBS_PROVIDER = re.compile(r"(^|/)libibverbs/lib([\w-]+?)-rdmav(\d+)\.so$")
_VERBS_DRIVER = re.compile(r"(^|/)etc/libibverbs\.d/([\w-]+)\.driver$")
_FI_PROVIDER = re.compile(r"(^|/)libfabric/lib([\w-]+?)-fi\.so$")
# libfabric built-in providers inferred from DT_NEEDED of libfabric.so.1
_FI_NEEDED = {"libpsm2.so.2": "psm2", "libcxi.so.1": "cxi", "libibverbs.so.1": "verbs", "libefa.so.1": "efa",
              "libpsm3.so": "psm3"}
# rdma-core providers for the HCAs found at the sites of the reference notes
_IB_PROVIDERS = {"mlx5", "mlx4"}


class FabricPass(Pass):
    name = "fabric"

    def __init__(self):
        self.have: dict[str, str] = {}             # kind -> first path
        self.verbs_providers: set[str] = set()
        self.verbs_drivers: set[str] = set()
        self.fi_providers: dict[str, str] = {}     # provider -> how it was found

    def observe(self, entry: Entry, head):
        if entry.type == DIR:
            return None
        p = entry.path
        if ".so" not in p and not p.endswith(".driver"):
            return None                      # every pattern below needs one of the two (a fast path)
        for kind, rx in _PATTERNS.items():
            if rx.search(p):
                self.have.setdefault(kind, p)
        m = _VERBS_PROVIDER.search(p)
        if m:
            self.verbs_providers.add(m.group(2))
        m = _VERBS_DRIVER.search(p)
        if m:
            self.verbs_drivers.add(m.group(2))
        m = _FI_PROVIDER.search(p)
        if m:
            self.fi_providers.setdefault(m.group(2), f"plug-in /{p}")
        return None

    def observe_elf(self, entry: Entry, elf) -> None:
        if _PATTERNS["libfabric"].search(entry.path) and elf.dynamic_resolved:
            for lib in elf.needed:
                prov = _FI_NEEDED.get(lib)
                if prov:
                    self.fi_providers.setdefault(prov, f"built into /{entry.path} (needs {lib})")

    def summary(self) -> str:
        parts = []
        if "psm2" in self.have:
            parts.append("PSM2")
        if "ibverbs" in self.have:
            parts.append("verbs" + (f" ({', '.join(sorted(self.verbs_providers))})" if self.verbs_providers else
                                    " (no providers)"))
        if "ucx" in self.have:
            parts.append("UCX" + (" with IB transport" if "ucx_ib" in self.have else " without IB transport"))
        if "libfabric" in self.have:
            parts.append("libfabric" + (f" [{', '.join(sorted(self.fi_providers))}]" if self.fi_providers else ""))
        if "cxi" in self.have:
            parts.append("libcxi")
        return ", ".join(parts) or "no high-speed fabric libraries (TCP only)"

    def facts(self) -> dict:
        return {"summary": self.summary(), "psm2": "psm2" in self.have, "ibverbs": "ibverbs" in self.have,
                "verbs_providers": sorted(self.verbs_providers), "ucx": "ucx" in self.have,
                "ucx_ib": "ucx_ib" in self.have, "libfabric": "libfabric" in self.have,
                "libfabric_providers": sorted(self.fi_providers), "libcxi": "cxi" in self.have}

    def finish(self, profile) -> Checks:
        c = Checks()
        found = self.summary()
        fabric = profile.interconnect.type if profile else None
        if fabric is None:
            c.add(self.stage, "fabric.detect", PASS, found)
            return c
        if fabric in ("none", "tcp"):
            c.add(self.stage, "fabric.support", PASS, f"site fabric is {fabric}; image has {found}")
            return c
        host_mpi = profile.mpi.mode == "host"
        if fabric == "omnipath":
            ok = "psm2" in self.have or {"psm2", "opx"} & set(self.fi_providers)
            if ok and "ompi_dso" in self.have and not {"ompi_psm2", "ompi_ofi"} & set(self.have):
                c.add(self.stage, "fabric.support", WARN,
                      f"the image has Omni-Path libraries ({found}) but its Open MPI has no psm2 or ofi MTL "
                      "component (mca_mtl_psm2.so / mca_mtl_ofi.so): it will use TCP; rebuild Open MPI with "
                      "--with-psm2 or --with-ofi")
            elif ok:
                c.add(self.stage, "fabric.support", PASS, f"Omni-Path user space in the image: {found}")
            else:
                # also with host-MPI injection: the notes' recipe is libpsm2 in the image + host Intel MPI
                who = "the injected host MPI's psm2 provider" if host_mpi else "MPI"
                c.add(self.stage, "fabric.support", WARN,
                      f"the site runs Omni-Path but the image has no PSM2 or libfabric psm2/opx ({found}): {who} "
                      "will silently fall back to TCP (5-20x slower); install libpsm2 (Debian/Ubuntu: libpsm2-2, "
                      "RHEL: libpsm2) and a libfabric with the psm2 provider, and set FI_PROVIDER=psm2 (Open MPI: "
                      "OMPI_MCA_pml=cm OMPI_MCA_mtl=psm2)")
        elif fabric == "infiniband":
            providers = self.verbs_providers & _IB_PROVIDERS
            transport = "ucx_ib" in self.have or "verbs" in self.fi_providers
            ompi_ib = not ("ompi_dso" in self.have and not {"ompi_ucx", "ompi_openib", "ompi_ofi"} & set(self.have))
            if "ibverbs" in self.have and providers and transport and not ompi_ib:
                c.add(self.stage, "fabric.support", WARN,
                      f"the image has InfiniBand libraries ({found}) but its Open MPI has no UCX, openib or ofi "
                      "component (mca_pml_ucx.so ...): it will use TCP; rebuild Open MPI with --with-ucx")
            elif "ibverbs" in self.have and providers and transport:
                c.add(self.stage, "fabric.support", PASS, f"InfiniBand user space in the image: {found}")
            elif host_mpi:
                c.add(self.stage, "fabric.support", PASS,
                      f"image has {found}; the injected host MPI brings its own InfiniBand stack")
            else:
                missing = []
                if "ibverbs" not in self.have:
                    missing.append("libibverbs (rdma-core)")
                if not providers:
                    missing.append("an mlx5 verbs provider (Debian/Ubuntu: ibverbs-providers, RHEL: libibverbs)")
                if not transport:
                    missing.append("UCX with its IB transport (ucx/libuct_ib.so.0) or libfabric with verbs")
                c.add(self.stage, "fabric.support", WARN,
                      f"the site runs InfiniBand but the image lacks {'; '.join(missing)} (has: {found}): MPI will "
                      "silently fall back to TCP; install them (Open MPI 5 reaches IB only through UCX: "
                      "OMPI_MCA_pml=ucx)")
        elif fabric == "slingshot":
            if "cxi" in self.fi_providers:
                c.add(self.stage, "fabric.support", PASS, f"libfabric with the cxi provider in the image: {found}")
            elif host_mpi:
                c.add(self.stage, "fabric.support", PASS,
                      f"image has {found}; the injected host MPI brings the host libfabric/cxi stack")
            else:
                c.add(self.stage, "fabric.support", WARN,
                      f"the site runs Slingshot-11 but the image's libfabric has no cxi provider ({found}): MPI will "
                      "fall back to TCP (about 10x slower); bind the host libfabric and libcxi.so.1 into the image "
                      "(e.g. the CSCS Container Engine cxi hook), or build libfabric against the host's libcxi; "
                      "keep the job's SLINGSHOT_* variables")
        env = {**profile.interconnect.env}
        if env:
            c.add(self.stage, "fabric.env", PASS, " ".join(f"{k}={v}" for k, v in sorted(env.items())))
        return c
