"""The run stage: execute an emitted image with the runtimes found on this host, and user tests.

Runtimes: ``ch-run`` runs every output (Charliecloud dir/squashfs/tar, the SIF partition, the Shifter
squashfs); ``apptainer``/``singularity`` run SIF and sandboxes; ``shifter`` only runs images its site
installed (reported as a skip naming the install step). A runtime that is not installed is a ``skip``
check with the reason, never a pass. An image of another architecture runs through qemu-user when
binfmt_misc has the interpreter enabled (the check says ``emulated``), else it is skipped.

User tests (``--test 'CMD'``, ``[[tests]]`` in recipes): ``run`` is a shell command line run with
``/bin/sh -c`` in the image (ENTRYPOINT is not applied; WORKDIR and the image environment are),
``exit_code`` (default 0) is the status it must end with, ``expect`` is a substring that must occur
in its output (stdout, then stderr), or with a ``re:`` prefix a Python regular expression searched
in it (``re.M``). Each test runs in the Docker image (``docker run --rm --network host``, when the
image was built or is in the engine) and again in every converted image, so a difference is caught.
"""

from __future__ import annotations

import os
import platform as _platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import interrupts
from .checks import FAIL, PASS, SKIP, Check, Checks
from .images import Emitted, chrun_image

STAGE = "run"
OUT_LIMIT = 400
QEMU = {"arm64": "aarch64", "amd64": "x86_64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass
class UserTest:
    run: str
    name: str | None = None
    expect: str | None = None
    exit_code: int = 0
    timeout: float = 600
    entrypoint: bool = False     # run = the ARGS for the image's ENTRYPOINT (replacing CMD), as `docker run IMAGE ARGS`

    @property
    def title(self) -> str:
        return self.name or (("run image " + self.run).strip() if self.entrypoint else self.run)

    @property
    def args(self) -> list[str]:
        import shlex

        return shlex.split(self.run)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "UserTest":
        from ..errors import UsageError

        ep = d.get("entrypoint", False) if isinstance(d, dict) else False
        if not isinstance(ep, bool):
            raise UsageError(f"{where}: entrypoint must be true or false")
        if not isinstance(d, dict) or not isinstance(d.get("run", "" if ep else None), str) or \
                not (ep or d["run"].strip()):
            raise UsageError(f"{where}: a test needs run = \"COMMAND\" (or entrypoint = true, run = \"ARGS\")")
        unknown = set(d) - {"run", "name", "expect", "exit_code", "timeout", "entrypoint"}
        if unknown:
            raise UsageError(f"{where}: unknown test key(s) {', '.join(sorted(unknown))}",
                             hint="keys: run, name, expect, exit_code, timeout, entrypoint")
        if ep:
            import shlex

            try:
                shlex.split(d.get("run", ""))
            except ValueError as e:
                raise UsageError(f"{where}: run = ARGS for the entrypoint: {e}") from None
        ec = d.get("exit_code", 0)
        if not isinstance(ec, int) or isinstance(ec, bool):
            raise UsageError(f"{where}: exit_code must be an integer")
        exp = d.get("expect")
        if exp is not None and not isinstance(exp, str):
            raise UsageError(f"{where}: expect must be a string (prefix re: for a regular expression)")
        if exp and exp.startswith("re:"):
            try:
                re.compile(exp[3:])
            except re.error as e:
                raise UsageError(f"{where}: expect regex {exp[3:]!r}: {e}") from None
        return cls(d.get("run", ""), d.get("name"), exp, ec, float(d.get("timeout", 600)), ep)

    def judge(self, x: "Execution") -> tuple[bool, str]:
        if x.error:
            return False, x.error
        why = []
        if x.rc != self.exit_code:
            why.append(f"exit {x.rc}, expected {self.exit_code}")
        if self.expect is not None:
            text = x.stdout + x.stderr
            if self.expect.startswith("re:"):
                ok = re.search(self.expect[3:], x.stdout, re.M) or re.search(self.expect[3:], x.stderr, re.M)
                if not ok:
                    why.append(f"output does not match /{self.expect[3:]}/")
            elif self.expect not in text:
                why.append(f"output lacks {self.expect!r}")
        return (not why), "; ".join(why)


@dataclass
class Execution:
    rc: int
    stdout: str
    stderr: str
    duration: float
    argv: list[str]
    error: str | None = None     # could not run at all (timeout, runtime missing)

    def summary(self) -> str:
        out = (self.stdout.strip() or self.stderr.strip()).replace("\n", " | ")
        if len(out) > OUT_LIMIT:
            out = out[:OUT_LIMIT] + "..."
        return f"exit {self.rc}" + (f": {out}" if out else "")


def host_arch() -> str:
    m = _platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


def emulation(arch: str | None) -> tuple[bool, str | None]:
    """(runnable, note): note says 'emulated via qemu-...' or why it cannot run."""
    if not arch or arch == host_arch():
        return True, None
    q = QEMU.get(arch, arch)
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{q}"
    try:
        enabled = entry.read_text().splitlines()[0].strip() == "enabled"
    except OSError:
        enabled = False
    if enabled:
        return True, f"emulated ({arch} on {host_arch()} via qemu-{q} binfmt)"
    return False, (f"the image is {arch} and this host is {host_arch()}; no qemu-{q} binfmt_misc handler is "
                   "enabled (install qemu-user-static and binfmt-support)")


def _exec(argv: list[str], timeout: float, env: dict | None = None) -> Execution:
    t0 = time.monotonic()
    try:
        r = interrupts.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        return Execution(-1, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""),
                         "", time.monotonic() - t0, argv, f"timed out after {timeout:g} s")
    except OSError as e:
        return Execution(-1, "", str(e), time.monotonic() - t0, argv, f"cannot start {argv[0]}: {e.strerror}")
    return Execution(r.returncode, r.stdout, r.stderr, time.monotonic() - t0, argv)


class Runtime:
    name = "?"

    def __init__(self, exe: str, image: Emitted):
        self.exe, self.image = exe, image

    def exec(self, cmd: str, timeout: float) -> Execution:
        raise NotImplementedError

    def run_image(self, args: list[str], timeout: float) -> Execution:
        """The image's ENTRYPOINT with ARGS (or its CMD), as `docker run IMAGE [ARGS]`."""
        raise NotImplementedError

    def test(self, t: "UserTest") -> Execution:
        return self.run_image(t.args, t.timeout) if t.entrypoint else self.exec(t.run, t.timeout)


class ChRun(Runtime):
    name = "ch-run"

    def __init__(self, exe: str, image: Emitted):
        super().__init__(exe, image)
        self.path = chrun_image(image)

    def argv(self, cmd: str) -> list[str]:
        e = self.image
        if e.kind in ("sif", "sandbox"):
            inner = ["/.singularity.d/actions/exec", "/bin/sh", "-c", cmd]   # the env scripts, as apptainer exec
        else:
            inner = ["/bin/sh", "-c", cmd]
        return self._argv(inner)

    def run_image(self, args: list[str], timeout: float) -> Execution:
        e = self.image
        if e.kind == "charliecloud":
            inner = ["/ch/run.sh", *args]            # WORKDIR, ENTRYPOINT, CMD as docker run (hpcconv writes it)
        elif e.kind in ("sif", "sandbox"):
            inner = ["/.singularity.d/actions/run", *args]   # as `apptainer run IMAGE ARGS`
        else:   # Shifter: `shifter --entrypoint [ARGS]` = ENTRY + (ARGS or CMD)
            inner = [*e.entry, *(args or e.cmd)] or ["/bin/sh"]
        env = dict(os.environ)
        env.setdefault("USER", _user())
        return _exec(self._argv(inner), timeout, env)

    def _argv(self, inner: list[str]) -> list[str]:
        e = self.image
        opts: list[str] = [f"-b{src}:{dst}" for src, dst in e.binds]
        if e.kind == "charliecloud":
            opts.append("--set-env")   # /ch/environment, as ch-image writes it
        elif e.kind == "shifter":
            opts += [f"--set-env={k}={v}" for k, v in e.env.items()]
        # WORKDIR: Charliecloud images are run the Docker way (`ch-run -c WORKDIR`, as hpcconv's run hint
        # says); `apptainer exec` and Shifter (without --workdir) stay in the caller's directory
        wd = None
        if e.kind == "charliecloud":
            wd = e.workdir or _ch_workdir(self.path)
        if wd and wd != "/":
            opts += ["-c", wd]
        return [self.exe, *opts, str(self.path), "--", *inner]

    def exec(self, cmd: str, timeout: float) -> Execution:
        env = dict(os.environ)
        env.setdefault("USER", _user())
        return _exec(self.argv(cmd), timeout, env)


class Apptainer(Runtime):
    name = "apptainer"

    def __init__(self, exe: str, image: Emitted):
        super().__init__(exe, image)
        self.name = Path(exe).name     # apptainer or singularity

    def exec(self, cmd: str, timeout: float) -> Execution:
        binds = [f"--bind={src}:{dst}" for src, dst in self.image.binds]
        return _exec([self.exe, "exec", *binds, str(self.image.path), "/bin/sh", "-c", cmd], timeout)

    def run_image(self, args: list[str], timeout: float) -> Execution:
        binds = [f"--bind={src}:{dst}" for src, dst in self.image.binds]
        return _exec([self.exe, "run", *binds, str(self.image.path), *args], timeout)


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _ch_workdir(path: Path) -> str | None:
    """WORKDIR from /ch/metadata.json (cwd) of a Charliecloud dir or squashfs."""
    import json

    try:
        if path.is_dir():
            text = (path / "ch" / "metadata.json").read_text()
        else:
            exe = shutil.which("rdsquashfs") or shutil.which("rdsquashfs", path="/usr/bin:/bin")
            if exe is None:
                return None
            r = subprocess.run([exe, "-c", "/ch/metadata.json", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                return None
            text = r.stdout
        return json.loads(text).get("cwd") or None
    except (OSError, ValueError):
        return None


def runtimes_for(image: Emitted) -> tuple[list[Runtime], Checks]:
    """The runtimes that will run `image` here, and skip checks for those that cannot."""
    checks = Checks()
    found: list[Runtime] = []
    ch = shutil.which("ch-run")
    if ch:
        try:
            found.append(ChRun(ch, image))
        except Exception as e:   # noqa: BLE001  (an unreadable image: reported, not raised)
            checks.add(STAGE, "runtime ch-run", FAIL, f"cannot prepare {image.path} for ch-run: {e}")
    else:
        checks.add(STAGE, "runtime ch-run", SKIP, "ch-run is not installed (apt-get install charliecloud): "
                   "the image was not run")
    if image.kind in ("sif", "sandbox"):
        app = shutil.which("apptainer") or shutil.which("singularity")
        if app:
            found.append(Apptainer(app, image))
        else:
            checks.add(STAGE, "runtime apptainer", SKIP, "apptainer and singularity are not installed here: the SIF ran under ch-run only")
    if image.kind == "shifter":
        sh = shutil.which("shifter")
        checks.add(STAGE, "runtime shifter", SKIP,
                   ("shifter is installed, but it runs only images installed into the site's imagePath by its "
                    "administrators (see the install note); run there with shifter --image=id:"
                    + image.squashfs.stem) if sh else "shifter is not installed here")
    return found, checks


def _check(stage: str, name: str, ok: bool, detail: str, dur: float) -> Check:
    return Check(stage, name, PASS if ok else FAIL, detail, round(dur, 3))


def smoke(rt: Runtime, note: str | None, timeout: float = 300) -> Check:
    x = rt.exec("exit 0", timeout)
    ok = x.error is None and x.rc == 0
    detail = (note + "; " if note else "") + ("/bin/sh starts" if ok else (x.error or x.summary() + " " + x.stderr.strip()[-300:]))
    return _check(STAGE, f"smoke run ({rt.name})", ok, detail, x.duration)


def run_stage(image: Emitted, tests: list[UserTest], docker_results: dict[int, tuple[bool, str]] | None = None,
              smoke_test: bool = True, timeout: float = 300) -> Checks:
    """Smoke run + user tests with every runtime found. docker_results: index -> (passed, summary)."""
    checks = Checks()
    runnable, note = emulation(image.arch)
    if not runnable:
        checks.add(STAGE, "run", SKIP, note)
        return checks
    rts, skips = runtimes_for(image)
    checks.extend(skips)
    try:
        for rt in rts:
            if smoke_test:
                checks.items.append(smoke(rt, note, timeout))
            for i, t in enumerate(tests):
                x = rt.test(t)
                ok, why = t.judge(x)
                detail = ("passed: " + x.summary()) if ok else f"{why} ({x.summary()})"
                if docker_results is not None and i in docker_results:
                    d_ok, d_sum = docker_results[i]
                    if d_ok and not ok:
                        detail = f"passes in Docker, fails under {rt.name}: {detail}"
                    elif not d_ok and ok:
                        detail = f"fails in Docker, passes under {rt.name}: {detail}"
                    elif not d_ok and not ok:
                        detail = f"fails in Docker too: {detail}"
                if note:
                    detail = note + "; " + detail
                checks.items.append(_check(STAGE, f"test[{rt.name}]: {t.title}", ok, detail, x.duration))
    finally:
        image.cleanup()
    return checks


# Docker side -------------------------------------------------------------------------------------------
def docker_tests(tag: str, tests: list[UserTest], stage: str = "build") -> tuple[Checks, dict[int, tuple[bool, str]]]:
    """Run each test in the Docker image (`docker run --rm --network host`, ENTRYPOINT replaced by
    /bin/sh -c). An engine or image that is not there gives skip checks."""
    checks = Checks()
    results: dict[int, tuple[bool, str]] = {}
    if not tests:
        return checks, results
    try:
        from ..sources.daemon import _client

        cl = _client()
        cl.api.inspect_image(tag)
    except Exception as e:  # noqa: BLE001  (SourceError, NotFound...)
        for t in tests:
            checks.add(stage, f"test[docker]: {t.title}", SKIP, f"not run in Docker: {str(e)[:200]}")
        return checks, results
    for i, t in enumerate(tests):
        x = docker_exec(cl, tag, t.args if t.entrypoint else t.run, t.timeout, entrypoint=t.entrypoint)
        ok, why = t.judge(x)
        results[i] = (ok, x.summary())
        checks.items.append(_check(stage, f"test[docker]: {t.title}", ok,
                                   ("passed: " + x.summary()) if ok else f"{why} ({x.summary()})", x.duration))
    return checks, results


def docker_exec(cl, tag: str, cmd, timeout: float, entrypoint: bool = False) -> Execution:
    """`docker run --rm --network host --entrypoint /bin/sh TAG -c CMD`, or with entrypoint=True
    `docker run --rm --network host TAG [ARGS]` (cmd = the ARGS list)."""
    import docker.errors

    t0 = time.monotonic()
    if entrypoint:
        argv = ["docker", "run", "--rm", "--network", "host", tag, *cmd]
        kw = {"command": list(cmd) or None}
    else:
        argv = ["docker", "run", "--rm", "--network", "host", "--entrypoint", "/bin/sh", tag, "-c", cmd]
        kw = {"command": ["-c", cmd], "entrypoint": ["/bin/sh"]}
    c = None
    try:
        c = cl.api.create_container(tag, host_config=cl.api.create_host_config(network_mode="host"), **kw)
        cid = c["Id"]
        cl.api.start(cid)
        try:
            rc = cl.api.wait(cid, timeout=timeout)["StatusCode"]
        except Exception:   # noqa: BLE001  (read timeout)
            cl.api.kill(cid)
            return Execution(-1, "", "", time.monotonic() - t0, argv, f"timed out after {timeout:g} s")
        out = cl.api.logs(cid, stdout=True, stderr=False).decode(errors="replace")
        err = cl.api.logs(cid, stdout=False, stderr=True).decode(errors="replace")
        return Execution(rc, out, err, time.monotonic() - t0, argv)
    except docker.errors.APIError as e:
        return Execution(-1, "", "", time.monotonic() - t0, argv, f"docker: {e.explanation or e}")
    finally:
        if c is not None:
            try:
                cl.api.remove_container(c["Id"], force=True)
            except Exception:   # noqa: BLE001
                pass
