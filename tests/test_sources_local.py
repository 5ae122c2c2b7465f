"""Local sources: oci: layouts, docker-archive: (classic and OCI-hybrid) and docker-daemon:.

Oracles are independent of hpcconv: the blobs ocitools wrote, `docker save` / `docker inspect` of the
real engine, and sha256 computed here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import need
from ocitools import T, build_image, build_index, image_layout, make_tar, sha256, write_layout

from hpcconv.errors import CorruptInput, SourceError
from hpcconv.image import OCI_LAYER, Platform
from hpcconv.sources import SourceOptions, open_source


def _read_all(f) -> bytes:
    out = []
    while True:
        c = f.read(1 << 16)
        if not c:
            break
        out.append(c)
    return b"".join(out)


def _opts(store_dir, **kw) -> SourceOptions:
    return SourceOptions(store_path=str(store_dir), **kw)


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


SMALL = [T("etc", "dir"), T("etc/hello", data=b"hello\n"), T("bin", "dir")]


# oci: ----------------------------------------------------------------------------------------------------
def test_oci_layout_single_manifest(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)], config={"Env": ["A=1"]})
    image_layout(tmp_path / "lay", img, tag="v1")
    for spec in (f"oci:{tmp_path / 'lay'}", f"oci:{tmp_path / 'lay'}:v1"):
        im = open_source(spec, _opts(store_dir))
        assert im.digest == img.digest
        assert im.config.raw == img.config
        assert im.source == "oci"
        man = json.loads(img.manifest)
        assert [l.digest for l in im.layers] == [d["digest"] for d in man["layers"]]
        with im.layers[0].open() as f:
            assert _read_all(f) == img.blobs[man["layers"][0]["digest"]]


def test_oci_layout_unknown_tag_and_not_a_layout(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)])
    image_layout(tmp_path / "lay", img, tag="v1")
    with pytest.raises(SourceError, match="tag 'nope' not found.*") as ei:
        open_source(f"oci:{tmp_path / 'lay'}:nope", _opts(store_dir))
    assert "v1" in ei.value.hint and ei.value.exit_code == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not an OCI image layout"):
        open_source(f"oci:{tmp_path / 'empty'}", _opts(store_dir))


def test_oci_layout_index_platform_selection(tmp_path, store_dir):
    a = build_image([make_tar(SMALL + [T("amd", data=b"a")])], arch="amd64")
    b = build_image([make_tar(SMALL + [T("arm", data=b"b")])], arch="arm64", variant="v8")
    idx, blobs = build_index([(a, {"os": "linux", "architecture": "amd64"}),
                              (b, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    write_layout(tmp_path / "lay", idx, blobs, tag="multi")
    im = open_source(f"oci:{tmp_path / 'lay'}:multi", _opts(store_dir, platform=Platform.parse("linux/arm64")))
    assert im.digest == b.digest and im.index is not None and str(im.platform) == "linux/arm64"
    im = open_source(f"oci:{tmp_path / 'lay'}", _opts(store_dir, platform=Platform.parse("amd64")))
    assert im.digest == a.digest
    with pytest.raises(SourceError, match="no image for platform linux/s390x"):
        open_source(f"oci:{tmp_path / 'lay'}", _opts(store_dir, platform=Platform.parse("linux/s390x")))


def test_oci_layout_index_json_with_platform_entries(tmp_path, store_dir):
    """index.json itself listing per-platform manifests (as containerd exports do), no tag given."""
    a = build_image([make_tar(SMALL)], arch="amd64")
    b = build_image([make_tar(SMALL)], arch="arm64")
    lay = tmp_path / "lay"
    image_layout(lay, a)
    for d, data in b.blobs.items():
        (lay / "blobs" / "sha256" / d.split(":")[1]).write_bytes(data)
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": x.digest, "size": len(x.manifest),
         "platform": {"os": "linux", "architecture": arch}} for x, arch in ((a, "amd64"), (b, "arm64"))]}
    (lay / "index.json").write_text(json.dumps(index))
    im = open_source(f"oci:{lay}", _opts(store_dir, platform=Platform.parse("linux/arm64")))
    assert im.digest == b.digest


def test_oci_single_manifest_wrong_explicit_platform(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)], arch="arm64")
    image_layout(tmp_path / "lay", img)
    # no --platform: a single-platform image is taken whatever the host is
    assert str(open_source(f"oci:{tmp_path / 'lay'}", _opts(store_dir)).platform) == "linux/arm64"
    with pytest.raises(SourceError, match="is a linux/arm64 image"):
        open_source(f"oci:{tmp_path / 'lay'}", _opts(store_dir, platform=Platform.parse("linux/amd64")))


def _blob(lay: Path, digest: str) -> Path:
    return lay / "blobs" / "sha256" / digest.split(":")[1]


def test_oci_corrupt_layer_detected_while_reading(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)])
    lay = image_layout(tmp_path / "lay", img)
    ld = json.loads(img.manifest)["layers"][0]["digest"]
    data = bytearray(_blob(lay, ld).read_bytes())
    data[-1] ^= 0xFF
    _blob(lay, ld).write_bytes(bytes(data))
    im = open_source(f"oci:{lay}", _opts(store_dir))  # opening is fine: sizes match
    with pytest.raises(CorruptInput, match="does not match its content"):
        with im.layers[0].open() as f:
            _read_all(f)


def test_oci_truncated_layer_detected_at_open(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)])
    lay = image_layout(tmp_path / "lay", img)
    ld = json.loads(img.manifest)["layers"][0]["digest"]
    _blob(lay, ld).write_bytes(_blob(lay, ld).read_bytes()[:-10])
    with pytest.raises(CorruptInput, match="descriptor says"):
        open_source(f"oci:{lay}", _opts(store_dir))


def test_oci_missing_blob_is_source_error(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)])
    lay = image_layout(tmp_path / "lay", img)
    _blob(lay, json.loads(img.manifest)["layers"][0]["digest"]).unlink()
    with pytest.raises(SourceError, match="missing"):
        open_source(f"oci:{lay}", _opts(store_dir))


def test_cli_corrupt_config_exit_4(tmp_path, store_dir):
    img = build_image([make_tar(SMALL)])
    lay = image_layout(tmp_path / "lay", img)
    cfg = json.loads(img.manifest)["config"]["digest"]
    _blob(lay, cfg).write_bytes(_blob(lay, cfg).read_bytes().replace(b"amd64", b"amd65"))
    r = _cli("inspect", f"oci:{lay}")
    assert r.returncode == 4, r.stderr
    assert "does not match its content" in r.stderr and "Traceback" not in r.stderr


def test_cli_corrupt_layer_exit_4(tmp_path, store_dir):
    img = build_image([make_tar(SMALL + [T("big", data=os.urandom(200_000))])])
    lay = image_layout(tmp_path / "lay", img)
    ld = json.loads(img.manifest)["layers"][0]["digest"]
    data = bytearray(_blob(lay, ld).read_bytes())
    data[len(data) // 2] ^= 0x01
    _blob(lay, ld).write_bytes(bytes(data))
    r = _cli("export", f"oci:{lay}", "-o", str(tmp_path / "out.tar"))
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.tar").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tar")]


# docker-archive: classic -------------------------------------------------------------------------------
def _docker_save(engine, tmp_path: Path, *names: str) -> Path:
    out = tmp_path / f"save-{uuid.uuid4().hex[:6]}.tar"
    engine.run("save", "-o", str(out), *names)
    return out


@pytest.mark.docker
def test_docker_archive_classic_round_trip(docker_engine, docker_busybox, busybox_amd64, tmp_path, store_dir):
    archive = _docker_save(docker_engine, tmp_path, docker_busybox)
    with tarfile.open(archive) as tf:       # the layout really is the classic one
        names = tf.getnames()
    assert "manifest.json" in names and any(n.endswith("/layer.tar") for n in names)
    image_id = docker_engine.run("inspect", "--format", "{{.Id}}", docker_busybox).stdout.decode().strip()
    im = open_source(f"docker-archive:{archive}", _opts(store_dir))
    assert im.manifest.config.digest == image_id
    assert im.source == "docker-archive"
    # the layer is the uncompressed tar the busybox image was built from
    src_layer = gzip.decompress(busybox_amd64.blobs[json.loads(busybox_amd64.manifest)["layers"][0]["digest"]])
    assert [l.digest for l in im.layers] == [sha256(src_layer)]
    assert im.layers[0].media_type == OCI_LAYER
    with im.layers[0].open() as f:
        assert _read_all(f) == src_layer
    # blobs went into the store; the image is tagged there
    assert (store_dir / "blobs" / "sha256" / image_id.split(":")[1]).is_file()
    idx = json.loads((store_dir / "index.json").read_text())
    refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in idx["manifests"]]
    assert f"docker-archive:{archive.resolve()}" in refs
    assert not list((store_dir / "tmp").glob("ingest-*"))
    # a second read reuses the stored blobs (same inode, not rewritten) and gives the same manifest
    blob = store_dir / "blobs" / "sha256" / sha256(src_layer).split(":")[1]
    ino = blob.stat().st_ino
    im2 = open_source(f"docker-archive:{archive}:{docker_busybox}", _opts(store_dir))
    assert im2.digest == im.digest and blob.stat().st_ino == ino


@pytest.mark.docker
def test_docker_archive_gzipped_and_ref_selection(docker_engine, docker_busybox, busybox_amd64, tmp_path, store_dir):
    other = docker_engine.build(_ctx(tmp_path, f"FROM {docker_busybox}\nRUN echo two > /two\n"),
                                f"hpcconv-test/two:{uuid.uuid4().hex[:6]}")
    try:
        archive = _docker_save(docker_engine, tmp_path, docker_busybox, other)
        gz = tmp_path / "both.tar.gz"
        gz.write_bytes(gzip.compress(archive.read_bytes(), 1))
        with pytest.raises(SourceError, match="holds 2 images"):
            open_source(f"docker-archive:{gz}", _opts(store_dir))
        im = open_source(f"docker-archive:{gz}:{other}", _opts(store_dir))
        assert len(im.layers) == 2
        oid = docker_engine.run("inspect", "--format", "{{.Id}}", other).stdout.decode().strip()
        assert im.manifest.config.digest == oid
        im = open_source(f"docker-archive:{archive}:docker.io/{docker_busybox}", _opts(store_dir))
        assert len(im.layers) == 1
        with pytest.raises(SourceError, match="is not in"):
            open_source(f"docker-archive:{archive}:nope:1", _opts(store_dir))
    finally:
        docker_engine.run("rmi", "-f", other, check=False)


def _classic_archive(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return buf.getvalue()


def test_docker_archive_skopeo_symlink_variant(tmp_path, store_dir):
    """skopeo's docker-archive: layers at the root, `<id>/layer.tar` symlinks to them."""
    layer = make_tar(SMALL)
    img = build_image([layer])
    cfg_hex = json.loads(img.manifest)["config"]["digest"].split(":")[1]
    lhex = sha256(layer).split(":")[1]
    man = [{"Config": f"{cfg_hex}.json", "RepoTags": ["x/y:1"], "Layers": [f"abc/layer.tar"]}]
    data = _classic_archive({f"{lhex}.tar": layer, f"{cfg_hex}.json": img.config,
                             "manifest.json": json.dumps(man).encode()}, {"abc/layer.tar": f"../{lhex}.tar"})
    (tmp_path / "s.tar").write_bytes(data)
    im = open_source(f"docker-archive:{tmp_path / 's.tar'}", _opts(store_dir))
    assert [l.digest for l in im.layers] == [sha256(layer)]


def test_docker_archive_layer_not_matching_diff_id(tmp_path, store_dir):
    layer = make_tar(SMALL)
    img = build_image([layer])
    cfg_hex = json.loads(img.manifest)["config"]["digest"].split(":")[1]
    evil = make_tar(SMALL + [T("etc/evil", data=b"x")])
    man = [{"Config": f"{cfg_hex}.json", "RepoTags": ["x/y:1"], "Layers": ["abc/layer.tar"]}]
    (tmp_path / "s.tar").write_bytes(_classic_archive({"abc/layer.tar": evil, f"{cfg_hex}.json": img.config,
                                                        "manifest.json": json.dumps(man).encode()}))
    r = _cli("inspect", f"docker-archive:{tmp_path / 's.tar'}", env={"HPCCONV_STORE": str(store_dir)})
    assert r.returncode == 4, r.stderr
    assert "diff_id" in r.stderr


@pytest.mark.docker
def test_docker_archive_truncated(docker_engine, docker_busybox, tmp_path, store_dir):
    archive = _docker_save(docker_engine, tmp_path, docker_busybox)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises((CorruptInput, SourceError)) as ei:
        open_source(f"docker-archive:{cut}", _opts(store_dir))
    assert ei.value.exit_code in (3, 4)
    assert not list((store_dir / "tmp").glob("ingest-*"))


# docker-archive: OCI-hybrid (Docker 25+) ------------------------------------------------------------------
def docker25_archive(layers: list[bytes], tag: str, *, arch: str = "amd64", corrupt: bool = False) -> tuple[bytes, str]:
    """A `docker save` archive as Docker 25+ (graphdriver store) writes it (moby
    daemon/internal/image/tarexport/save.go):

        blobs/sha256/<diffid>     uncompressed layer tars (mediaType application/vnd.oci.image.layer.v1.tar)
        blobs/sha256/<imageid>    the image config
        blobs/sha256/<manifest>   a generated OCI manifest
        index.json                OCI index; entries annotated io.containerd.image.name (full name)
                                  and org.opencontainers.image.ref.name (the tag)
        manifest.json             [{"Config": "blobs/sha256/<hex>", "RepoTags": [...],
                                    "Layers": ["blobs/sha256/<hex>", ...], "LayerSources": {}}]
        oci-layout, repositories
    Returns the archive bytes and the manifest digest."""
    cfg = {"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": [sha256(l) for l in layers]},
           "history": [{"created_by": "x"}]}
    cfg_raw = json.dumps(cfg).encode()
    man = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(cfg_raw),
                      "size": len(cfg_raw)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(l), "size": len(l)}
                      for l in layers]}
    man_raw = json.dumps(man).encode()
    repo, t = tag.rsplit(":", 1)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(man_raw),
                            "size": len(man_raw),
                            "annotations": {"io.containerd.image.name": f"docker.io/{repo}:{t}",
                                            "org.opencontainers.image.ref.name": t}}]}
    files: dict[str, bytes] = {}
    for l in layers:
        files["blobs/sha256/" + sha256(l).split(":")[1]] = (l[:-1] + b"\x01") if corrupt else l
    files["blobs/sha256/" + sha256(cfg_raw).split(":")[1]] = cfg_raw
    files["blobs/sha256/" + sha256(man_raw).split(":")[1]] = man_raw
    files["index.json"] = json.dumps(index).encode()
    files["manifest.json"] = json.dumps([{"Config": "blobs/sha256/" + sha256(cfg_raw).split(":")[1],
                                          "RepoTags": [tag],
                                          "Layers": ["blobs/sha256/" + sha256(l).split(":")[1] for l in layers],
                                          "LayerSources": {}}]).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    files["repositories"] = json.dumps({repo: {t: sha256(layers[-1]).split(":")[1]}}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for d in ("blobs/", "blobs/sha256/"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), sha256(man_raw)


def test_docker_archive_oci_hybrid(tmp_path, store_dir):
    l1, l2 = make_tar(SMALL), make_tar([T("etc/two", data=b"2")])
    data, mdigest = docker25_archive([l1, l2], "hpcconv/hybrid:1.0")
    (tmp_path / "h.tar").write_bytes(data)
    for spec in ("", ":hpcconv/hybrid:1.0", ":docker.io/hpcconv/hybrid:1.0", ":1.0"):
        im = open_source(f"docker-archive:{tmp_path / 'h.tar'}{spec}", _opts(store_dir))
        assert im.digest == mdigest       # the archive's own manifest, not one we made
        assert [l.digest for l in im.layers] == [sha256(l1), sha256(l2)]
        with im.layers[1].open() as f:
            assert _read_all(f) == l2
    with pytest.raises(SourceError):
        open_source(f"docker-archive:{tmp_path / 'h.tar'}:other:2", _opts(store_dir))


def test_docker_archive_oci_hybrid_corrupt_blob_exit_4(tmp_path, store_dir):
    data, _ = docker25_archive([make_tar(SMALL)], "hpcconv/hybrid:1.0", corrupt=True)
    (tmp_path / "h.tar").write_bytes(data)
    r = _cli("inspect", f"docker-archive:{tmp_path / 'h.tar'}", env={"HPCCONV_STORE": str(store_dir)})
    assert r.returncode == 4, r.stderr
    assert "does not match its content" in r.stderr
    assert not [p for p in (store_dir / "blobs" / "sha256").iterdir()
                if hashlib.sha256(p.read_bytes()).hexdigest() != p.name]


@pytest.mark.docker
def test_docker_archive_loads_into_docker_like_ours(docker_engine, tmp_path, store_dir):
    """The hybrid layout we mimic is accepted by the real engine's `docker load` too (20.10 reads
    manifest.json), so the test archive is not something only our reader understands."""
    tag = f"hpcconv-test/hybrid:{uuid.uuid4().hex[:6]}"
    data, _ = docker25_archive([make_tar(SMALL)], tag)
    docker_engine.run("load", input=data)
    try:
        assert docker_engine.run("image", "inspect", tag).returncode == 0
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


# docker-daemon: ------------------------------------------------------------------------------------------
def _ctx(tmp_path: Path, dockerfile: str) -> Path:
    d = tmp_path / f"ctx-{uuid.uuid4().hex[:6]}"
    d.mkdir()
    (d / "Dockerfile").write_text(dockerfile)
    return d


@pytest.mark.docker
def test_docker_daemon_round_trip(docker_engine, docker_busybox, tmp_path, store_dir, monkeypatch):
    tag = f"hpcconv-test/daemon:{uuid.uuid4().hex[:6]}"
    docker_engine.build(_ctx(tmp_path, f"FROM {docker_busybox}\nENV GREETING=hi\nWORKDIR /work\n"
                                       "RUN echo built > /work/out\nCMD [\"cat\", \"/work/out\"]\n"), tag)
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    try:
        info = json.loads(docker_engine.run("inspect", tag).stdout)[0]
        im = open_source(f"docker-daemon:{tag}", _opts(store_dir))
        assert im.source == "docker-daemon"
        assert im.manifest.config.digest == info["Id"]
        assert "GREETING=hi" in im.config.env and im.config.workdir == "/work"
        assert [l.digest for l in im.layers] == info["RootFS"]["Layers"]   # uncompressed: digest == diff_id
        with im.layers[-1].open() as f:
            with tarfile.open(fileobj=io.BytesIO(_read_all(f))) as tf:
                assert tf.extractfile("work/out").read() == b"built\n"
        # second time: served from the store (same manifest), without another `docker save`
        import docker.api.client

        def no_save(*a, **kw):
            raise AssertionError("the image was saved again although the store has it")

        with monkeypatch.context() as m:
            m.setattr(docker.api.client.APIClient, "get_image", no_save)
            im2 = open_source(f"docker-daemon:{tag}", _opts(store_dir))
        assert im2.digest == im.digest
        # same image through `docker save` + docker-archive gives the same manifest digest
        archive = _docker_save(docker_engine, tmp_path, tag)
        assert open_source(f"docker-archive:{archive}", _opts(store_dir)).digest == im.digest
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


@pytest.mark.docker
def test_docker_daemon_errors(docker_engine, store_dir, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", docker_engine.host)
    with pytest.raises(SourceError, match="not in the Docker engine"):
        open_source("docker-daemon:hpcconv-test/does-not-exist:1", _opts(store_dir))
    r = _cli("inspect", "docker-daemon:hpcconv-test/does-not-exist:1", env={"DOCKER_HOST": docker_engine.host})
    assert r.returncode == 3 and "Traceback" not in r.stderr
    r = _cli("inspect", "docker-daemon:busybox:latest", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert r.returncode == 3, r.stderr
    assert "cannot reach the Docker engine" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.docker
def test_daemon_and_archive_stream_without_buffering(docker_engine, docker_busybox, tmp_path, store_dir):
    """A 160 MB image goes through docker-daemon: and docker-archive: with a peak RSS far below its size."""
    tag = f"hpcconv-test/big:{uuid.uuid4().hex[:6]}"
    docker_engine.build(_ctx(tmp_path, f"FROM {docker_busybox}\nRUN head -c 160000000 /dev/urandom > /big\n"), tag)
    try:
        archive = _docker_save(docker_engine, tmp_path, tag)
        # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's high-water mark across
        # fork+exec into ru_maxrss, so a big pytest process would be measured instead of the child
        code = ("import re, sys; from hpcconv.sources import open_source, SourceOptions; "
                "im = open_source(sys.argv[1], SourceOptions(store_path=sys.argv[2])); "
                "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
                "print(len(im.layers), hwm // 1024)")
        for spec, store in ((f"docker-daemon:{tag}", store_dir / "a"), (f"docker-archive:{archive}", store_dir / "b")):
            r = subprocess.run([sys.executable, "-c", code, spec, str(store)], capture_output=True, text=True,
                               env={**os.environ, "DOCKER_HOST": docker_engine.host})
            assert r.returncode == 0, r.stderr
            layers, rss_mib = map(int, r.stdout.split())
            assert layers == 2
            assert rss_mib < 120, f"{spec}: peak RSS {rss_mib} MiB for a 160 MB image"
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


def test_docker_archive_containerd_store_layout(tmp_path, store_dir):
    """Docker with the containerd image store: index.json -> the full multi-platform index, compressed
    distribution layers, blobs of platforms that were not pulled left out (WithSkipMissing)."""
    a = build_image([make_tar(SMALL + [T("amd", data=b"a")])], arch="amd64", compression="gzip")
    b = build_image([make_tar(SMALL + [T("arm", data=b"b")])], arch="arm64", compression="zstd")
    idx, blobs = build_index([(a, {"os": "linux", "architecture": "amd64"}),
                              (b, {"os": "linux", "architecture": "arm64"})])
    files = {f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items() if d not in b.blobs}
    files["blobs/sha256/" + sha256(b.manifest).split(":")[1]] = b.manifest      # manifest kept, layers missing
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha256(idx), "size": len(idx),
         "annotations": {"io.containerd.image.name": "docker.io/library/multi:1",
                         "org.opencontainers.image.ref.name": "1"}}]}).encode()
    files["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    files["manifest.json"] = b"[]"
    (tmp_path / "c.tar").write_bytes(_classic_archive(files))
    im = open_source(f"docker-archive:{tmp_path / 'c.tar'}:multi:1", _opts(store_dir, platform=Platform.parse("amd64")))
    assert im.digest == a.digest and im.index is not None
    assert im.layers[0].media_type.endswith("+gzip")
    with pytest.raises(SourceError, match="missing"):
        open_source(f"docker-archive:{tmp_path / 'c.tar'}", _opts(store_dir, platform=Platform.parse("arm64")))


@pytest.mark.docker
def test_docker_archive_from_a_pipe(docker_engine, docker_busybox, tmp_path, store_dir):
    """`docker save IMG | hpcconv export docker-archive:/dev/stdin`: streamed, nothing staged."""
    save = subprocess.Popen(["docker", "-H", docker_engine.host, "save", docker_busybox], stdout=subprocess.PIPE)
    r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "export", "docker-archive:/dev/stdin",
                        "-o", str(tmp_path / "root.tar")], stdin=save.stdout, capture_output=True, text=True)
    save.stdout.close()
    assert save.wait() == 0
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "root.tar") as tf:
        assert tf.getmember("bin/busybox").isfile()
    refs = json.loads((store_dir / "index.json").read_text())["manifests"]
    assert refs == []          # no store tag for a pipe


# written by a real third-party tool -------------------------------------------------------------------------
@pytest.mark.docker
def test_layouts_written_by_skopeo(docker_engine, docker_busybox, busybox_amd64, tmp_path, store_dir):
    """skopeo (containers/image) writes the OCI layout and its own docker-archive variant (layers at
    the root, `<id>/layer.tar` symlinks); skopeo inspect is the oracle for what they contain."""
    skopeo = need("skopeo")
    archive = _docker_save(docker_engine, tmp_path, docker_busybox)
    lay = tmp_path / "lay"

    def sk(*args) -> bytes:
        return subprocess.run([skopeo, *args], capture_output=True, check=True).stdout

    sk("copy", "-q", f"docker-archive:{archive}", f"oci:{lay}:v1")
    im = open_source(f"oci:{lay}:v1", _opts(store_dir))
    assert im.digest == sha256(sk("inspect", "--raw", f"oci:{lay}:v1"))
    assert im.config.raw == sk("inspect", "--config", "--raw", f"oci:{lay}:v1")
    src_layer = gzip.decompress(busybox_amd64.blobs[json.loads(busybox_amd64.manifest)["layers"][0]["digest"]])
    with im.layers[0].open() as f:
        from hpcconv.compression import open_decompressed

        assert _read_all(open_decompressed(f)) == src_layer

    skarch = tmp_path / "skopeo.tar"
    sk("copy", "-q", f"oci:{lay}:v1", f"docker-archive:{skarch}:x/y:1")
    with tarfile.open(skarch) as tf:
        assert any(m.issym() and m.name.endswith("/layer.tar") for m in tf)   # really the symlink variant
    im2 = open_source(f"docker-archive:{skarch}:x/y:1", _opts(store_dir))
    assert im2.config.raw == sk("inspect", "--config", "--raw", f"docker-archive:{skarch}")
    assert [l.digest for l in im2.layers] == im2.config.diff_ids == [sha256(src_layer)]
