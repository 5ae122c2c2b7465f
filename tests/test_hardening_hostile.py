"""Issue 8 hostile input: crafted layers and manifests through the real CLI.

Each case is an OCI layout (or docker-archive / registry manifest) written by tests/ocitools.py
(independently of hpcconv). The outcome is one of:

* exit 4 with a one-line message naming the layer (`layer N/M`) and the entry (or the document
  and the field, for manifests and configs), with nothing written to the output path; or
* where the Docker engine accepts the image, the flattened rootfs equals `docker export` of it
  (the oracle, tests/flattools.compare) — these are in DOCKER_ACCEPTS below.

Every target (charliecloud dir/tar/squashfs, singularity sif/sandbox, shifter) then converts an
image holding all the accepted hostile entries at once, and must keep everything inside its root
and write nothing outside the output directory (canary checks).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import need
from ocitools import T, build_image, image_layout, make_tar, sha256, write_layout

CLI_TIMEOUT = 120


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=CLI_TIMEOUT)


def _tars(layers) -> list[bytes]:
    return [ls if isinstance(ls, bytes) else make_tar(ls) for ls in layers]


def layout(tmp: Path, layers: list, name: str = "img", **kw) -> str:
    img = build_image(_tars(layers), **kw)
    return f"oci:{image_layout(tmp / name, img, 't')}:t"


BASE = [T("etc", "dir"), T("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"), T("bin", "dir"),
        T("bin/sh", data=b"#!fake\n", mode=0o755), T("tmp", "dir", mode=0o1777)]


def pax_bomb_member(size: int) -> bytes:
    return make_tar([T("big-pax", data=b"x", pax={"comment": "A" * size})])


def many_pax_headers(n: int) -> bytes:
    """One member preceded by n local PAX headers of 1 MiB each (they add up for one member)."""
    buf = io.BytesIO()
    for i in range(n):
        rec = _pax_record("comment", "B" * (1 << 20))
        hdr = tarfile.TarInfo("././@PaxHeader")
        hdr.type = tarfile.XHDTYPE
        hdr.size = len(rec)
        buf.write(hdr.tobuf(tarfile.USTAR_FORMAT))
        buf.write(rec + b"\0" * (-len(rec) % 512))
    buf.write(make_tar([T("after-headers", data=b"y")]))
    return buf.getvalue()


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body)
    while True:
        rec = str(n).encode() + body
        if len(rec) == n:
            return rec
        n = len(rec)


def bad_checksum_tar() -> bytes:
    data = bytearray(make_tar([T("ok", data=b"1"), T("tampered", data=b"2")]))
    data[512 * 2 + 10] ^= 0x01            # second member's header, inside its name field
    return bytes(data)


# name -> (layers, substrings the one-line error must contain)
REFUSED = {
    "dotdot-climbs-out": ([BASE + [T("../../outside/evil", data=b"x")]], ["layer 1/1", "../../outside/evil", ".."]),
    "dotdot-nested-climbs-out": ([BASE + [T("a", "dir"), T("a/../../evil", data=b"x")]], ["layer 1/1", "a/../../evil"]),
    "hardlink-outside-root": ([BASE + [T("pw", "hard", link="../../../etc/shadow")]], ["layer 1/1", "'pw'"]),
    "hardlink-to-whiteout-deleted-same-layer": (
        [BASE + [T("secret", data=b"key")], [T(".wh.secret"), T("leak", "hard", link="secret")]],
        ["layer 2/2", "'leak'", "whiteout deleted"]),
    "hardlink-to-whiteout-deleted-earlier-layer": (
        [BASE + [T("secret", data=b"key")], [T(".wh.secret")], [T("leak", "hard", link="/secret")]],
        ["layer 3/3", "'leak'", "whiteout deleted"]),
    "hardlink-to-opaque-deleted": (
        [BASE + [T("d", "dir"), T("d/secret", data=b"key")], [T("d", "dir"), T("d/.wh..wh..opq")],
         [T("leak", "hard", link="d/secret")]],
        ["layer 3/3", "'leak'", "whiteout deleted"]),
    "hardlink-to-directory": ([BASE + [T("h", "hard", link="etc")]], ["layer 1/1", "'h'", "directory"]),
    "nul-in-name": ([BASE + [T("x", data=b"1", pax={"path": "evil\x00.txt"})]], ["layer 1/1", "evil\\x00.txt", "NUL"]),
    "nul-in-hardlink-target": ([BASE + [T("h", "hard", pax={"linkpath": "etc/passwd\x00x"})]],
                               ["layer 1/1", "'h'", "NUL"]),
    "nul-in-symlink-target": ([BASE + [T("s", "sym", pax={"linkpath": "/etc/passwd\x00x"})]],
                              ["layer 1/1", "'s'", "NUL"]),
    "huge-pax-header": ([BASE, pax_bomb_member(17 << 20)], ["layer 2/2", "header of"]),
    "pax-headers-adding-up": ([BASE, many_pax_headers(17)], ["layer 2/2", "header"]),
    "duplicate-entries": ([BASE + [T("dup", data=b"first"), T("dup", "sym", link="/etc/shadow")]],
                          ["layer 1/1", "'dup'", "appears twice"]),
    "duplicate-dirs": ([BASE + [T("dd", "dir", mode=0o700), T("dd", "dir", mode=0o755)]],
                       ["layer 1/1", "'dd'", "appears twice"]),
    "bad-tar-checksum": ([BASE, bad_checksum_tar()], ["layer 2/2", "checksum", "after entry 'ok'"]),
}

BOMB = make_tar([T("zeros", data=bytes(6 << 20))])


def test_hostile_layers_are_refused_naming_layer_and_entry(tmp_path):
    """All REFUSED cases, one CLI export each: exit 4, one line, layer and entry named, no output."""
    failures = []
    for name, (layers, needles) in REFUSED.items():
        src = layout(tmp_path, layers, name)
        out = tmp_path / f"{name}.tar"
        r = run_cli("export", src, "--raw", "-o", str(out))
        lines = r.stderr.strip().splitlines()
        ok = (r.returncode == 4 and len(lines) == 1 and lines[0].startswith("hpcconv: error:")
              and all(n in lines[0] for n in needles) and not out.exists()
              and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.tar")])
        if not ok:
            failures.append(f"{name}: rc={r.returncode} {r.stderr.strip()[:300]}")
    assert not failures, "\n".join(failures)
    assert len(REFUSED) >= 15


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_bomb_capped(tmp_path, compression):
    """6 MiB of zeros compress to a few kB; a cap of 1M (flag) or 2M (environment) refuses it while
    reading, naming the layer and the entry; the default cap lets it through."""
    src = layout(tmp_path, [BASE, BOMB], compression=compression)
    blob = max(build_image(_tars([BASE, BOMB]), compression=compression).blobs.values(), key=len)
    assert len(blob) < 64 << 10
    r = run_cli("--max-expanded", "1M", "export", src, "--raw", "-o", str(tmp_path / "o.tar"))
    assert r.returncode == 4 and "layer 2/2 (sha256:" in r.stderr and "'zeros'" in r.stderr, r.stderr
    assert "expands beyond 1048576 bytes" in r.stderr and "--max-expanded" in r.stderr
    r = run_cli("export", src, "--raw", "-o", str(tmp_path / "o.tar"), env={"HPCCONV_MAX_EXPANDED": "2M"})
    assert r.returncode == 4 and "expands beyond 2097152" in r.stderr
    assert not (tmp_path / "o.tar").exists()
    r = run_cli("export", src, "--raw", "-o", str(tmp_path / "o.tar"))
    assert r.returncode == 0, r.stderr
    r = run_cli("--max-expanded", "lots", "export", src, "-o", str(tmp_path / "p.tar"))
    assert r.returncode == 2 and "--max-expanded" in r.stderr


# manifests, configs, digests ---------------------------------------------------------------------
def _raw_layout(tmp: Path, name: str, manifest: dict | bytes, blobs: dict[str, bytes]) -> str:
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    write_layout(tmp / name, raw, blobs, "t", media_type="application/vnd.oci.image.manifest.v1+json")
    return f"oci:{tmp / name}:t"


def _manifest_cases(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    img = build_image([make_tar(BASE)])
    cases = {}

    def variant(name, mutate, needles, blobs=None):
        m = json.loads(img.manifest)
        mutate(m)
        cases[name] = (_raw_layout(tmp, name, m, blobs or dict(img.blobs)), needles)

    variant("no-layers-list", lambda m: m.pop("layers"), ["no layers list"])
    variant("malformed-layer-digest", lambda m: m["layers"][0].update(digest="sha256:xyz"),
            ["malformed digest", "sha256:xyz"])
    variant("uppercase-hex-digest", lambda m: m["layers"][0].update(digest=m["layers"][0]["digest"].upper()
                                                                      .replace("SHA256", "sha256")),
            ["malformed digest"])
    variant("unsupported-digest-algorithm", lambda m: m["layers"][0].update(digest="blake3:" + "a" * 64),
            ["unsupported digest algorithm", "blake3"])
    variant("negative-layer-size", lambda m: m["layers"][0].update(size=-1), ["invalid size"])
    variant("config-digest-malformed", lambda m: m["config"].update(digest="sha256:" + "g" * 64),
            ["malformed digest"])
    # a config that claims to be small but is 300 MB on disk (sparse): read with a cap, never whole
    big = tmp / "bigcfg"
    cfg_digest = "sha256:" + "c" * 64
    variant("config-hundreds-of-mb", lambda m: m["config"].update(digest=cfg_digest, size=300 << 20),
            ["config", "limit"])
    # the manifest itself: 300 MB of JSON whitespace (a sparse file of spaces is not possible, so
    # the descriptor in index.json says 300 MB and the file is sparse zeros)
    name = "manifest-hundreds-of-mb"
    d = tmp / name
    write_layout(d, img.manifest, dict(img.blobs), "t")
    mpath = d / "blobs" / "sha256" / sha256(img.manifest).split(":")[1]
    with open(mpath, "r+b") as f:
        f.truncate(300 << 20)
    idx = json.loads((d / "index.json").read_text())
    idx["manifests"][0]["size"] = 300 << 20
    (d / "index.json").write_text(json.dumps(idx))
    cases[name] = (f"oci:{d}:t", ["limit"])
    name = "manifest-size-lies"
    d = tmp / name
    write_layout(d, img.manifest, dict(img.blobs), "t")
    mpath = d / "blobs" / "sha256" / sha256(img.manifest).split(":")[1]
    with open(mpath, "r+b") as f:
        f.truncate(300 << 20)                  # index.json still says the real (small) size
    cases[name] = (f"oci:{d}:t", ["manifest"])
    # docker-archive: a manifest.json whose tar header says 300 MB (the bytes need not follow: the
    # cap is checked before reading)
    hdr = tarfile.TarInfo("manifest.json")
    hdr.size = 300 << 20
    arch = tmp / "huge-manifest-json.tar"
    arch.write_bytes(hdr.tobuf(tarfile.USTAR_FORMAT) + b"[" + b" " * 10_000)
    cases["docker-archive-manifest-json-300mb"] = (f"docker-archive:{arch}", ["manifest.json", "limit"])
    del big
    return cases


def test_hostile_manifests_and_configs(tmp_path):
    import time

    failures = []
    for name, (src, needles) in _manifest_cases(tmp_path).items():
        t0 = time.monotonic()
        r = run_cli("export", src, "--raw", "-o", str(tmp_path / f"{name}.tar"))
        took = time.monotonic() - t0
        line = r.stderr.strip()
        if not (r.returncode == 4 and "\n" not in line and all(n in line for n in needles) and took < 20
                and not (tmp_path / f"{name}.tar").exists()):
            failures.append(f"{name}: rc={r.returncode} {took:.1f}s {line[:300]}")
    assert not failures, "\n".join(failures)


def test_registry_manifest_of_hundreds_of_mb_is_cut_while_reading(plain_registry, plain_images, test_certs,
                                                                  tmp_path, store_dir):
    """The proxy pads the manifest with 300 MB of JSON whitespace and sends no Content-Length: the
    client stops reading at its 8 MiB cap (the proxy sees the connection go), exit 4."""
    import time

    from registryfix import LoopbackProxy, clean_env

    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.pad_manifest, proxy.omit_length = 300 << 20, True
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "hpcconv.cli", "pull", f"docker://{proxy.host_port}/test/busybox:amd64",
                            "--ca-cert", str(test_certs.ca)], capture_output=True, text=True, timeout=120,
                           env=clean_env(HPCCONV_STORE=store_dir, HOME=tmp_path))
        assert r.returncode == 4, r.stderr
        assert "byte limit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 30
    finally:
        proxy.stop()


# accepted by Docker: equal to docker export ------------------------------------------------------
DOCKER_ACCEPTS = {
    "absolute-names": [BASE + [T("/abs", "dir"), T("/abs/file", data=b"A"), T("//double//slash", data=b"B")]],
    "dotdot-inside-root": [BASE + [T("a", "dir"), T("a/b", "dir"), T("a/b/../c", data=b"C")]],
    "device-nodes": [BASE + [T("devs", "dir"), T("devs/sda", "block", major=8, minor=0, mode=0o666),
                             T("devs/mem", "char", major=1, minor=1, mode=0o666), T("fifo", "fifo")]],
    "setuid-root-binaries": [BASE + [T("bin/su", data=b"#!su\n", mode=0o4755),
                                     T("bin/wall", data=b"#!wall\n", mode=0o2755, gid=5),
                                     T("bin/all", data=b"#!all\n", mode=0o7777)]],
    "newline-and-odd-names": [BASE + [T("new\nline", data=b"nl"), T("tab\there", data=b"t"),
                                      T("caf\udce9", data=b"latin1"), T("-rf", data=b"dash")]],
    "symlinks-pointing-outside": [BASE + [T("shadow", "sym", link="/etc/shadow"), T("up", "sym", link="../../../.."),
                                          T("hs", "hard", link="shadow")]],
    "empty-layers-list": [],          # FROM scratch with only metadata: an empty root file system
    "planted-symlink-leading-nowhere": [BASE + [T("x", "sym", link="../../../../nonexistent")],
                                        [T("x/evil", data=b"inside")]],
}


def _docker_tree(docker_engine, img, tag):
    from flattools import docker_tree

    docker_engine.load(img, tag)
    return docker_tree(docker_engine.export(tag))


@pytest.mark.docker
def test_docker_accepted_cases_match_docker(docker_engine, tmp_path):
    from flattools import compare, tree_of_tar

    failures = []
    for name, layers in DOCKER_ACCEPTS.items():
        img = build_image(_tars(layers))
        src = f"oci:{image_layout(tmp_path / name, img, 't')}:t"
        out = tmp_path / f"{name}.tar"
        r = run_cli("export", src, "--raw", "-o", str(out))
        if r.returncode != 0:
            failures.append(f"{name}: exit {r.returncode}: {r.stderr.strip()}")
            continue
        ours = tree_of_tar(out.read_bytes())
        theirs = _docker_tree(docker_engine, img, f"hpcconv-hostile/{name}:t")
        if not layers and ours:
            failures.append(f"{name}: not empty: {sorted(ours)[:5]}")
        diffs = compare(ours, theirs)
        if diffs:
            failures.append(f"{name}: {diffs[:5]}")
    assert not failures, "\n".join(failures)


def test_planted_symlink_parent_stays_inside_root(tmp_path):
    """`x -> /etc` in layer 1, `x/evil` in layer 2: hpcconv resolves the parent inside the root
    (chroot semantics, flatten.py; Docker on overlay2 hides the symlink behind a new directory,
    see test_flatten_docker.py::test_symlinked_parent_is_followed). Either way nothing leaves the
    root: the file lands in the image's own /etc."""
    src = layout(tmp_path, [BASE + [T("x", "sym", link="/etc")], [T("x/evil", data=b"inside")]])
    out = tmp_path / "o.tar"
    r = run_cli("export", src, "--raw", "-o", str(out))
    assert r.returncode == 0, r.stderr
    names = tarfile.open(out).getnames()
    assert "etc/evil" in names and all(not n.startswith(("/", "../")) and "/../" not in n for n in names)


# every target keeps hostile-but-accepted content inside its root --------------------------------
def _all_accepted_layers() -> list[bytes]:
    layers = [make_tar(BASE + [T("x", "sym", link="/etc"), T("up", "sym", link="../../../../.."),
                               T("abs", "sym", link="/"), T("tmp/canary-link", "sym", link="CANARY")])]
    for ls in DOCKER_ACCEPTS.values():
        if ls:
            layers.append(make_tar(ls[-1]))
    layers.append(make_tar([T("x/via-symlink", data=b"inside"), T("up/climb", data=b"inside"),
                            T("abs/etc/abs-file", data=b"inside")]))
    return layers


TARGETS = [("charliecloud", "dir"), ("charliecloud", "tar"), ("charliecloud", "squashfs"),
           ("singularity", "sif"), ("singularity", "sandbox"), ("shifter", "squashfs")]


def _names_in_tar(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def _names_in_squashfs(path: Path) -> list[str]:
    r = subprocess.run([need("sqfs2tar"), "--no-skip", str(path)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return tarfile.open(fileobj=io.BytesIO(r.stdout)).getnames()


def _check_names(names: list[str]) -> None:
    for n in names:
        parts = n.split("/")
        assert not n.startswith("/") and ".." not in parts, n


def _check_tree(root: Path) -> None:
    root_real = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):      # never follows symlinks
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            assert os.path.realpath(os.path.dirname(p)).startswith(root_real), p
            st = os.lstat(p)
            if not os.path.islink(p) and os.path.isfile(p):
                assert st.st_nlink < 10, p


@pytest.mark.parametrize("target,fmt", TARGETS, ids=[f"{t}-{f}" for t, f in TARGETS])
def test_every_target_keeps_hostile_content_inside(target, fmt, tmp_path, store_dir):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "precious").write_text("keep")
    layers = _all_accepted_layers()
    layers[0] = make_tar(BASE + [T("x", "sym", link="/etc"), T("up", "sym", link="../../../../.."),
                                 T("abs", "sym", link="/"), T("c", "sym", link=str(canary))])
    layers[-1] = make_tar([T("x/via-symlink", data=b"inside"), T("up/climb", data=b"inside"),
                           T("abs/etc/abs-file", data=b"inside"), T("c/pwned", data=b"inside")])
    src = layout(tmp_path / "src", layers)
    outdir = tmp_path / "out"
    outdir.mkdir()
    passwd = Path("/etc/passwd")
    before = (passwd.stat().st_mtime_ns, passwd.stat().st_nlink, passwd.read_bytes())
    out = outdir / ("image" + {"dir": "", "sandbox": "", "tar": ".tar.gz", "squashfs": ".sqfs", "sif": ".sif"}[fmt])
    r = run_cli("--quiet", "convert", src, "--target", target, "--format", fmt, "-o", str(out),
                env={"HPCCONV_STORE": str(store_dir)})
    assert r.returncode in (0, 1), r.stderr                 # 1: a check failed (e.g. no shell) - still written
    assert sorted(os.listdir(canary)) == ["precious"] and (canary / "precious").read_text() == "keep"
    assert (passwd.stat().st_mtime_ns, passwd.stat().st_nlink, passwd.read_bytes()) == before
    produced = sorted(p.name for p in outdir.iterdir())
    assert produced and all(n.startswith("image") for n in produced), produced
    if fmt in ("dir", "sandbox"):
        _check_tree(out)
        assert not (out / "c").is_dir() or (out / "c").is_symlink() or (out / "c" / "pwned").exists()
    elif fmt == "tar":
        _check_names(_names_in_tar(out))
    elif fmt == "squashfs":
        # shifter: -o is a directory receiving <id>.squashfs and <id>.meta
        files = [out] if out.is_file() else sorted(out.glob("*.squashfs"))
        assert files
        for f in files:
            _check_names(_names_in_squashfs(f))
    else:
        assert out.stat().st_size > 0
