"""SIGINT and SIGTERM: raised in the main thread as exceptions, so that every `finally` cleans up
(temporary outputs removed, child tools killed), or held back for the few lines that must not be
cut in the middle (`held`).

The CLI installs `on_signal` for SIGINT, SIGTERM and SIGALRM (the re-delivery timer below).
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, `kill`): unwinds and cleans up like Ctrl-C."""


PENDING: list[int] = []     # the first signal received: it decides the message and the exit code
_depth = [0]                # how many `held` blocks the main thread is in
_deferred: list[int] = []   # a signal that arrived inside one, raised when the outermost ends


def interrupt(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _in_finalizer(frame) -> bool:
    """Whether Python is running a weakref callback or __del__ (an exception raised there is
    printed as 'ignored' and lost, so the Ctrl-C would be too)."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or (code.co_name == "_remove" and code.co_filename.endswith("_weakrefset.py")):
            return True
        frame = frame.f_back
    return False


def on_signal(signum, frame):
    """Raise the signal as an exception in the main thread. Inside a `held` block it is raised when
    the block ends; raised inside a finalizer it would be lost, so it is re-delivered a moment later."""
    if signum == signal.SIGALRM:
        if not PENDING:
            return
        signum = PENDING[0]
    elif not PENDING:
        PENDING.append(signum)
    if _depth[0]:
        _deferred[:] = [signum]
        return
    if _in_finalizer(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        return
    _deferred.clear()
    raise interrupt(signum)


class held:
    """`with held(): ...` -- a SIGINT/SIGTERM arriving in the block is raised as soon as it ends, not
    in the middle. For a call that must either not start or be known to the caller when it returns:
    `proc = subprocess.Popen(...)` cut after the fork leaves a child tool nobody kills, which goes on
    writing the output's temporary after the unwinding removed it. An exception already leaving the
    block takes the place of the deferred interrupt if it is one itself (the unwinding has begun).
    Only the main thread holds (the signal handler runs there); elsewhere the block changes nothing."""

    def __enter__(self) -> None:
        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            _depth[0] += 1

    def __exit__(self, et, ev, tb) -> bool:
        if not self._main:
            return False
        _depth[0] -= 1
        if _depth[0] or not _deferred:
            return False
        signum = _deferred.pop()
        if et is not None and issubclass(et, KeyboardInterrupt):
            return False
        raise interrupt(signum)


def reap(proc) -> None:
    """Kill a child started by `subprocess.Popen` and wait for it, a second interrupt held off
    meanwhile: on the way out of an exception, so that the child writes nothing after the caller's
    clean-up."""
    with held():
        proc.kill()
        proc.wait()


def run(args, *, input=None, timeout: float | None = None, check: bool = False, capture_output: bool = False,
        **popen):
    """`subprocess.run` for a child that writes where the caller cleans up (an unpacked image, a
    download directory) or may run long: started inside `held`, so a SIGINT/SIGTERM that lands in
    `Popen` (after the fork) is raised where the child is known, killed and reaped, instead of
    leaving it running on after the caller's clean-up. On a timeout the child is killed too, and
    `subprocess.TimeoutExpired` carries what it wrote so far, as with `subprocess.run`."""
    import subprocess

    if capture_output:
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    proc = None
    try:
        with held():
            proc = subprocess.Popen(args, **popen)
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        if proc is not None:
            reap(proc)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass            # (a stdin the child never read: the error being raised matters)
        raise
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
