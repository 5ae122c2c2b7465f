"""Issue 8 secrets: registry passwords and tokens never appear in logs (any verbosity), reports,
bundles, process arguments, error messages or the store.

A broad set of CLI operations runs against the TLS + Basic and the token registries with the test
password (registryfix.PASSWORD; set HPCCONV_TEST_SENTINEL to choose it, and to run the *whole*
suite with it), successes and failures, quiet and -vv. Then every file written (store, outputs,
reports, bundle, HOME, TMPDIR), every stdout/stderr, and /proc/*/cmdline of every process seen
while they ran (hpcconv and its children: tar2sqfs, credential helpers) are searched for the
password, its Basic-auth and URL-encoded forms, and every token the token server issued.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from registryfix import PASSWORD, USER, clean_env

pytestmark = pytest.mark.registry


class ProcWatch:
    """Polls /proc while hpcconv runs and keeps the command line of every process descending from
    the ones we started (`track(pid)`); other processes on the machine (other test runs, whose
    fixtures pass credentials to skopeo on purpose) are not ours to judge."""

    def __init__(self):
        self.seen: set[bytes] = set()
        self.tracked: set[int] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def track(self, pid: int) -> None:
        self.tracked.add(pid)

    def _run(self):
        while not self._stop.is_set():
            for p in Path("/proc").iterdir():
                if not p.name.isdigit():
                    continue
                pid = int(p.name)
                try:
                    ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if pid in self.tracked or ppid in self.tracked:
                        self.tracked.add(pid)
                        self.seen.add((p / "cmdline").read_bytes())
                except (OSError, ValueError, IndexError):
                    pass
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def forms(secret: str) -> list[bytes]:
    basic = base64.b64encode(f"{USER}:{secret}".encode())
    return [secret.encode(), quote(secret).encode(), quote(secret, safe="").encode(), basic,
            json.dumps(secret).encode()[1:-1]]


def test_no_secret_anywhere(tls_registry, tls_images, token_registry, token_images, token_server, test_certs,
                            tmp_path):
    assert len(PASSWORD) >= 8
    home, tmpdir, work, store = (tmp_path / n for n in ("home", "tmpdir", "work", "store"))
    for d in (home, tmpdir, work):
        d.mkdir()
    base = clean_env(HOME=home, TMPDIR=tmpdir, HPCCONV_STORE=store)
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_AUTH_CONFIG", "HPCCONV_PASSWORD"):
        base.pop(k, None)
    creds = {**base, "HPCCONV_PASSWORD": PASSWORD}
    wrong = {**base, "HPCCONV_PASSWORD": PASSWORD + "-wrong"}
    ca = ["--ca-cert", str(test_certs.ca)]
    tls = f"docker://{tls_registry.host}/secure/busybox:1"
    tok = f"docker://{token_registry.host}/private/busybox:1"
    runs = [
        # (args, env, stdin, expected exit code)
        (["-vv", "pull", tls, "--username", USER, *ca], creds, None, 0),
        (["-v", "--json", "inspect", tls, "--username", USER, *ca], creds, None, 0),
        (["convert", tls, "--username", USER, *ca, "--target", "charliecloud", "--format", "tar",
          "-o", str(work / "c.tar.gz"), "--report", str(work / "report.json")], creds, None, 0),
        (["export", tls, "--username", USER, *ca, "-o", str(work / "rootfs.tar")], creds, None, 0),
        (["-vv", "pull", tls, "--username", USER, "--password-stdin", *ca], base, PASSWORD + "\n", 0),
        (["-vv", "pull", f"docker://{tls_registry.host}/secure/other:1", "--username", USER, *ca], creds, None, 3),
        (["-vv", "pull", tls.replace(":1", ":2"), "--username", USER, *ca], wrong, None, 3),
        (["-vv", "pull", tls, "--username", "nobody", "--password-stdin", *ca], base, PASSWORD + "\n", 3),
        (["-vv", "pull", tok, "--username", USER, *ca], creds, None, 0),
        (["convert", tok, "--username", USER, *ca, "--target", "singularity", "-o", str(work / "t.sif")], creds,
         None, 0),
        (["-vv", "convert", tok, "--username", USER, *ca, "--target", "charliecloud", "-o", str(work / "t.sqfs")],
         creds, None, 0),
        (["-vv", "--json", "inspect", f"docker://{token_registry.host}/private/none:1", "--username", USER, *ca],
         creds, None, 3),
        (["-vv", "pull", f"docker://{token_registry.host}/private/busybox:9", "--username", USER, *ca], wrong,
         None, 3),
        (["bundle", "create", tls, "--username", USER, *ca, "-o", str(work / "b.hpcbundle")], creds, None, 0),
        (["store", "verify"], base, None, 0),
    ]
    # docker config.json credentials (the user's own file holds the secret; nothing else may)
    cfg = home / ".docker" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"auths": {tls_registry.host: {"auth": base64.b64encode(
        f"{USER}:{PASSWORD}".encode()).decode()}}}))
    runs.append((["-vv", "pull", tls, *ca, "--platform", "linux/amd64"], base, None, 0))
    outputs: list[str] = []
    with ProcWatch() as watch:
        for args, env, stdin, code in runs:
            p = subprocess.Popen([sys.executable, "-m", "hpcconv.cli", *args], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            watch.track(p.pid)
            out, err = p.communicate(stdin, timeout=300)
            assert p.returncode == code, (args, err)
            outputs += [out, err]
    assert token_server.issued, "the token registry was not used"
    needles = forms(PASSWORD) + [t.encode() for t in token_server.issued]
    hits = []
    for i, text in enumerate(outputs):
        for n in needles:
            if n in text.encode():
                hits.append(f"output {i}: {n[:16]!r}")
    for cmd in watch.seen:
        for n in needles:
            if n in cmd:
                hits.append(f"cmdline {cmd[:80]!r}")
    files = 0
    for root in (home, tmpdir, work, store):
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath) / name
                if p == cfg or p.is_symlink() or not p.is_file():
                    continue
                files += 1
                data = p.read_bytes()
                for n in needles:
                    if n in data:
                        hits.append(f"{p}: {n[:16]!r}")
    assert files > 10 and (work / "b.hpcbundle").exists() and (work / "report.json").exists()
    assert any(b"hpcconv.cli" in c for c in watch.seen) and any(b"sqfs" in c for c in watch.seen)
    assert not hits, hits
    # the search itself works: the user's config.json does hold the Basic form
    assert forms(PASSWORD)[3] in cfg.read_bytes()
