"""``hpcconv launcher``: an ``sbatch`` script that runs a converted image with a profile's binds,
host MPI and environment.

* binds: ``site.binds`` and ``mpi.binds`` as given (``HOST[:CONTAINER][:ro|rw]``), each
  ``site.mountpoints`` directory at the same path, and for host MPI (``mpi.mode = "host"``) each
  ``mpi.lib_dirs`` target bound from a host directory the job sets (``HOST_MPI_LIB_DIR_1``,
  ``HOST_MPI_LIB_DIR_2`` ...: the site's MPI ``lib`` and its dependency directory); NVIDIA GPUs:
  ``/usr/local/nvidia/lib64`` and ``/usr/local/nvidia/bin`` from the host driver directories
  (``--nv`` for Apptainer, which finds them itself);
* Charliecloud: ``ch-run -b SRC:DST`` (ch-run needs the target to exist: hpcconv's conversion with
  the same profile created them), ``--set-env`` (the image's ``/ch/environment``) and
  ``--set-env=K=V`` for ``mpi.env``, ``interconnect.env`` and ``site.env``;
* Apptainer/Singularity: ``exec --bind SRC:DST[:ro]`` (one per bind) and ``--env K=V``;
* Shifter: ``#SBATCH --image=`` plus ``--volume=SRC:DST`` (Shifter's volume flags ``:ro`` dropped:
  read-only is its default for site-defined volumes; ``:rw`` is ``:perNodeCache`` only, so it is
  noted) and the environment exported before ``srun`` (Shifter passes the caller's environment);
* ``srun --mpi=P`` with the profile's first ``mpi.pmi`` (pmix, pmi2, cray_shasta).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

RUNTIMES = ("charliecloud", "singularity", "apptainer", "shifter")


@dataclass
class Bind:
    src: str
    dst: str
    mode: str = ""     # "", "ro" or "rw"
    why: str = ""

    @classmethod
    def parse(cls, spec: str, why: str) -> "Bind":
        parts = spec.split(":")
        mode = ""
        if parts[-1] in ("ro", "rw") and len(parts) > 1:
            mode = parts.pop()
        src = parts[0]
        dst = parts[1] if len(parts) > 1 else src
        return cls(src, dst, mode, why)


def binds(profile) -> list[Bind]:
    out: list[Bind] = []
    for spec in profile.site.binds:
        out.append(Bind.parse(spec, "site.binds"))
    for d in profile.site.mountpoints:
        if not any(b.dst == d for b in out):
            out.append(Bind(d, d, "", "site.mountpoints"))
    for spec in profile.mpi.binds:
        out.append(Bind.parse(spec, "mpi.binds"))
    if profile.mpi.mode == "host":
        for i, d in enumerate(profile.mpi.lib_dirs, 1):
            out.append(Bind(f"${{HOST_MPI_LIB_DIR_{i}}}", d, "ro", "mpi.lib_dirs"))
    return out


def environment(profile) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in (profile.interconnect.env, profile.mpi.env, profile.site.env):
        env.update(src)
    return env


def _q(s: str) -> str:
    """Quote a word but leave ${VAR} references to the job's shell."""
    if s.startswith("${") and s.count("}") == 1 and s.endswith("}"):
        return f'"{s}"'
    return shlex.quote(s)


def script(runtime: str, profile, image: str, command: list[str], job_name: str = "hpcconv",
           nodes: int = 1, ntasks_per_node: int = 1, time_limit: str = "01:00:00",
           account: str | None = None, partition: str | None = None) -> str:
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}", hint="charliecloud, singularity or shifter")
    low = image.lower()
    if runtime == "charliecloud" and low.endswith((".sif", ".tar", ".tar.gz", ".tgz", ".tar.zst")):
        raise UsageError(f"ch-run cannot run {image} as it is",
                         hint="convert with --target charliecloud --format squashfs (or dir); for a tarball: ch-convert it first")
    if runtime == "shifter" and not image.startswith(("id:", "docker:", "custom:")):
        raise UsageError(f"Shifter runs images by id, not by path: {image}",
                         hint="give the --target shifter output directory or its .squashfs (the id is taken from it), "
                              "or id:ID")
    bs = binds(profile)
    env = environment(profile)
    pmi = profile.mpi.pmi[0] if profile.mpi.pmi else None
    srun = ["srun" + (f" --mpi={pmi}" if pmi else "")]
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job_name}",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={ntasks_per_node}",
             f"#SBATCH --time={time_limit}"]
    if account:
        lines.append(f"#SBATCH --account={account}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if runtime == "shifter":
        lines.append(f"#SBATCH --image={image}")
    lines += ["#",
              f"# Written by hpcconv launcher for profile {profile.name}"
              + (f" ({profile.site.name})" if profile.site.name else "") + f", runtime {runtime}.",
              f"# Binds ({len(bs)}): " + (", ".join(f"{b.src}:{b.dst} [{b.why}]" for b in bs) or "none"),
              "set -euo pipefail", ""]
    if profile.mpi.mode == "host":
        lines += [f"# Host MPI ({profile.mpi.family}, libmpi.so.{profile.mpi.abi or '?'}{', ' + profile.mpi.implementation if profile.mpi.implementation else ''}):",
                  "# point these at the site MPI's library directory and its dependencies (e.g. after `module load`).",
                  "# The image was prepared by hpcconv with the same profile: it searches these targets first."]
        for i, d in enumerate(profile.mpi.lib_dirs, 1):
            lines.append(f": \"${{HOST_MPI_LIB_DIR_{i}:?set HOST_MPI_LIB_DIR_{i} to the host directory bound at {d}}}\"")
        lines.append("")
    lines.append(f"IMAGE={shlex.quote(image)}")
    lines.append("")
    cmd = " ".join(shlex.quote(c) for c in command) if command else '"$@"'
    if runtime == "charliecloud":
        opts = [f"-b {_q(b.src)}:{_q(b.dst)}" for b in bs]
        opts.append("--set-env")
        opts += [f"--set-env={shlex.quote(f'{k}={v}')}" for k, v in env.items()]
        if profile.gpu.vendor == "nvidia":
            lines.append("# NVIDIA driver: bind the host's driver libraries and tools at the targets the image expects")
            lines.append(': "${NVIDIA_HOST_LIB_DIR:=/usr/lib64}" "${NVIDIA_HOST_BIN_DIR:=/usr/bin}"')
            opts += ['-b "${NVIDIA_HOST_LIB_DIR}":/usr/local/nvidia/lib64', '-b "${NVIDIA_HOST_BIN_DIR}":/usr/local/nvidia/bin']
        run = [*srun, "ch-run", *opts, '"${IMAGE}"', "--", cmd]
    elif runtime in ("singularity", "apptainer"):
        exe = "apptainer" if runtime == "apptainer" else "singularity"
        opts = [f"--bind {_q(b.src)}:{_q(b.dst)}" + (f":{b.mode}" if b.mode else "") for b in bs]
        opts += [f"--env {shlex.quote(f'{k}={v}')}" for k, v in env.items()]
        if profile.gpu.vendor == "nvidia":
            opts.append("--nv")
        elif profile.gpu.vendor == "amd":
            opts.append("--rocm")
        run = [*srun, exe, "exec", *opts, '"${IMAGE}"', cmd]
    else:
        for k, v in env.items():
            lines.append(f"export {k}={shlex.quote(v)}")
        if env:
            lines.append("")
        opts = [f"--volume={_q(b.src)}:{_q(b.dst)}" for b in bs]
        if any(b.mode == "rw" for b in bs):
            lines.append("# note: Shifter user volumes are read-write unless the site configures otherwise")
        run = [*srun, f"shifter --image={shlex.quote(image)}", *opts, cmd]
    lines.append(" \\\n    ".join(run))
    return "\n".join(lines) + "\n"


def default_image_ref(runtime: str, image: str) -> str:
    if runtime == "shifter":
        p = Path(image)
        if p.suffix in (".squashfs", ".meta"):
            return f"id:{p.stem}"
        if p.is_dir():
            sq = sorted(p.glob("*.squashfs"))
            if len(sq) == 1:
                return f"id:{sq[0].stem}"
    return image
