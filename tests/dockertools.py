"""Start and use the real Docker engine for tests (the flattening oracle and the image builder).

dockerd runs with no bridge and no iptables (containers must never get private-range addresses):
`--bridge=none --iptables=false --ip-masq=false`; builds use host networking.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

from ocitools import BuiltImage, T, build_image, make_tar, sha256

DOCKER = shutil.which("docker", path="/usr/bin:/usr/local/bin:/usr/sbin:/bin") or "docker"


class Engine:
    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.proc: subprocess.Popen | None = None
        self.owned = False

    def env(self) -> dict:
        return {**os.environ, "DOCKER_HOST": self.host}

    def start(self, timeout: float = 60) -> "Engine":
        if self._ping():
            return self
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise RuntimeError("dockerd is not installed (apt-get install docker.io)")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [dockerd, "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
             "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "dockerd.pid"), "-H", self.host],
            stdout=log, stderr=log, start_new_session=True)
        self.owned = True
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.proc.returncode}); see {self.root / 'dockerd.log'}")
            if self._ping():
                return self
            time.sleep(0.3)
        raise RuntimeError("dockerd did not come up in time")

    def _ping(self) -> bool:
        if not self.sock.exists():
            return False
        r = subprocess.run([DOCKER, "-H", self.host, "version", "--format", "{{.Server.Version}}"],
                           capture_output=True, text=True)
        return r.returncode == 0

    def stop(self) -> None:
        if self.proc and self.owned and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def run(self, *args, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([DOCKER, "-H", self.host, *args], input=input, capture_output=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
        return r

    def load(self, img: BuiltImage, tag: str) -> str:
        """`docker load` an image (as a classic docker-save archive made here)."""
        self.run("load", input=docker_save_archive(img, tag))
        return tag

    def build(self, context: Path, tag: str, dockerfile: str | None = None) -> str:
        args = ["build", "--network", "host", "-t", tag]
        if dockerfile:
            args += ["-f", dockerfile]
        self.run(*args, str(context))
        return tag

    def export(self, tag: str) -> bytes:
        """`docker create` + `docker export`: the tree a container of the image sees."""
        cid = self.run("create", tag, "/bin/true").stdout.decode().strip()
        try:
            return self.run("export", cid).stdout
        finally:
            self.run("rm", "-f", cid, check=False)


def docker_save_archive(img: BuiltImage, tag: str) -> bytes:
    """A classic `docker save` archive (manifest.json, <config>.json, <layer>/layer.tar)."""
    import gzip

    import zstandard

    man = json.loads(img.manifest)
    buf = io.BytesIO()

    def add(tf, name, data):
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w") as tf:
        cfg_name = man["config"]["digest"].split(":")[1] + ".json"
        add(tf, cfg_name, img.config)
        layer_names = []
        for d in man["layers"]:
            data = img.blobs[d["digest"]]
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            elif data[:4] == b"\x28\xb5\x2f\xfd":
                data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
            name = sha256(data).split(":")[1] + "/layer.tar"
            add(tf, name, data)
            layer_names.append(name)
        add(tf, "manifest.json", json.dumps([{"Config": cfg_name, "RepoTags": [tag], "Layers": layer_names}]).encode())
    return buf.getvalue()


# busybox bases from Debian's busybox-static ----------------------------------------------------------------
APPLETS = ["sh", "ls", "cat", "echo", "true", "false", "env", "id", "uname", "mkdir", "rm", "ln", "cp", "mv",
           "touch", "chmod", "stat", "readlink", "find", "sort", "head", "tail", "wc", "grep", "sed", "test",
           "printf", "pwd", "sleep", "tr", "md5sum", "sha256sum", "tar", "xargs", "basename", "dirname", "hostname",
           "whoami", "[", "expr", "awk", "du", "df", "mount", "cut", "date"]


def busybox_binary(arch: str, cache: Path) -> bytes:
    """The busybox binary for `arch` (amd64|arm64) from Debian's busybox-static package.

    Looks in $HPCCONV_TEST_DEBS and `cache` first; downloads with `apt-get download` otherwise
    (scripts/setup-system.sh enables the arm64 architecture and fetches both ahead of time)."""
    cache.mkdir(parents=True, exist_ok=True)
    dirs = [Path(p) for p in os.environ.get("HPCCONV_TEST_DEBS", "").split(":") if p] + [cache]
    debs = [p for d in dirs if d.is_dir() for p in d.glob(f"busybox-static_*_{arch}.deb")]
    if not debs:
        subprocess.run(["apt-get", "download", f"busybox-static:{arch}"], cwd=cache, check=True,
                       capture_output=True)
        debs = list(cache.glob(f"busybox-static_*_{arch}.deb"))
    out = cache / f"extract-{arch}"
    if not (out / "bin" / "busybox").exists():
        out.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(sorted(debs)[-1]), str(out)], check=True)
    return (out / "bin" / "busybox").read_bytes()


def busybox_layer(arch: str, cache: Path) -> bytes:
    bb = busybox_binary(arch, cache)
    members = [T("bin", "dir"), T("etc", "dir"), T("tmp", "dir", mode=0o1777), T("root", "dir", mode=0o700),
               T("usr", "dir"), T("usr/bin", "dir"), T("var", "dir"),
               T("bin/busybox", data=bb, mode=0o755)]
    members += [T(f"bin/{a}", "sym", link="busybox") for a in APPLETS]
    members += [T("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
                T("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")]
    return make_tar(members)


def busybox_image(arch: str, cache: Path, extra_layers: list[bytes] = (), **kw) -> BuiltImage:
    return build_image([busybox_layer(arch, cache), *extra_layers], arch=arch,
                       variant="v8" if arch == "arm64" else "", **kw)
