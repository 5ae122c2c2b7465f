"""The command-line contract: help, version, usage errors and their exit codes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def hpcconv(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, **kw)


def test_help_lists_commands():
    r = hpcconv("--help")
    assert r.returncode == 0
    for cmd in ("pull", "convert", "export", "inspect"):
        assert cmd in r.stdout


def test_version():
    from hpcconv import __version__

    r = hpcconv("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hpcconv {__version__}"


def test_unknown_transport_is_usage_error():
    r = hpcconv("inspect", "ftp://example/x")
    assert r.returncode == 2
    assert r.stderr.startswith("hpcconv: error: unknown transport") and r.stderr.count("\n") == 1


def test_bad_platform_is_usage_error():
    r = hpcconv("inspect", "oci:/nonexistent", "--platform", "linux//x")
    assert r.returncode == 2 and "bad platform" in r.stderr


def test_missing_option_is_usage_error():
    r = hpcconv("convert", "oci:/x")
    assert r.returncode == 2


def test_help_starts_fast():
    # a guard against heavy imports at start-up, not a benchmark: generous bound
    t0 = time.monotonic()
    hpcconv("--help")
    assert time.monotonic() - t0 < 5


def test_library_warnings_reach_the_user(tmp_path):
    """A repaired oddity (hardlink to a missing target) is warned on stderr and listed in --json."""
    sys.path.insert(0, str(Path(__file__).parent))
    from ocitools import T, build_image, image_layout, make_tar

    img = build_image([make_tar([T("etc", "dir"), T("etc/link", "hard", link="etc/nowhere")])])
    lay = image_layout(tmp_path / "lay", img, "t")
    env = {**os.environ, "HPCCONV_STORE": str(tmp_path / "store")}
    r = hpcconv("export", f"oci:{lay}:t", "--raw", "-o", str(tmp_path / "a.tar"), env=env)
    assert r.returncode == 0, r.stderr
    assert any(l.startswith("warning: ") and "etc/nowhere" in l for l in r.stderr.splitlines()), r.stderr
    r = hpcconv("--json", "export", f"oci:{lay}:t", "--raw", "-o", str(tmp_path / "b.tar"), env=env)
    assert r.returncode == 0, r.stderr
    assert any("etc/nowhere" in w for w in json.loads(r.stdout)["warnings"])
