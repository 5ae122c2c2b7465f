"""Plain-text renderings of `inspect` facts and `check` verdicts (the CLI prints them; --json prints
the data itself). Plain unwrapped lines: details hold paths and commands to copy."""

from __future__ import annotations

MARK = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


def inside_lines(facts: dict) -> list[str]:
    """`inspect`: what is inside, from PassRunner.facts()."""
    elf, glibc, mpi = facts.get("elf", {}), facts.get("glibc", {}), facts.get("mpi", {})
    fabric, gpu = facts.get("fabric", {}), facts.get("gpu", {})
    out = []
    machines = elf.get("machines") or {}
    arch = ", ".join(f"{k} ({n} files)" for k, n in machines.items()) or "no ELF files"
    out.append(f"arch: {arch}")
    isa = []
    if elf.get("isa_needed"):
        isa.append(f"needs {elf['isa_needed']} (GNU property notes)")
    if elf.get("isa_probable"):
        isa.append(f"instructions up to {elf['isa_probable']} (scan)")
    if elf.get("hwcaps"):
        isa.append("glibc-hwcaps builds for " + ", ".join(elf["hwcaps"]))
    if any(k.startswith("x86_64") for k in machines):
        out.append("ISA level: " + ("; ".join(isa) or "x86-64 baseline (v1)"))
    libc = glibc.get("libc")
    if libc == "glibc":
        out.append(f"libc: glibc {glibc.get('version') or '(version unknown)'}"
                   + (f", needs Linux >= {glibc['min_kernel']}" if glibc.get("min_kernel") else ""))
    else:
        out.append(f"libc: {libc or 'none found'}")
    found = mpi.get("found") or []
    out.append("MPI: " + ("; ".join(f"{f['implementation']} ({f['soname']} {f['version']}, {f['path']})" for f in found)
                          or "none (no shared libmpi)"))
    out.append(f"fabrics: {fabric.get('summary', 'unknown')}")
    g = []
    if gpu.get("cuda"):
        g.append(f"CUDA {gpu['cuda']}" + (f" (forward-compat libraries {', '.join(gpu['cuda_compat'])})"
                                          if gpu.get("cuda_compat") else ""))
    if gpu.get("rocm") or gpu.get("hip_soname_major"):
        g.append(f"ROCm {gpu.get('rocm') or str(gpu['hip_soname_major']) + '.x (HIP soname)'}")
    if gpu.get("driver_libs"):
        g.append("baked-in NVIDIA driver libraries: " + ", ".join(gpu["driver_libs"][:3]))
    out.append("GPU: " + ("; ".join(g) or "no CUDA or ROCm runtime"))
    return out


def check_lines(checks, profile: str, verdict: str) -> list[str]:
    """`check --profile P`: one line per check, then the verdict."""
    out = []
    for c in checks.items:
        out.append(f"{MARK.get(c.status, c.status.upper())}  {c.name}: {c.detail}")
    word = {"pass": "can run", "warn": "can run, with warnings", "fail": "cannot run as is"}[verdict]
    out.append(f"verdict for {profile}: {verdict.upper()} ({word})")
    return out


def check_all_lines(rows: list[dict]) -> list[str]:
    """`check --profile all`: a table, one site profile per row, with the first reason."""
    w = max([len(r["profile"]) for r in rows] + [7])
    out = [f"{'profile':<{w}}  verdict  reason"]
    for r in rows:
        reason = (r["fails"] or r["warns"] or [""])[0]
        out.append(f"{r['profile']:<{w}}  {r['verdict'].upper():<7}  {reason}")
    ok = [r["profile"] for r in rows if r["verdict"] != "fail"]
    out.append(f"can run at: {', '.join(ok) if ok else 'none of the site profiles'}")
    return out
