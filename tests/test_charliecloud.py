"""The Charliecloud emitter: fix-ups, /ch metadata, and images that the real `ch-run` runs.

Oracles: `ch-run` itself (dir, squashfs; tar through `ch-convert`), `sqfs2tar`/`unsquashfs`, GNU tar,
expectations for /ch/metadata.json written out literally here from ch-image 0.31's rules
(docs/reference/charliecloud.md), and the Docker engine for the image built from a Dockerfile.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import stat
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

from conftest import need
from ocitools import T, build_image, image_layout, make_tar

from hpcconv.emit import charliecloud
from hpcconv.entries import read_tar_entries
from hpcconv.harness.checks import PASS, WARN
from hpcconv.image import Image, ImageConfig
from hpcconv.sources import SourceOptions, open_source

OUTPUT_NAMES = {"dir": "img", "tar": "img.tar.gz", "squashfs": "img.sqfs"}
MOUNTS = ["dev", "proc", "sys", "tmp", "home", "mnt"] + [f"mnt/{i}" for i in range(10)]


def chrun(img: Path, *cmd: str, opts: tuple = (), check: bool = True) -> subprocess.CompletedProcess:
    exe = need("ch-run")
    r = subprocess.run([exe, *opts, str(img), "--", *cmd], capture_output=True, text=True,
                       env={**os.environ, "USER": os.environ.get("USER") or "root"}, timeout=120)
    if check:
        assert r.returncode == 0, f"ch-run failed ({r.returncode}): {r.stderr}"
    return r


def runnable(out: Path, fmt: str, tmp_path: Path) -> Path:
    """What ch-run runs: the dir or squashfs itself; a tar.gz is unpacked by Charliecloud's ch-convert."""
    if fmt != "tar":
        return out
    d = tmp_path / f"from-tar-{uuid.uuid4().hex[:6]}"
    r = subprocess.run([need("ch-convert"), str(out), str(d)], capture_output=True, text=True,
                       env={**os.environ, "USER": "root"})
    assert r.returncode == 0, r.stderr
    return d


def convert(image: Image, out: Path, fmt: str, **kw):
    from hpcconv.flatten import Flattener

    flat = Flattener(image)
    res = charliecloud.emit(flat.entries(), image, out, fmt=fmt, **kw)
    return res, flat


def image_of(tmp_path: Path, built, store) -> Image:
    lay = tmp_path / f"lay-{uuid.uuid4().hex[:6]}"
    image_layout(lay, built)
    return open_source(f"oci:{lay}", SourceOptions(store_path=str(store)))


def one_layer_image(members, config: dict | None = None, **kw) -> Image:
    """An Image over an in-memory single-layer tar, for emitter-only tests (no flattening)."""
    from hpcconv.image import Manifest

    b = build_image([make_tar(members)], config=config, **kw)
    man = Manifest.parse(b.manifest)
    return Image("test", man, ImageConfig.parse(b.config), [])


def emit_stream(members, out: Path, fmt: str = "dir", config: dict | None = None, **kw):
    img = one_layer_image(members, config)
    return charliecloud.emit(read_tar_entries(io.BytesIO(make_tar(members))), img, out, fmt=fmt, **kw)


# metadata ------------------------------------------------------------------------------------------------
FULL_CONFIG = {
    "architecture": "arm64", "variant": "v8", "os": "linux",
    "config": {"Env": ["PATH=/opt/app/bin:/bin", "APP_HOME=/opt/app", "EMPTY=", "PATH=/override:/bin",
                       "WITH_EQ=a=b"],
               "WorkingDir": "/opt/app", "Labels": {"org.x": "1"}, "Shell": ["/bin/bash", "-c"],
               "Volumes": {"/data": {}, "/var/cache/app": {}}, "Entrypoint": ["/bin/app"], "Cmd": ["--help"],
               "User": "1000"},
    "rootfs": {"type": "layers", "diff_ids": []},
    "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "/bin/sh -c #(nop) WORKDIR /opt/app",
                 "empty_layer": True}],
}

# What ch-image 0.31 writes for FULL_CONFIG (metadata_init + metadata_merge_from_config + metadata_save):
FULL_METADATA = """{
  "arch": "arm64",
  "arg": {
    "FAKEROOTDONTTRYCHOWN": "1",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "TAR_OPTIONS": "--no-same-owner"
  },
  "cwd": "/opt/app",
  "env": {
    "APP_HOME": "/opt/app",
    "EMPTY": "",
    "PATH": "/override:/bin",
    "WITH_EQ": "a=b"
  },
  "history": [
    {
      "created": "2024-01-01T00:00:00Z",
      "created_by": "/bin/sh -c #(nop) WORKDIR /opt/app",
      "empty_layer": true
    }
  ],
  "labels": {
    "org.x": "1"
  },
  "shell": [
    "/bin/bash",
    "-c"
  ],
  "volumes": [
    "/data",
    "/var/cache/app"
  ]
}
"""
FULL_ENVIRONMENT = "APP_HOME=/opt/app\nEMPTY=\nPATH=/override:/bin\nWITH_EQ=a=b\n"


def test_metadata_files_exactly_as_ch_image(tmp_path):
    cfg_raw = json.dumps(FULL_CONFIG).encode()
    config = ImageConfig.parse(cfg_raw)
    assert charliecloud.metadata_json(config).decode() == FULL_METADATA
    env, bad = charliecloud.parse_env(config.env)
    assert charliecloud.environment_file(env).decode() == FULL_ENVIRONMENT
    assert charliecloud.environment0_file(env) == FULL_ENVIRONMENT.replace("\n", "\0").encode()
    # and in an emitted image, next to the raw config
    members = [T("bin", "dir"), T("etc", "dir")]
    res = emit_stream(members, tmp_path / "img", config=None)
    out = tmp_path / "img2"
    img = one_layer_image(members)
    img.config = config
    charliecloud.emit(read_tar_entries(io.BytesIO(make_tar(members))), img, out, fmt="dir")
    assert (out / "ch/metadata.json").read_text() == FULL_METADATA
    assert (out / "ch/environment").read_text() == FULL_ENVIRONMENT
    assert (out / "ch/config.pulled.json").read_bytes() == cfg_raw
    assert (out / "data").is_dir() and (out / "var/cache/app").is_dir()     # VOLUMEs mkdir'ed
    assert res.run_hint.startswith("ch-run --set-env ")


def test_metadata_defaults():
    config = ImageConfig.parse(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                                           "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    md = json.loads(charliecloud.metadata_json(config))
    assert md == {"arch": "amd64", "arg": {"FAKEROOTDONTTRYCHOWN": "1",
                                           "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                           "TAR_OPTIONS": "--no-same-owner"},
                  "cwd": "/", "env": {}, "history": [], "labels": {}, "shell": ["/bin/sh", "-c"], "volumes": []}
    assert charliecloud.environment_file({}) == b"\n"


def test_run_hint_and_script():
    config = ImageConfig.parse(json.dumps(FULL_CONFIG).encode())
    assert charliecloud.run_hint(config, Path("/x/img.sqfs"), "squashfs") == \
        "ch-run --set-env -c /opt/app /x/img.sqfs -- /bin/app --help"
    assert charliecloud.run_hint(config, Path("/x/img.tar.gz"), "tar") == \
        "ch-convert /x/img.tar.gz /x/img && ch-run --set-env -c /opt/app /x/img -- /bin/app --help"
    script = charliecloud.run_script(config).decode()
    assert "cd /opt/app" in script and "set -- --help" in script and 'exec /bin/app "$@"' in script


def test_environment_warnings(tmp_path):
    res = emit_stream([T("bin", "dir")], tmp_path / "img",
                      config={"Env": ["ML=a\nb", "Q='quoted'", "P=$HOME:/bin"], "User": "nobody"})
    checks = {c.name: c for c in res.checks.items}
    env = checks["environment"]
    assert env.status == WARN and "ML holds a newline" in env.detail and "Q is wrapped" in env.detail \
        and "P has a ':'-item" in env.detail
    assert checks["user"].status == WARN
    assert (tmp_path / "img/ch/environment0").read_bytes().split(b"\0")[0] == b"ML=a\nb"


# fix-ups -------------------------------------------------------------------------------------------------
HOSTILE_ISH = [
    T("bin", "dir", uid=1000, gid=1000), T("bin/su", data=b"x", mode=0o4755), T("bin/sg", data=b"y", mode=0o2711),
    T("bin/noperm", data=b"z", mode=0o000), T("locked", "dir", mode=0o500), T("locked/f", data=b"f", mode=0o444),
    T("dev", "dir"), T("dev/null", "char", major=1, minor=3), T("dev/shm", "dir"), T("dev/shm/x", data=b"x"),
    T("fifo", "fifo"), T("sda", "block", major=8, minor=0), T("hl-to-fifo", "hard", link="fifo"),
    T("etc", "dir"), T("etc/resolv.conf", "sym", link="../run/systemd/resolve/stub-resolv.conf"),
    T("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n", uid=5, gid=5),
    T("ch", "dir"), T("ch/metadata.json", data=b"{stale}"), T("ch/keep", data=b"mine"),
    T("tmp", "dir", mode=0o1777),
    T("abs", "sym", link="/etc/passwd"),
]


def test_fixups_dir(tmp_path):
    out = tmp_path / "img"
    res = emit_stream(HOSTILE_ISH, out)
    changes = {c["kind"]: c for c in res.changes}
    assert all(isinstance(c["count"], int) and c["examples"] for c in res.changes)
    # owners: bin (1000) and etc/passwd (5) normalised; on disk all root
    assert changes["owner"]["count"] == 2 and set(changes["owner"]["examples"]) == {"/bin", "/etc/passwd"}
    for dirpath, dirnames, filenames in os.walk(out):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert (st.st_uid, st.st_gid) == (0, 0)
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), n
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode), n
    assert changes["setid-cleared"]["count"] == 2
    assert stat.S_IMODE(os.lstat(out / "bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(out / "bin/sg").st_mode) == 0o711 | 0o600
    assert stat.S_IMODE(os.lstat(out / "bin/noperm").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(out / "locked").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(out / "locked/f").st_mode) == 0o644
    assert stat.S_IMODE(os.lstat(out / "tmp").st_mode) == 0o1777          # sticky kept
    # devices, FIFOs and everything under dev/ dropped; /dev itself kept (empty)
    assert os.listdir(out / "dev") == []
    assert not os.path.lexists(out / "fifo") and not os.path.lexists(out / "sda")
    assert not os.path.lexists(out / "hl-to-fifo")
    assert changes["special-dropped"]["count"] == 2 and changes["dev-content-dropped"]["count"] == 3
    assert changes["hardlink-dropped"]["count"] == 1
    # an existing resolv.conf symlink is kept as it is, never followed or replaced
    assert os.readlink(out / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert not os.path.lexists(out / "run")
    assert (out / "etc/passwd").read_bytes() == b"root:x:0:0::/:/bin/sh\n"     # existing kept
    assert (out / "etc/hosts").read_bytes() == b"" and (out / "etc/group").read_bytes() == b""
    for m in MOUNTS:
        assert (out / m).is_dir() and not (out / m).is_symlink(), m
    # /ch: ours replaces the stale metadata, other files there stay
    assert json.loads((out / "ch/metadata.json").read_text())["arch"] == "amd64"
    assert (out / "ch/keep").read_bytes() == b"mine" and changes["ch-replaced"]["count"] == 1
    assert os.readlink(out / "abs") == "/etc/passwd"
    checks = {c.name: c for c in res.checks.items}
    assert checks["/etc/resolv.conf"].status == WARN
    assert checks["ch-run mount points"].status == PASS


def test_mount_point_symlink_is_reported_not_replaced(tmp_path):
    res = emit_stream([T("var", "dir"), T("var/tmp", "dir", mode=0o1777), T("tmp", "sym", link="var/tmp"),
                       T("mnt", "sym", link="media")], tmp_path / "img")
    out = tmp_path / "img"
    assert os.readlink(out / "tmp") == "var/tmp" and os.readlink(out / "mnt") == "media"
    assert not (out / "media").exists()
    c = {c.name: c for c in res.checks.items}["ch-run mount points"]
    assert c.status == WARN and "/tmp is a symlink" in c.detail and "/mnt is a symlink" in c.detail


def test_fixups_tar_and_squashfs_agree_with_dir(tmp_path):
    """The same stream gives the same tree in all three formats (tar read with GNU tar, squashfs with
    sqfs2tar)."""
    need("tar2sqfs")
    trees = {}
    for fmt in ("dir", "tar", "squashfs"):
        out = tmp_path / OUTPUT_NAMES[fmt]
        emit_stream(HOSTILE_ISH, out, fmt=fmt)
        if fmt == "dir":
            data = subprocess.run(["tar", "-C", str(out), "-cf", "-", "--numeric-owner", "."],
                                  capture_output=True, check=True).stdout
        elif fmt == "tar":
            assert out.read_bytes()[:2] == b"\x1f\x8b"
            data = subprocess.run(["gzip", "-dc", str(out)], capture_output=True, check=True).stdout
        else:
            assert out.read_bytes()[:4] == b"hsqs"
            data = subprocess.run([need("sqfs2tar"), str(out)], capture_output=True, check=True).stdout
        tree = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            for ti in tf:
                name = ti.name.lstrip("./").rstrip("/")
                if name:
                    tree[name] = (ti.type if ti.type != tarfile.LNKTYPE else tarfile.REGTYPE,
                                  0o777 if ti.issym() else ti.mode & 0o7777, ti.uid, ti.gid,
                                  ti.linkname if ti.issym() else "")
        trees[fmt] = tree
    assert trees["dir"] == trees["tar"] == trees["squashfs"]


# the real ch-run ---------------------------------------------------------------------------------------------
BUSYBOX_CONFIG = {"Env": ["PATH=/bin:/usr/bin", "GREETING=hello from hpcconv", "SPACES=a b  c"],
                  "WorkingDir": "/srv", "Entrypoint": ["/bin/echo"], "Cmd": ["cmd-from-image"]}


@pytest.mark.chrun
@pytest.mark.parametrize("fmt", ["dir", "tar", "squashfs"])
def test_busybox_runs_under_ch_run(tmp_path, deb_cache, store_dir, fmt):
    need("ch-run")
    from dockertools import busybox_image

    built = busybox_image("amd64", deb_cache, config=BUSYBOX_CONFIG)
    image = image_of(tmp_path, built, store_dir)
    out = tmp_path / OUTPUT_NAMES[fmt]
    res, flat = convert(image, out, fmt)
    assert not res.checks.failed and not flat.checks.failed
    img = runnable(out, fmt, tmp_path)
    r = chrun(img, "/bin/sh", "-c", "echo ran-$((6*7)); ls /ch; id -u")
    assert r.stdout.split()[0] == "ran-42" and "metadata.json" in r.stdout
    # the image's ENV with --set-env (from /ch/environment), not without
    r = chrun(img, "/bin/sh", "-c", 'echo "$GREETING|$SPACES"', opts=("--set-env",))
    assert r.stdout == "hello from hpcconv|a b  c\n"
    r = chrun(img, "/bin/sh", "-c", 'echo "[$GREETING]"', opts=("--unset-env=GREETING",))
    assert r.stdout == "[]\n"
    # /ch/run.sh applies WORKDIR + ENTRYPOINT + CMD; the missing WORKDIR /srv was created
    assert chrun(img, "/ch/run.sh", opts=("--set-env",)).stdout == "cmd-from-image\n"
    assert chrun(img, "/bin/pwd", opts=("-c", "/srv")).stdout == "/srv\n"
    r = chrun(img, "/bin/sh", "-c", "cat /ch/metadata.json")
    md = json.loads(r.stdout)
    assert md["env"] == {"PATH": "/bin:/usr/bin", "GREETING": "hello from hpcconv", "SPACES": "a b  c"}
    assert md["cwd"] == "/srv" and md["arch"] == "amd64" and len(md) == 8
    assert res.run_hint.endswith(" -- /bin/echo cmd-from-image")


@pytest.mark.chrun
def test_run_hint_and_run_script_work(tmp_path, deb_cache, store_dir):
    """The printed ch-run line, executed as printed, runs the image's ENTRYPOINT+CMD in WORKDIR."""
    need("ch-run")
    need("tar2sqfs")
    from dockertools import busybox_image

    extra = make_tar([T("work", "dir"), T("work/greet", data=b'#!/bin/sh\necho "in $(pwd): $MSG $*"\n', mode=0o755)])
    built = busybox_image("amd64", deb_cache, extra_layers=[extra],
                          config={"Env": ["PATH=/bin", "MSG=hi"], "WorkingDir": "/work",
                                  "Entrypoint": ["/work/greet"], "Cmd": ["default-arg"]})
    out = tmp_path / "g.sqfs"
    res, _ = convert(image_of(tmp_path, built, store_dir), out, "squashfs", compression="zstd")  # squashfuse reads zstd
    r = subprocess.run(res.run_hint, shell=True, capture_output=True, text=True, env={**os.environ, "USER": "root"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == "in /work: hi default-arg\n"
    r = chrun(out, "/ch/run.sh", opts=("--set-env",))
    assert r.stdout == "in /work: hi default-arg\n"
    r = chrun(out, "/ch/run.sh", "other", "args", opts=("--set-env",))
    assert r.stdout == "in /work: hi other args\n"


def test_squashfs_contents_with_independent_readers(tmp_path, deb_cache, store_dir):
    need("tar2sqfs")
    from dockertools import busybox_image, busybox_layer

    built = busybox_image("amd64", deb_cache, config=BUSYBOX_CONFIG)
    out = tmp_path / "bb.sqfs"
    convert(image_of(tmp_path, built, store_dir), out, "squashfs")
    data = subprocess.run([need("sqfs2tar"), str(out)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        got = {ti.name.lstrip("./").rstrip("/"): ti for ti in tf}
    got.pop("", None)
    with tarfile.open(fileobj=io.BytesIO(busybox_layer("amd64", deb_cache))) as tf:
        layer = {ti.name.rstrip("/"): ti for ti in tf}
    added = set(MOUNTS) | {"etc/hosts", "etc/resolv.conf", "ch", "ch/metadata.json", "ch/environment",
                           "ch/environment0", "ch/config.pulled.json", "ch/run.sh", "srv"}  # srv: WORKDIR
    assert set(got) == set(layer) | added
    assert all(ti.uid == 0 and ti.gid == 0 for ti in got.values())
    assert got["bin/busybox"].size == layer["bin/busybox"].size and got["tmp"].mode & 0o7777 == 0o1777
    assert tarfile.open(fileobj=io.BytesIO(data)).extractfile("ch/config.pulled.json").read() == built.config
    lls = subprocess.run([need("unsquashfs"), "-lls", str(out)], capture_output=True, text=True, check=True).stdout
    assert "squashfs-root/bin/sh -> busybox" in lls


@pytest.mark.chrun
@pytest.mark.qemu
def test_arm64_image_runs_through_qemu(tmp_path, deb_cache, store_dir):
    need("ch-run")
    need("tar2sqfs")
    if not os.path.exists("/proc/sys/fs/binfmt_misc/qemu-aarch64"):
        msg = "binfmt qemu-aarch64 is not enabled (run scripts/setup-system.sh)"
        if os.environ.get("HPCCONV_REQUIRE_ALL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    from dockertools import busybox_image

    built = busybox_image("arm64", deb_cache)
    image = image_of(tmp_path, built, store_dir)
    assert str(image.platform) == "linux/arm64"
    for fmt in ("squashfs", "dir"):
        out = tmp_path / OUTPUT_NAMES[fmt]
        res, _ = convert(image, out, fmt)
        assert json.loads(chrun(out, "/bin/cat", "/ch/metadata.json").stdout)["arch"] == "arm64"
        assert chrun(out, "/bin/uname", "-m").stdout.strip() == "aarch64"


@pytest.mark.chrun
@pytest.mark.docker
def test_cli_convert_from_docker_daemon(docker_engine, docker_busybox, tmp_path, store_dir):
    """Dockerfile -> Docker engine -> hpcconv convert docker-daemon: -> ch-run, through the CLI."""
    need("ch-run")
    need("tar2sqfs")
    tag = f"hpcconv-test/chconv:{uuid.uuid4().hex[:6]}"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {docker_busybox}\nENV APP=/opt/app\nWORKDIR /opt/app\n"
        "RUN echo 'echo app says $APP from $(pwd)' > run.sh && chown 123:456 run.sh && chmod 4755 run.sh\n"
        "VOLUME /data\nCMD [\"/bin/sh\", \"/opt/app/run.sh\"]\n")
    docker_engine.build(ctx, tag)
    try:
        out = tmp_path / "app.sqfs"
        env = {**os.environ, "DOCKER_HOST": docker_engine.host, "USER": "root"}
        r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "--json", "convert", f"docker-daemon:{tag}",
                            "--format", "squashfs", "-o", str(out)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        kinds = {c["kind"]: c["count"] for c in result["changes"]}
        assert kinds.get("setid-cleared") == 1 and kinds.get("owner", 0) >= 1
        assert result["run"] == f"ch-run --set-env -c /opt/app {out} -- /bin/sh /opt/app/run.sh"
        r = subprocess.run(result["run"], shell=True, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "app says /opt/app from /opt/app\n"
        assert chrun(out, "/bin/sh", "-c", "test -d /data && echo vol").stdout == "vol\n"
        # refusing to overwrite without --force (exit 2), then replacing with it
        r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "convert", f"docker-daemon:{tag}",
                            "--format", "dir", "-o", str(out)], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and "already exists" in r.stderr
        assert out.read_bytes()[:4] == b"hsqs"
    finally:
        docker_engine.run("rmi", "-f", tag, check=False)


def test_tar_format_name_check(tmp_path):
    res = emit_stream([T("bin", "dir")], tmp_path / "img.tar", fmt="tar")
    assert {c.name: c.status for c in res.checks.items}["output name"] == WARN
    res = emit_stream([T("bin", "dir")], tmp_path / "img.tar.gz", fmt="tar")
    assert "output name" not in {c.name for c in res.checks.items}
    with tarfile.open(tmp_path / "img.tar.gz", "r:gz") as tf:
        assert "ch/metadata.json" in tf.getnames()


@pytest.mark.chrun
def test_ch_image_builds_from_our_image(tmp_path, deb_cache, store_dir):
    """Charliecloud's own builder as the oracle for /ch/metadata.json: `ch-image import` our tar.gz,
    then `ch-image build` FROM it: RUN sees the image's ENV and WORKDIR only if ch-image parsed our
    metadata (it ignores the config; it reads /ch/metadata.json)."""
    need("ch-image")
    from dockertools import busybox_image

    extra = make_tar([T("srv", "dir"), T("srv/app", "dir")])
    built = busybox_image("amd64", deb_cache, extra_layers=[extra],
                          config={"Env": ["PATH=/bin:/usr/bin", "GREETING=from metadata"], "WorkingDir": "/srv/app",
                                  "Labels": {"org.example": "yes"}})
    out = tmp_path / "img.tar.gz"
    convert(image_of(tmp_path, built, store_dir), out, "tar")
    env = {**os.environ, "USER": "root", "CH_IMAGE_STORAGE": str(tmp_path / "chstore")}
    chimage = ["/usr/bin/python3", need("ch-image")]     # Debian's ch-image needs the system python (lark)
    r = subprocess.run([*chimage, "import", str(out), "hpcconv-import"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "Dockerfile").write_text('FROM hpcconv-import\nRUN echo "got: $GREETING in $(pwd)"\n')
    r = subprocess.run([*chimage, "build", "--no-cache", "-t", "hpcconv-child", "-f", str(tmp_path / "Dockerfile"),
                        str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "got: from metadata in /srv/app" in r.stdout + r.stderr
    child = tmp_path / "chstore" / "img" / "hpcconv-child" / "ch" / "metadata.json"
    md = json.loads(child.read_text())
    assert md["labels"] == {"org.example": "yes"} and md["env"]["GREETING"] == "from metadata"
