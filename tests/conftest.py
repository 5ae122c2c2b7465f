"""Shared fixtures: the real components (Docker engine, busybox base images) started on loopback.

Components are started once per test session and stopped at the end (by PID). When a component is
not installed, tests that need it are skipped with the reason locally; with HPCCONV_REQUIRE_ALL=1
(set by .ci/run) a missing component is an error instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dockertools import Engine, busybox_image  # noqa: E402

pytest_plugins = ["registryfix"]

WORK = Path(os.environ.get("HPCCONV_TEST_WORK", "/var/tmp/hpcconv-test"))
REQUIRE_ALL = os.environ.get("HPCCONV_REQUIRE_ALL") == "1"


def need(tool: str) -> str:
    """Path of a required external tool, or skip (fail under HPCCONV_REQUIRE_ALL=1)."""
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        msg = f"{tool} is not installed (run scripts/setup-system.sh)"
        if REQUIRE_ALL:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def work_dir() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    return WORK


@pytest.fixture(scope="session")
def docker_engine(work_dir):
    need("dockerd")
    eng = Engine(work_dir / "docker")
    try:
        eng.start()
    except RuntimeError as e:
        if REQUIRE_ALL:
            pytest.fail(str(e))
        pytest.skip(str(e))
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def deb_cache(work_dir) -> Path:
    return work_dir / "debs"


@pytest.fixture(scope="session")
def busybox_amd64(deb_cache):
    return busybox_image("amd64", deb_cache)


@pytest.fixture(scope="session")
def busybox_arm64(deb_cache):
    return busybox_image("arm64", deb_cache)


@pytest.fixture(scope="session")
def docker_busybox(docker_engine, busybox_amd64) -> str:
    """The amd64 busybox base loaded into the engine, for `FROM` in test Dockerfiles."""
    return docker_engine.load(busybox_amd64, "hpcconv-test/busybox:amd64")


@pytest.fixture
def store_dir(tmp_path, monkeypatch) -> Path:
    """A fresh, private hpcconv store for one test."""
    d = tmp_path / "store"
    monkeypatch.setenv("HPCCONV_STORE", str(d))
    return d


@pytest.fixture
def cli_signals(monkeypatch):
    """The CLI's SIGINT/SIGTERM handling installed in this (pytest's) process for one test, with a
    fresh record of the signals received; the previous handlers are put back afterwards."""
    import signal

    from hpcconv import interrupts

    monkeypatch.setattr(interrupts, "PENDING", [])
    monkeypatch.setattr(interrupts, "_deferred", [])
    old = {s: signal.signal(s, interrupts.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    yield interrupts
    for s, h in old.items():
        signal.signal(s, h)


@pytest.fixture
def signal_inside_popen(monkeypatch):
    """Make every subprocess.Popen send a signal to this process right after its child started, so
    that the signal's handler runs inside Popen (the window a real signal hits only by chance; no
    real component lands it there on demand). Call with the signal; returns the Popens started."""
    import signal
    import subprocess

    started: list[subprocess.Popen] = []

    def arm(sig: int = signal.SIGTERM) -> list[subprocess.Popen]:
        class Popen(subprocess.Popen):
            def _execute_child(self, *a, **kw):
                super()._execute_child(*a, **kw)
                started.append(self)
                os.kill(os.getpid(), sig)   # the handler runs at the next bytecode: still inside Popen

        monkeypatch.setattr(subprocess, "Popen", Popen)
        return started
    return arm
