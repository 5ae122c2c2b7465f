"""`hpcconv profiles show` resolves every shipped profile (fragments included), through the real CLI;
the printed TOML parses (tomllib, not our writer) to exactly the resolved data, and every site
profile yields a preparation plan of absolute container paths."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from hpcconv.profiles import SHIPPED_DIR, load_profile
from hpcconv.rewrite.prepare import make_plan

SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))


def hpcconv(*args):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True)


def test_every_shipped_profile_is_covered():
    assert len(SHIPPED) >= 25 and {"lumi-c", "perlmutter-gpu", "mpich-abi-host", "x86-64-v4"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_profiles_show_resolves(name):
    r = hpcconv("profiles", "show", name)
    assert r.returncode == 0, r.stderr
    prof = load_profile(name)
    assert tomllib.loads(r.stdout) == prof.data
    j = hpcconv("profiles", "show", name, "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["chain"][-1] == name
    if prof.kind != "fragment":
        plan = make_plan(prof)
        assert all(not d.startswith("/") and d for d in plan.dirs)
        if prof.mpi.mode == "host":
            assert all(d.lstrip("/") in plan.dirs for d in prof.mpi.lib_dirs)


@pytest.mark.parametrize("cmd", [["pull"], ["inspect"], ["export"], ["convert"], ["check"], ["profiles", "list"],
                                 ["profiles", "show"]])
def test_every_command_has_help(cmd):
    """Help texts are rendered with rich markup: a '[...]' in them must not break --help."""
    r = hpcconv(*cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout, r.stderr[-300:]
