#!/usr/bin/env python3
"""Build the bundled demo image as an OCI layout, offline, from Debian's busybox-static.

usage: build-demo-image.py OUTDIR   -> OUTDIR is an OCI layout with the tag `demo`
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
APPLETS = ["sh", "ls", "cat", "echo", "env", "id", "uname", "mkdir", "rm", "true", "false", "test", "printf",
           "pwd", "sleep", "grep", "sed", "head", "tail", "wc", "find", "stat", "readlink"]
MTIME = 1_700_000_000


def _tar(add) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add(tf)
    return buf.getvalue()


def _info(name, kind=tarfile.DIRTYPE, mode=0o755, size=0, link=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.linkname, ti.mtime = kind, mode, size, link, MTIME
    return ti


def base_layer(busybox: bytes) -> bytes:
    def add(tf):
        for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755)):
            tf.addfile(_info(d, mode=mode))
        tf.addfile(_info("bin/busybox", tarfile.REGTYPE, 0o755, len(busybox)), io.BytesIO(busybox))
        for a in APPLETS:
            tf.addfile(_info(f"bin/{a}", tarfile.SYMTYPE, 0o777, link="busybox"))
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        tf.addfile(_info("etc/passwd", tarfile.REGTYPE, 0o644, len(passwd)), io.BytesIO(passwd))
    return _tar(add)


def app_layer() -> bytes:
    root = HERE / "recipes" / "demo" / "rootfs"

    def add(tf):
        tf.addfile(_info("bin/.wh.false", tarfile.REGTYPE, 0o644))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = Path(dirpath) / name
                arc = str(full.relative_to(root))
                if full.is_dir():
                    tf.addfile(_info(arc))
                else:
                    data = full.read_bytes()
                    mode = 0o755 if os.access(full, os.X_OK) else 0o644
                    tf.addfile(_info(arc, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))
    return _tar(add)


def find_busybox() -> bytes:
    for p in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.isfile(p):
            return Path(p).read_bytes()
    sys.exit("build-demo-image: busybox-static is not installed (apt-get install busybox-static)")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h

    layers, diff_ids = [], []
    for tar in (base_layer(find_busybox()), app_layer()):
        gz = gzip.compress(tar, 6, mtime=0)
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = {
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/opt/demo/bin:/bin:/usr/bin", "DEMO_GREETING=hi"], "WorkingDir": "/opt/demo",
                   "Entrypoint": ["/opt/demo/bin/hello"], "Cmd": ["world"],
                   "Labels": {"org.opencontainers.image.title": "hpcconv demo"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "busybox-static base"}, {"created_by": "COPY rootfs/ / ; rm /bin/false"}],
    }
    cfg = json.dumps(config, sort_keys=True).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": put(cfg),
                                      "size": len(cfg)},
                           "layers": layers}, sort_keys=True).encode()
    md = put(manifest)
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (out / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": "demo"}}]}))
    print(f"demo image written to {out} (oci:{out}:demo)")


if __name__ == "__main__":
    main()
