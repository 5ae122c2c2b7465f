"""`hpcconv profiles list|show`: exit codes, JSON shape, resolved output."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

from hpcconv import profiles as P


def hpcconv(*args, env=None):
    import os

    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, env=e)


def test_list_table():
    r = hpcconv("profiles", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "arch", "level", "fabric", "gpu", "mpi", "confidence"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.strip()}
    assert rows["lumi-g"][:4] == ["lumi-g", "x86_64", "v3", "slingshot"] and rows["lumi-g"][-1] == "high"
    assert rows["alps-gh200"][2] == "neoverse_v2"
    assert "x86-64-v3" not in rows            # fragments only with --all


def test_list_json_and_all():
    r = hpcconv("profiles", "list", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)
    by = {x["name"]: x for x in rows}
    assert set(by) >= {"generic-x86-64", "generic-aarch64", "perlmutter-gpu", "supermuc-ng"}
    assert by["perlmutter-gpu"] | {} == by["perlmutter-gpu"] and by["perlmutter-gpu"]["gpu"] == "nvidia 580.105.08"
    assert by["supermuc-ng"]["mpi"] == "host mpich-abi" and by["supermuc-ng"]["confidence"] == "medium"
    assert all(set(x) >= {"name", "arch", "level", "fabric", "gpu", "mpi", "confidence", "kind"} for x in rows)
    r2 = hpcconv("--json", "profiles", "list", "--all")      # global --json works too
    names = {x["name"] for x in json.loads(r2.stdout)}
    assert "x86-64-v3" in names and "mpich-abi-host" in names


def test_show_prints_resolved_toml_that_round_trips():
    r = hpcconv("profiles", "show", "lumi-g")
    assert r.returncode == 0, r.stderr
    data = tomllib.loads(r.stdout)            # the output is valid TOML (comments + tables)
    assert data == P.load_profile("lumi-g").data
    assert "# resolved from: x86-64-v3 -> " in r.stdout and r.stdout.rstrip().endswith('"')


def test_show_json():
    r = hpcconv("profiles", "show", "alps-gh200", "--json")
    assert r.returncode == 0
    d = json.loads(r.stdout)
    assert d["name"] == "alps-gh200" and d["cpu"]["arch"] == "aarch64" and d["chain"][-1] == "alps-gh200"
    assert d["gpu"]["driver"] == "535.129.03" and d["host"]["kernel"] == "unknown"


def test_show_unknown_profile_exit_2():
    r = hpcconv("profiles", "show", "lumi")
    assert r.returncode == 2
    assert r.stderr.startswith("hpcconv: error: unknown profile 'lumi'") and "lumi-g" in r.stderr


def test_show_invalid_profile_exit_2(tmp_path):
    (tmp_path / "bad.toml").write_text('kind = "fragment"\n[gpu]\nvendor = "amdd"\n')
    r = hpcconv("profiles", "show", "bad", env={P.ENV_PATH: str(tmp_path)})
    assert r.returncode == 2
    assert "bad.toml: gpu.vendor: 'amdd' is not one of none, nvidia, amd" in r.stderr
    r = hpcconv("profiles", "list", env={P.ENV_PATH: str(tmp_path)})      # list validates everything it lists
    assert r.returncode == 2 and "gpu.vendor" in r.stderr


def test_profiles_without_subcommand_shows_help():
    r = hpcconv("profiles")
    assert r.returncode in (0, 2) and "list" in (r.stdout + r.stderr) and "show" in (r.stdout + r.stderr)
