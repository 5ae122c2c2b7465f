"""Recipe files: every shipped recipe loads; mistakes are usage errors (exit 2) that name the file and key;
user-test judging (exit code, substring, re: regex)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcconv import recipes
from hpcconv.errors import UsageError
from hpcconv.harness.run import Execution, UserTest

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_recipes_load():
    rs = recipes.find(ROOT / "recipes")
    assert {r.name for r in rs} == {"mpich-hello", "openmpi-ucx", "omnipath-psm2", "cuda-app", "julia-app", "python-numpy"}
    for r in rs:
        assert r.dockerfile.is_file() and r.tests and r.targets and all(r.profiles)
        base = r.dockerfile.read_text()
        assert "FROM ${" in base and ("debian:12" in base or "nvidia/cuda" in base or "julia:" in base)


@pytest.mark.parametrize("body,msg", [
    ('dockerfile = "Dockerfile"\nsource = "docker://x"\n', "exactly one of"),
    ('source = "docker://x"\nbogus = 1\n', "unknown key"),
    ('source = "docker://x"\ntargets = ["podman"]\n', "unknown target"),
    ('source = "docker://x"\ntargets = [{target = "shifter", format = "sif"}]\n', "has no format"),
    ('source = "docker://x"\n[[tests]]\nexpect = "x"\n', "needs run"),
    ('source = "docker://x"\n[[tests]]\nrun = "x"\nexpect = "re:("\n', "expect regex"),
    ('source = "docker://x"\n[[tests]]\nrun = "x"\nexit_code = "0"\n', "exit_code must be an integer"),
    ('source = "docker://x"\nplatform = "arm64"\n', "OS/ARCH"),
    ('dockerfile = "nope/Dockerfile"\n', "does not exist"),
    ('source = "docker://x"\nname = "a b"\n', "must be letters"),
    ("source = \n", "not valid TOML"),
])
def test_bad_recipes_are_usage_errors(tmp_path, body, msg):
    f = tmp_path / "r.toml"
    f.write_text(body)
    with pytest.raises(UsageError, match=msg) as e:
        recipes.load(f)
    assert e.value.exit_code == 2
    r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "recipe", "run", str(f), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(f) in r.stderr


def ex(rc=0, out="", err="", error=None):
    return Execution(rc, out, err, 0.0, ["x"], error)


def test_user_test_judging():
    assert UserTest("x").judge(ex())[0]
    ok, why = UserTest("x").judge(ex(rc=2))
    assert not ok and "exit 2, expected 0" in why
    assert UserTest("x", exit_code=2).judge(ex(rc=2))[0]
    assert UserTest("x", expect="needle").judge(ex(out="hay needle hay"))[0]
    assert UserTest("x", expect="needle").judge(ex(err="needle on stderr"))[0]
    ok, why = UserTest("x", expect="needle").judge(ex(out="hay"))
    assert not ok and "lacks 'needle'" in why
    assert UserTest("x", expect=r"re:^v\d+\.\d+$").judge(ex(out="name\nv1.26\n"))[0]
    assert not UserTest("x", expect=r"re:^v\d+$").judge(ex(out="xv1"))[0]
    ok, why = UserTest("x").judge(ex(error="timed out after 5 s"))
    assert not ok and why == "timed out after 5 s"
