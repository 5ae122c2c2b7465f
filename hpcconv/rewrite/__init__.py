"""Profile-driven rewrite passes over the rootfs entry stream (one module per pass).

``base`` holds the framework (Pass, Scanner, PassRunner); ``elfinfo``/``x86scan`` read ELF facts while
the bytes stream by; ``elf``, ``glibc``, ``mpi``, ``fabric`` and ``gpu`` are the detection passes (they
observe and report checks, stage "rewrite"); ``prepare`` changes the stream for a profile (bind
targets, loader configuration, dropped driver libraries; stage "prepare") and its plan gives the
image config's new environment. ``hpcconv.pipeline`` composes them.
"""

from __future__ import annotations


def default_passes(config_env: list[str] | None = None):
    """A fresh instance of every detection pass, in report order (``config_env``: the image config's Env)."""
    from .elf import ElfPass
    from .fabric import FabricPass
    from .glibc import GlibcPass
    from .gpu import GpuPass
    from .mpi import MpiPass

    return [ElfPass(), GlibcPass(), MpiPass(), FabricPass(), GpuPass(config_env)]


def check_entries(entries, profile=None, config_env: list[str] | None = None):
    """Run every detection pass over an entry stream (consuming it) and return the checks."""
    from .base import PassRunner

    return PassRunner(default_passes(config_env), profile).run(entries)
