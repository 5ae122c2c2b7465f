"""Test helpers: make layer tars and OCI image layouts from Python, independent of hpcconv's code.

Used to craft images with exact layer contents (whiteouts, hardlinks, odd names, hostile entries);
they are then loaded into the Docker engine (the flattening oracle) or pushed to registries with
skopeo (a real client), or read by hpcconv as `oci:` sources.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class T:
    """One tar member for `make_tar`: T('etc/x', data=b'..'), T('d', 'dir'), T('l', 'sym', link='x')."""

    name: str
    kind: str = "file"          # file dir sym hard char block fifo
    data: bytes = b""
    link: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = 1_600_000_000
    pax: dict = field(default_factory=dict)
    major: int = 0
    minor: int = 0


_KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
          "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


def make_tar(members: list[T], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            ti = tarfile.TarInfo(m.name)
            ti.type = _KINDS[m.kind]
            ti.mode = m.mode if m.mode is not None else (0o755 if m.kind == "dir" else 0o644)
            ti.uid, ti.gid, ti.mtime = m.uid, m.gid, m.mtime
            ti.linkname = m.link
            ti.devmajor, ti.devminor = m.major, m.minor
            if m.pax:
                ti.pax_headers = dict(m.pax)
            if m.kind == "file":
                ti.size = len(m.data)
                tf.addfile(ti, io.BytesIO(m.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, 6, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(data)
    if how == "none":
        return data
    raise ValueError(how)


LAYER_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}


@dataclass
class BuiltImage:
    manifest: bytes
    config: bytes
    blobs: dict[str, bytes]          # digest -> bytes (config + layers + manifest)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def build_image(layers: list[bytes], *, arch: str = "amd64", variant: str = "", compression: str = "gzip",
                config: dict | None = None, docker_media_types: bool = False) -> BuiltImage:
    """An image from uncompressed layer tars. Returns manifest/config bytes and all blobs."""
    blobs: dict[str, bytes] = {}
    descs = []
    diff_ids = []
    for tar in layers:
        diff_ids.append(sha256(tar))
        comp = compress(tar, compression)
        d = sha256(comp)
        blobs[d] = comp
        mt = ("application/vnd.docker.image.rootfs.diff.tar.gzip" if docker_media_types and compression == "gzip"
              else LAYER_TYPES[compression])
        descs.append({"mediaType": mt, "digest": d, "size": len(comp)})
    cfg = {"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
           "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    if variant:
        cfg["variant"] = variant
    if config:
        cfg["config"].update(config)
    cfg_raw = json.dumps(cfg, sort_keys=True).encode()
    cd = sha256(cfg_raw)
    blobs[cd] = cfg_raw
    man = {"schemaVersion": 2,
           "mediaType": ("application/vnd.docker.distribution.manifest.v2+json" if docker_media_types
                         else "application/vnd.oci.image.manifest.v1+json"),
           "config": {"mediaType": ("application/vnd.docker.container.image.v1+json" if docker_media_types
                                    else "application/vnd.oci.image.config.v1+json"),
                      "digest": cd, "size": len(cfg_raw)},
           "layers": descs}
    man_raw = json.dumps(man, sort_keys=True).encode()
    blobs[sha256(man_raw)] = man_raw
    return BuiltImage(man_raw, cfg_raw, blobs)


def build_index(images: list[tuple[BuiltImage, dict]]) -> tuple[bytes, dict[str, bytes]]:
    """An OCI index over images with their platform dicts."""
    blobs: dict[str, bytes] = {}
    manifests = []
    for img, platform in images:
        blobs.update(img.blobs)
        manifests.append({"mediaType": json.loads(img.manifest)["mediaType"], "digest": img.digest,
                          "size": len(img.manifest), "platform": platform})
    idx = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                      "manifests": manifests}, sort_keys=True).encode()
    blobs[sha256(idx)] = idx
    return idx, blobs


def write_layout(path: Path, top: bytes, blobs: dict[str, bytes], tag: str = "latest",
                 media_type: str | None = None) -> Path:
    """Write an OCI image layout whose index.json points at `top` (a manifest or an index)."""
    path = Path(path)
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    for d, data in blobs.items():
        (path / "blobs" / "sha256" / d.split(":", 1)[1]).write_bytes(data)
    (path / "blobs" / "sha256" / sha256(top).split(":", 1)[1]).write_bytes(top)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    mt = media_type or json.loads(top).get("mediaType")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": mt, "digest": sha256(top), "size": len(top),
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    (path / "index.json").write_text(json.dumps(index))
    return path


def image_layout(path: Path, img: BuiltImage, tag: str = "latest") -> Path:
    return write_layout(path, img.manifest, img.blobs, tag)


def rootfs_dir_to_tar(root: Path) -> bytes:
    """A layer tar of a directory tree (numeric owners 0:0), sorted for reproducibility."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                full = os.path.join(dirpath, name)
                arc = os.path.relpath(full, root)
                ti = tf.gettarinfo(full, arc)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                if ti.isfile():
                    with open(full, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
    return buf.getvalue()
