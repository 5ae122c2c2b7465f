"""Shifter output: `<id>.squashfs` + `<id>.meta`. The meta file is read by a reader written here from
the runtime's parsing rules (src/utility.c shifter_parseConfig, src/ImageData.c _ImageData_assign), not
with hpcconv's code; the squashfs runs under ch-run with the ENV from the meta file and must behave
like `docker run` of the source image; with `shifter` installed it is also run by Shifter."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WORK, need
from siftools import ch_run, chrun_env, hpcconv, squashfs_tree

pytestmark = [pytest.mark.docker, pytest.mark.chrun]

ID_CHARS = re.compile(r"^[A-Za-z0-9_:.+@-]+$")


# an independent reader of Shifter's .meta -----------------------------------------------------------------
def read_meta(text: str) -> dict:
    """KEY: value lines split at the first ':', both sides whitespace-trimmed, '#' comments, a value
    ending in a backslash continued on the next line (joined with a space); ENV repeatable; ENTRY and
    CMD parsed like is_json_array + the element scanner (elements between single quotes)."""
    out: dict = {"ENV": [], "unknown": []}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        key, sep, value = line.partition(":")
        assert sep, f"meta line without ':' {line!r}"
        key, value = key.strip(), value.strip()
        if key == "ENV":
            out["ENV"].append(value)
        elif key in ("ENTRY", "CMD"):
            assert value.startswith("['") or value.startswith("[u'"), f"{key} is not a list Shifter parses: {value}"
            out[key] = re.findall(r"'([^']*)'", value)
        elif key in ("FORMAT", "WORKDIR", "USERACL", "GROUPACL", "VOLUME"):
            out[key] = value
        else:
            out["unknown"].append(key)
    return out


def meta_env(meta: dict) -> dict:
    return dict(item.split("=", 1) for item in meta["ENV"])


ENV_LINE = ('ENV A="with space" B=\'dollar $x\' C="back\\\\slash" D="" G="a=b=c" H="it\'s" '
            'PATH=/opt/bin:/usr/local/bin:/usr/bin:/bin\n')
DOCKERFILE = (ENV_LINE +
              "RUN mkdir -p /opt/bin /opt/data && printf '#!/bin/sh\\necho tool \"$@\"\\n' > /opt/bin/tool && "
              "chmod 700 /opt/bin/tool && echo secret > /opt/data/model && chmod 600 /opt/data/model && "
              "chmod 700 /opt/data\n"
              "WORKDIR /opt/data\n"
              'ENTRYPOINT ["/opt/bin/tool", "ep"]\n'
              'CMD ["tool", "a b", "$HOME", "x\\\\y"]\n')
SHOW = 'for v in A B C D G H PATH; do eval "printf \'%s=[%s]\\n\' $v \\"\\${$v-unset}\\""; done; cat /opt/data/model'


@pytest.fixture(scope="module")
def shifter_image(docker_engine, docker_busybox, tmp_path_factory):
    ctx = tmp_path_factory.mktemp("shctx")
    (ctx / "Dockerfile").write_text(f"FROM {docker_busybox}\n{DOCKERFILE}")
    tag = docker_engine.build(ctx, "hpcconv-test/shifter:1")
    out = tmp_path_factory.mktemp("shout") / "images"
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(out.parent / "store")}
    r = hpcconv("--json", "convert", f"docker-daemon:{tag}", "--target", "shifter", "-o", str(out), env=env)
    return tag, out, json.loads(r.stdout), env


def expected_id(squashfs: Path, meta: bytes, piece: int = 64 << 20) -> str:
    """The id as documented: hpcconv- + sha256(sha256 of each `piece` bytes of the squashfs, in
    order, + NUL + the meta text), computed here in one thread."""
    data = squashfs.read_bytes()
    digests = b"".join(hashlib.sha256(data[i:i + piece]).digest() for i in range(0, len(data), piece))
    return "hpcconv-" + hashlib.sha256(digests + b"\0" + meta).hexdigest()


def test_id_of_many_pieces(tmp_path, monkeypatch):
    """Pieces hashed in parallel, combined in file order; the meta text counts too."""
    from hpcconv.emit import shifter

    f = tmp_path / "x.squashfs"
    f.write_bytes(os.urandom(10 * 4096 + 123))
    monkeypatch.setattr(shifter, "ID_PIECE", 4096)
    got = shifter.make_id(f, b"FORMAT: squashfs\n")
    assert got == expected_id(f, b"FORMAT: squashfs\n", 4096)
    assert got != expected_id(f, b"FORMAT: squashfs\nCMD: ['x']\n", 4096)
    assert got != "hpcconv-" + hashlib.sha256(f.read_bytes() + b"\0FORMAT: squashfs\n").hexdigest()


def test_files_and_id(shifter_image):
    _, out, res, _ = shifter_image
    sid = res["shifter_id"]
    assert ID_CHARS.match(sid) and not re.fullmatch(r"[0-9a-f]{64}", sid)    # never a gateway-style id
    assert sid == expected_id(out / f"{sid}.squashfs", (out / f"{sid}.meta").read_bytes())
    assert sorted(p.name for p in out.iterdir()) == [f"{sid}.meta", f"{sid}.squashfs"]
    assert (out / f"{sid}.squashfs").read_bytes()[:4] == b"hsqs"
    assert f"shifter --image=id:{sid}" in res["note"] and "imagePath" in res["note"]
    assert res["run"].startswith(f"shifter --image=id:{sid}")


def test_meta_parses_as_shifter_reads_it(shifter_image, docker_engine):
    tag, out, res, _ = shifter_image
    text = (out / f"{res['shifter_id']}.meta").read_text()
    meta = read_meta(text)
    assert meta["unknown"] == []                     # no key the runtime would warn about on every run
    assert meta["FORMAT"] == "squashfs"
    cfg = json.loads(docker_engine.run("image", "inspect", tag).stdout)[0]["Config"]
    assert meta["ENTRY"] == cfg["Entrypoint"] and meta["CMD"] == cfg["Cmd"]
    assert meta["WORKDIR"] == "/opt/data"
    assert meta["ENV"] == cfg["Env"]
    assert text.splitlines()[0] == "FORMAT: squashfs"


def test_squashfs_runs_under_chrun_with_meta_env(shifter_image, docker_engine):
    """Shifter puts the meta ENV into the container's environment and runs CMD (ENTRYPOINT only with
    --entrypoint): the same under ch-run must match docker run --entrypoint '' IMAGE CMD."""
    tag, out, res, _ = shifter_image
    sid = res["shifter_id"]
    meta = read_meta((out / f"{sid}.meta").read_text())
    env = chrun_env(meta_env(meta))
    sq = out / f"{sid}.squashfs"
    got = ch_run(sq, "sh", "-c", SHOW, env=env)
    want = docker_engine.run("run", "--rm", "--network", "none", "--entrypoint", "sh", tag, "-c", SHOW)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    got = ch_run(sq, *meta["CMD"], env=env)
    want = docker_engine.run("run", "--rm", "--network", "none", "--entrypoint", "", tag, *meta["CMD"])
    assert got.stdout == want.stdout == b"tool a b $HOME x\\y\n"
    got = ch_run(sq, *meta["ENTRY"], *meta["CMD"], env=env)             # shifter --entrypoint
    assert got.stdout == docker_engine.run("run", "--rm", "--network", "none", tag).stdout


def test_gateway_style_fixups(shifter_image):
    """Owners root, no xattrs, a+rX (the runtime runs as the calling user), no /dev content."""
    _, out, res, _ = shifter_image
    tree = squashfs_tree(out / f"{res['shifter_id']}.squashfs")
    assert all(d["uid"] == 0 and d["gid"] == 0 for d in tree.values())
    assert tree["opt/data/model"]["mode"] == 0o644 and tree["opt/data"]["mode"] == 0o755
    assert tree["opt/bin/tool"]["mode"] == 0o755
    assert not [p for p in tree if p.startswith("dev/")]
    for d in ("etc", "var", "opt", "tmp", "proc", "sys", "dev", "home"):
        assert tree[d]["type"] == "dir"
    kinds = {c["kind"]: c for c in res["changes"]}
    assert "/opt/data/model" in kinds["file-a+r"]["examples"]


def test_unprivileged_user_can_read_everything(shifter_image):
    """Checked by the kernel: unpack the squashfs where user 65534 can reach it and run ch-run as it."""
    _, out, res, _ = shifter_image
    meta = read_meta((out / f"{res['shifter_id']}.meta").read_text())
    base = WORK / "perm-tests"
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    root = base / f"sh-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        r = subprocess.run([need("unsquashfs"), "-q", "-d", str(root), str(out / f"{res['shifter_id']}.squashfs")],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        got = subprocess.run([need("setpriv"), "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              need("ch-run"), str(root), "--", *meta["CMD"]], capture_output=True,
                             env=chrun_env({**meta_env(meta), "USER": "nobody"}))
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"tool a b $HOME x\\y\n"
        got = subprocess.run([need("setpriv"), "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              need("ch-run"), str(root), "--", "cat", "/opt/data/model"], capture_output=True,
                             env=chrun_env({"USER": "nobody"}))
        assert got.stdout == b"secret\n", got.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_same_image_same_id(shifter_image, tmp_path):
    tag, _, res, env = shifter_image
    again = json.loads(hpcconv("--json", "convert", f"docker-daemon:{tag}", "--target", "shifter", "-o",
                               str(tmp_path / "again"), env=env).stdout)
    assert again["shifter_id"] == res["shifter_id"]


def test_unencodable_entry_is_left_out_and_reported(docker_engine, docker_busybox, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {docker_busybox}\nENTRYPOINT [\"echo\", \"it's\"]\nCMD [\"ok\"]\n"
                                    "ENV TRAIL=\"ends with \\\\\\\\\"\n")
    tag = docker_engine.build(ctx, "hpcconv-test/shifter-quote:1")
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(tmp_path / "store")}
    res = json.loads(hpcconv("--json", "convert", f"docker-daemon:{tag}", "--target", "shifter", "-o",
                             str(tmp_path / "o"), env=env).stdout)
    meta = read_meta((tmp_path / "o" / f"{res['shifter_id']}.meta").read_text())
    assert "ENTRY" not in meta and meta["CMD"] == ["ok"]
    chk = [c for c in res["checks"] if c["name"] == "shifter meta"][0]
    assert chk["status"] == "warn" and "ENTRY left out" in chk["detail"] and "TRAIL" in chk["detail"]


def test_output_must_be_a_directory(tmp_path, shifter_image):
    tag, _, _, env = shifter_image
    f = tmp_path / "file"
    f.write_text("x")
    r = hpcconv("convert", f"docker-daemon:{tag}", "--target", "shifter", "-o", str(f), env=env, check=False)
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = hpcconv("convert", f"docker-daemon:{tag}", "--target", "shifter", "--format", "dir", "-o",
                str(tmp_path / "d"), env=env, check=False)
    assert r.returncode == 2


def test_shifter_runs_the_image(shifter_image):
    if not shutil.which("shifter"):
        pytest.skip("shifter is not installed (not installable here); the image is run by ch-run instead")
    pytest.skip("running through Shifter needs the image in the site's imagePath (root, udiRoot.conf); "
                f"install the files as the note says and run: {shifter_image[2]['run']}")


def test_image_without_path_gets_dockers_default(tmp_path, store_dir):
    """docker run gives an image without PATH Docker's default one; the meta says so explicitly
    (Shifter would otherwise keep the host's PATH)."""
    from dockertools import busybox_layer
    from ocitools import build_image, image_layout

    img = build_image([busybox_layer("amd64", WORK / "debs")], config={"Env": ["A=1"], "Cmd": ["sh"]})
    assert json.loads(img.config)["config"]["Env"] == ["A=1"]
    d = image_layout(tmp_path / "nopath", img)
    res = json.loads(hpcconv("--json", "convert", f"oci:{d}", "--target", "shifter", "-o", str(tmp_path / "o"),
                             "--compression", "zstd").stdout)
    meta = read_meta((tmp_path / "o" / f"{res['shifter_id']}.meta").read_text())
    assert meta["ENV"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=1"]
    comp = [c for c in res["checks"] if c["name"] == "compression"][0]
    assert comp["status"] == "warn" and "zstd" in comp["detail"]
