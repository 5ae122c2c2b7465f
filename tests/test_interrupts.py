"""SIGINT/SIGTERM held back around the start of a child tool (hpcconv/interrupts.py).

Oracles: the child's own effect on the disk (a file it writes after a delay) and its exit status
as the kernel reports it; the signals are real, sent to this process (see conftest's
`signal_inside_popen` for the one simulated part: where the signal lands).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from hpcconv import interrupts


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_kills_a_child_the_signal_met_inside_popen(sig, tmp_path, cli_signals, signal_inside_popen):
    """`interrupts.run` (the tar unpacking of the test harness, pip download for a bundle's tool, the
    harness's commands): the child is killed and reaped, so it writes nothing after the caller
    cleaned up. With subprocess.run the child lived on and wrote the mark."""
    mark = tmp_path / "written-later"
    started = signal_inside_popen(sig)
    with pytest.raises(KeyboardInterrupt) as got:
        interrupts.run(["sh", "-c", f"sleep 0.4; echo x > {mark}"], capture_output=True)
    assert isinstance(got.value, interrupts.Terminated) == (sig == signal.SIGTERM)
    assert started[0].returncode == -signal.SIGKILL
    time.sleep(0.8)
    assert not mark.exists()


def test_the_same_window_with_subprocess_run_leaves_the_child(tmp_path, cli_signals, signal_inside_popen):
    """The control for the test above: the simulated window is real (subprocess.run loses the child)."""
    mark = tmp_path / "written-later"
    started = signal_inside_popen(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        subprocess.run(["sh", "-c", f"sleep 0.2; echo x > {mark}"], capture_output=True)
    os.waitpid(started[0].pid, 0)
    assert mark.read_text() == "x\n"


def test_run_as_subprocess_run(tmp_path):
    r = interrupts.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert interrupts.run(["cat"], input=b"in", capture_output=True).stdout == b"in"
    with pytest.raises(subprocess.CalledProcessError):
        interrupts.run(["false"], check=True)
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as got:
        interrupts.run(["sh", "-c", "echo started; exec sleep 30"], capture_output=True, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert got.value.stdout == b"started\n"          # what it wrote so far, as subprocess.run gives


def _signal_me(sig: int) -> None:
    os.kill(os.getpid(), sig)               # delivered to this (the calling) thread on the way back
    for _ in range(1000):                    # the handler has run by now (inside `held`: held it back)
        pass


def test_held_raises_at_the_end_of_the_block(cli_signals):
    order = []
    with pytest.raises(interrupts.Terminated):
        with interrupts.held():
            _signal_me(signal.SIGTERM)
            order.append("block ran to its end")
    assert order == ["block ran to its end"]
    # an error leaving the block is replaced by the held interrupt (the user asked to stop) ...
    with pytest.raises(KeyboardInterrupt) as got:
        with interrupts.held():
            _signal_me(signal.SIGINT)
            raise OSError("tool not found")
    assert isinstance(got.value.__context__, OSError)
    # ... but an interrupt already leaving it stands for the held one, which is not raised again
    with pytest.raises(KeyboardInterrupt) as got:
        with interrupts.held():
            _signal_me(signal.SIGINT)
            raise KeyboardInterrupt("first")
    assert got.value.args == ("first",)
    with interrupts.held():
        pass                                 # nothing left over to raise
