"""Issue 6: offline bundles, end to end through the CLI with real components.

Oracles: a second docker-registry started and stopped here by PID (the round trip runs with it
gone), `ch-run` executing the converted image, Python's tarfile reading the container (test-side
offsets for tampering), skopeo pulling what `hpcconv push` published, and pip installing the
wheelhouse in a fresh virtualenv with no index."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import need
from ocitools import T, build_image, image_layout, make_tar, sha256, write_layout
from registryfix import Registry, clean_env, inspect_raw, push_layout, skopeo

EM_X86_64, EM_AARCH64 = 62, 183


def hpc(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def benv(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=home, HPCCONV_STORE=tmp_path / "store-create")
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "HPCCONV_PASSWORD", "HPCCONV_USERNAME", "HPCCONV_OFFLINE",
              "HPCCONV_BUNDLE_KEY"):
        env.pop(k, None)
    return env


def tar_members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def tree_hashes(store: Path) -> dict[str, str]:
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and (rel.startswith("blobs/") or rel in ("index.json", "oci-layout")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


# a small multi-layer image as an OCI layout (no registry needed) -----------------------------------
def small_layout(d: Path, layers: list[bytes] | None = None, tag: str = "t"):
    layers = layers or [make_tar([T("etc", "dir"), T("etc/hello", data=b"hello\n" * 5000)]),
                        make_tar([T("opt", "dir"), T("opt/rand", data=os.urandom(300_000))]),
                        make_tar([T("srv", "dir"), T("srv/text", data=b"some text " * 20000)])]
    img = build_image(layers, compression="gzip")
    image_layout(d, img, tag)
    return img


@pytest.fixture
def keys(tmp_path, benv):
    ok(hpc("bundle", "keygen", str(tmp_path / "site"), env=benv))
    ok(hpc("bundle", "keygen", str(tmp_path / "other"), env=benv))
    assert oct((tmp_path / "site.key").stat().st_mode & 0o777) == "0o600"
    return {"key": tmp_path / "site.key", "pub": tmp_path / "site.pub", "other": tmp_path / "other.pub"}


# round trip: registry -> bundle (parts, signed) -> registry gone -> import -> convert -> ch-run ------
def docker_manifest_list(deb_cache):
    """busybox amd64 + arm64 with Docker media types under a Docker manifest list."""
    from dockertools import busybox_image

    a = busybox_image("amd64", deb_cache, docker_media_types=True)
    b = busybox_image("arm64", deb_cache, docker_media_types=True)
    mt = "application/vnd.docker.distribution.manifest.v2+json"
    idx = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
                      "manifests": [{"mediaType": mt, "digest": a.digest, "size": len(a.manifest),
                                     "platform": {"os": "linux", "architecture": "amd64"}},
                                    {"mediaType": mt, "digest": b.digest, "size": len(b.manifest),
                                     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]},
                     sort_keys=True).encode()
    return idx, {**a.blobs, **b.blobs}, a


def put_raw(reg, repo: str, tag: str, top: bytes, blobs: dict[str, bytes]) -> None:
    """Publish with plain distribution-API requests (test side, independent of hpcconv's push)."""
    import requests

    base = f"http://{reg.host}/v2/{repo}"
    s = requests.Session()
    s.trust_env = False
    docs = {}
    for d, data in blobs.items():
        mt = json.loads(data).get("mediaType", "") if data[:1] == b"{" else ""
        if "manifest" in mt:
            docs[d] = (data, mt)
            continue
        r = s.post(f"{base}/blobs/uploads/")
        assert r.status_code == 202, r.text
        loc = r.headers["Location"]
        r = s.put(loc + ("&" if "?" in loc else "?") + f"digest={d}", data=data,
                  headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
    for d, (data, mt) in docs.items():
        assert s.put(f"{base}/manifests/{d}", data=data, headers={"Content-Type": mt}).status_code == 201
    mt = json.loads(top)["mediaType"]
    assert s.put(f"{base}/manifests/{tag}", data=top, headers={"Content-Type": mt}).status_code == 201


@pytest.mark.registry
@pytest.mark.parametrize("kind", ["oci-index", "docker-manifest-list"])
def test_round_trip_multiarch_with_registry_stopped(tmp_path, benv, plain_images, keys, kind, deb_cache):
    need("tar2sqfs")
    if kind == "oci-index":
        idx, blobs = plain_images["test/multi:latest"]
        single = plain_images["amd64"]
    else:
        idx, blobs, single = docker_manifest_list(deb_cache)
    reg = Registry(tmp_path, "gone").start()
    try:
        if kind == "oci-index":
            write_layout(tmp_path / "lay-multi", idx, blobs, "t")
            push_layout(tmp_path / "lay-multi", "t", reg, "site/multi:1", all_images=True)
        else:                                   # skopeo's oci: transport will not read a Docker list
            put_raw(reg, "site/multi", "1", idx, blobs)
        assert inspect_raw(reg, "site/multi:1") == idx
        if kind == "oci-index":
            image_layout(tmp_path / "lay-amd", single, "t")
            push_layout(tmp_path / "lay-amd", "t", reg, "site/busybox:amd64")
        else:
            put_raw(reg, "site/busybox", "amd64", single.manifest, single.blobs)
        out = tmp_path / "xfer" / "apps.hpcbundle"
        out.parent.mkdir()
        r = ok(hpc("--json", "bundle", "create", f"docker://{reg.host}/site/multi:1", f"docker://{reg.host}/site/busybox:amd64",
                   "--insecure", "--platform", "linux/amd64", "--platform", "linux/arm64", "--split", "300k",
                   "--sign", str(keys["key"]), "-o", str(out), env=benv))
        res = json.loads(r.stdout)
    finally:
        reg.stop()
    assert reg.proc.poll() is not None                     # the registry process is gone
    assert res["parts"] >= 3
    multi = next(i for i in res["images"] if i["ref"].endswith("site/multi:1"))
    assert sorted(multi["platforms"]) == ["linux/amd64", "linux/arm64"]
    assert multi["digest"] == sha256(idx)                   # the original index, digest unchanged
    # the single-arch image shares all its blobs with the index's amd64 image: stored once
    with open(str(out) + ".part000") as f:
        man = json.loads(f.read().rsplit("\n", 2)[0])["manifest"]
    blob_paths = [e["path"] for e in man["files"] if e["kind"] == "blob"]
    assert len(blob_paths) == len({e["digest"] for e in man["files"] if e["kind"] == "blob"})
    expect = set(blobs) | {sha256(idx)}
    assert {e["digest"] for e in man["files"] if e["kind"] == "blob"} == expect

    ok(hpc("bundle", "verify", str(out), "--key", str(keys["pub"]), env=benv))
    site = {**benv, "HPCCONV_STORE": str(tmp_path / "site-store")}
    ok(hpc("bundle", "import", str(out) + ".part001", "--key", str(keys["pub"]), env=site))
    # convert by the image's tag with the registry gone, then run it
    sq = tmp_path / "multi.sqfs"
    ok(hpc("convert", f"docker://{reg.host}/site/multi:1", "--insecure", "--platform", "linux/amd64",
           "--target", "charliecloud", "--format", "squashfs", "-o", str(sq), env=site))
    run = subprocess.run([need("ch-run"), str(sq), "--", "/bin/echo", "offline-ok"], capture_output=True,
                         text=True, env={**site, "USER": "root"}, timeout=120)
    assert run.returncode == 0 and run.stdout == "offline-ok\n", run.stderr
    # both platforms were carried: the arm64 rootfs comes out of the store and out of the bundle itself
    for i, spec in enumerate((f"{reg.host}/site/multi:1", f"bundle:{out}:site/multi:1")):
        tar_out = tmp_path / f"arm{i}.tar"
        ok(hpc("export", spec, "--insecure", "--platform", "linux/arm64", "--raw", "-o", str(tar_out), env=site))
        with tarfile.open(tar_out) as tf:
            assert elf_machine(tf.extractfile("bin/busybox").read()) == EM_AARCH64
    # the centre forwards it (re-bundles from its store, registry still gone): it says where it came from
    r = ok(hpc("bundle", "create", f"docker://{reg.host}/site/multi:1", "--insecure", "-o",
               str(tmp_path / "again.hpcbundle"), env=site))
    assert "unreachable" in r.stderr and "imported from bundle" in r.stderr
    ok(hpc("bundle", "verify", str(tmp_path / "again.hpcbundle"), env=site))
    # a platform that was not carried is a clear error, not a network timeout
    r = hpc("export", f"bundle:{out}:site/multi:1", "--platform", "linux/s390x", "-o", str(tmp_path / "x.tar"),
            env=site)
    assert r.returncode == 3 and "s390x" in r.stderr


@pytest.mark.registry
def test_tag_fallback_only_for_bundle_imports(tmp_path, benv, plain_images):
    """A tag pulled from a registry does not silently fall back to the store when it is unreachable."""
    reg = Registry(tmp_path, "flaky").start()
    try:
        image_layout(tmp_path / "lay", plain_images["amd64"], "t")
        push_layout(tmp_path / "lay", "t", reg, "x/bb:1")
        ok(hpc("pull", f"docker://{reg.host}/x/bb:1", "--insecure", env=benv))
    finally:
        reg.stop()
    r = hpc("inspect", f"docker://{reg.host}/x/bb:1", "--insecure", env={**benv, "HPCCONV_HTTP_ATTEMPTS": "1"})
    assert r.returncode == 3, r.stderr
    r = ok(hpc("inspect", f"docker://{reg.host}/x/bb:1", env={**benv, "HPCCONV_OFFLINE": "1"}))
    assert "platform: linux/amd64" in r.stdout


# tampering -------------------------------------------------------------------------------------------
@pytest.fixture
def made(tmp_path, benv, keys):
    """A signed single-file bundle and a signed split bundle of the same small image."""
    small_layout(tmp_path / "lay")
    single, split = tmp_path / "one.hpcbundle", tmp_path / "many.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(single), "--sign", str(keys["key"]), env=benv))
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(split), "--split", "64k",
           "--sign", str(keys["key"]), env=benv))
    parts = sorted(tmp_path.glob("many.hpcbundle.part*"))
    assert len(parts) >= 5
    for p in (single, split):
        ok(hpc("bundle", "verify", str(p), "--key", str(keys["pub"]), env=benv))
    return {"single": single, "split": split, "parts": parts, **keys}


def bad(r: subprocess.CompletedProcess, *names: str) -> None:
    assert r.returncode == 4, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    for n in names:
        assert n in r.stderr, f"{n!r} not named in: {r.stderr}"


def test_flip_byte_in_blob(made, benv, tmp_path):
    members = tar_members(made["single"])
    name = max((n for n in members if n.startswith("blobs/")), key=lambda n: members[n].size)
    flip(made["single"], members[name].offset_data + members[name].size // 2)
    bad(hpc("bundle", "verify", str(made["single"]), "--key", str(made["pub"]), env=benv), name)
    r = hpc("bundle", "import", str(made["single"]), env={**benv, "HPCCONV_STORE": str(tmp_path / "s")})
    bad(r, name)
    assert json.loads((tmp_path / "s" / "index.json").read_text())["manifests"] == []   # nothing tagged


def test_flip_byte_in_member_header(made, benv):
    members = tar_members(made["single"])
    name = next(n for n in members if n.startswith("blobs/"))
    flip(made["single"], members[name].offset + 20)          # the header's name field: its checksum fails
    r = hpc("bundle", "verify", str(made["single"]), env=benv)
    bad(r, made["single"].name, f"byte {members[name].offset}")


def test_flip_byte_in_part(made, benv):
    part = made["parts"][3]
    flip(part, part.stat().st_size // 2)
    r = hpc("bundle", "verify", str(made["split"]), env=benv)
    bad(r, part.name)
    assert r.stderr.count(".part") == 1        # only the damaged part is named: only it needs re-sending


def test_flip_byte_in_manifest(made, benv):
    members = tar_members(made["single"])
    m = members["hpcbundle.json"]
    flip(made["single"], m.offset_data + 40)        # inside the body
    bad(hpc("bundle", "verify", str(made["single"]), env=benv), "hpcbundle.json")
    p0 = made["parts"][0]
    flip(p0, 30)
    bad(hpc("bundle", "verify", str(made["split"]), env=benv), p0.name)


def test_flip_byte_in_unsigned_manifest_seal_catches_it(tmp_path, benv):
    small_layout(tmp_path / "lay")
    b = tmp_path / "u.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(b), env=benv))
    m = tar_members(b)["hpcbundle.json"]
    flip(b, m.offset_data + m.size // 3)
    bad(hpc("bundle", "verify", str(b), env=benv), "hpcbundle.json")


def test_drop_part(made, benv):
    made["parts"][2].unlink()
    bad(hpc("bundle", "verify", str(made["split"]), env=benv), made["parts"][2].name, "missing")


def test_add_part(made, benv):
    last = made["parts"][-1]
    n = int(last.name.rsplit("part", 1)[1]) + 1
    extra = last.with_name(f"many.hpcbundle.part{n:03d}")
    extra.write_bytes(b"\0" * 4096)
    bad(hpc("bundle", "verify", str(made["split"]), env=benv), extra.name)


def test_reorder_parts(made, benv):
    a, b = made["parts"][1], made["parts"][2]
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    r = hpc("bundle", "verify", str(made["split"]), env=benv)
    bad(r, a.name, b.name, "out of order")


def test_renamed_split_bundle_still_verifies(made, benv, tmp_path):
    for p in made["parts"]:
        p.rename(p.with_name(p.name.replace("many.", "renamed.")))
    ok(hpc("bundle", "verify", str(tmp_path / "renamed.hpcbundle"), "--key", str(made["pub"]), env=benv))


def test_missing_part000_and_joined_parts(made, benv, tmp_path):
    joined = tmp_path / "joined.hpcbundle"
    with open(joined, "wb") as f:
        for p in made["parts"][1:]:
            f.write(p.read_bytes())
    ok(hpc("bundle", "verify", str(joined), "--key", str(made["pub"]), env=benv))   # cat of the parts is a bundle
    made["parts"][0].unlink()
    bad(hpc("bundle", "verify", str(made["parts"][1]), env=benv), made["parts"][0].name, "missing")


def test_wrong_key_and_unsigned_with_key(made, benv, tmp_path):
    bad(hpc("bundle", "verify", str(made["single"]), "--key", str(made["other"]), env=benv), "signature")
    bad(hpc("bundle", "verify", str(made["split"]), "--key", str(made["other"]), env=benv), "part000", "signature")
    bad(hpc("bundle", "import", str(made["split"]), "--key", str(made["other"]),
            env={**benv, "HPCCONV_STORE": str(tmp_path / "s")}), "signature")
    wrong = {**benv, "HPCCONV_BUNDLE_KEY": str(made["other"])}       # the site's configured trusted key
    bad(hpc("bundle", "verify", str(made["single"]), env=wrong), "signature")
    bad(hpc("inspect", f"bundle:{made['single']}", env=wrong), "signature")
    ok(hpc("inspect", f"bundle:{made['single']}", env={**benv, "HPCCONV_BUNDLE_KEY": str(made["pub"])}))
    small_layout(tmp_path / "lay2")
    u = tmp_path / "unsigned.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay2'}:t", "-o", str(u), env=benv))
    bad(hpc("bundle", "verify", str(u), "--key", str(made["pub"]), env=benv), "not signed")


def test_json_verify_lists_problems(made, benv):
    for p in made["parts"][1:3]:
        flip(p, 100)
    r = hpc("--json", "bundle", "verify", str(made["split"]), env=benv)
    assert r.returncode == 4
    items = [p["item"] for p in json.loads(r.stdout)["problems"]]
    assert items == [made["parts"][1].name, made["parts"][2].name]


# resume ------------------------------------------------------------------------------------------------
def test_import_killed_midway_then_rerun_equals_uninterrupted(tmp_path, benv):
    big = make_tar([T("data", "dir"), T("data/big", data=os.urandom(160 << 20))])
    layers = [make_tar([T("a", "dir"), T("a/x", data=b"x" * 100_000)]), big,
              make_tar([T("b", "dir"), T("b/y", data=os.urandom(50_000))])]
    img = build_image(layers, compression="none")
    image_layout(tmp_path / "lay", img, "t")
    b = tmp_path / "big.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(b), env=benv))
    ref_store, store = tmp_path / "ref-store", tmp_path / "killed-store"
    ok(hpc("bundle", "import", str(b), env={**benv, "HPCCONV_STORE": str(ref_store)}))
    env = {**benv, "HPCCONV_STORE": str(store)}
    proc = subprocess.Popen([sys.executable, "-m", "hpcconv.cli", "bundle", "import", str(b)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    big_digest = sha256(big)
    partial = store / "tmp" / f"sha256-{big_digest.split(':')[1]}.partial"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if partial.exists() and partial.stat().st_size > (8 << 20):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert partial.exists() and 0 < partial.stat().st_size < (160 << 20)   # really stopped midway
    assert not (store / "blobs" / "sha256" / big_digest.split(":")[1]).exists()
    assert json.loads((store / "index.json").read_text())["manifests"] == []   # no ref before all blobs
    r = ok(hpc("--json", "bundle", "import", str(b), env=env))
    assert json.loads(r.stdout)["blobs_written"] >= 1
    assert tree_hashes(store) == tree_hashes(ref_store)
    assert not list((store / "tmp").glob("*.partial"))
    # and once more: idempotent
    r = ok(hpc("--json", "bundle", "import", str(b), env=env))
    assert json.loads(r.stdout)["blobs_written"] == 0
    assert tree_hashes(store) == tree_hashes(ref_store)


# incremental -----------------------------------------------------------------------------------------
def test_incremental_carries_changed_layer_manifest_config_only(tmp_path, benv):
    l1 = make_tar([T("etc", "dir"), T("etc/one", data=b"1" * 70_000)])
    l2 = make_tar([T("opt", "dir"), T("opt/two", data=os.urandom(120_000))])
    l3 = make_tar([T("srv", "dir"), T("srv/three", data=b"3" * 90_000)])
    l2b = make_tar([T("opt", "dir"), T("opt/two", data=os.urandom(120_000))])
    lay = tmp_path / "lay"
    old = build_image([l1, l2, l3], compression="gzip")
    image_layout(lay, old, "app")
    b1 = tmp_path / "v1.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{lay}:app", "-o", str(b1), "--split", "100k", env=benv))
    shutil.rmtree(lay)
    new = build_image([l1, l2b, l3], compression="gzip")
    image_layout(lay, new, "app")
    delta = tmp_path / "v2-delta.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{lay}:app", "-o", str(delta), "--since", str(b1) + ".part000", env=benv))
    man = json.loads(_manifest_body(delta))
    changed = [d for d in new.blobs if d not in old.blobs]
    assert sorted(e["digest"] for e in man["files"] if e["kind"] == "blob") == sorted(changed)
    assert len(changed) == 3                                   # the new layer, the new config, the new manifest
    assert {m.name for m in tarfile.open(delta).getmembers()} == \
        {"oci-layout", "index.json", "hpcbundle.json"} | {f"blobs/sha256/{d.split(':')[1]}" for d in changed}
    # bundle diff of two full bundles gives the same incremental bundle content
    full2 = tmp_path / "v2.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{lay}:app", "-o", str(full2), env=benv))
    r = ok(hpc("--json", "bundle", "diff", str(b1), str(full2), "-o", str(tmp_path / "d2.hpcbundle"), env=benv))
    res = json.loads(r.stdout)
    assert sorted(b["digest"] for b in res["added_blobs"]) == sorted(changed)
    assert res["images"][0]["status"] == "changed"
    man2 = json.loads(_manifest_body(tmp_path / "d2.hpcbundle"))
    assert sorted(e["digest"] for e in man2["files"] if e["kind"] == "blob") == sorted(changed)
    # the centre: the delta alone is refused (exit 3, says to import the base); base + delta converts
    site = {**benv, "HPCCONV_STORE": str(tmp_path / "site")}
    r = hpc("bundle", "import", str(delta), env=site)
    assert r.returncode == 3 and "v1.hpcbundle" in r.stderr, r.stderr
    r = hpc("export", f"bundle:{delta}", "--raw", "-o", str(tmp_path / "from-delta.tar"), env=site)
    assert r.returncode == 3 and "base" in r.stderr, r.stderr
    ok(hpc("bundle", "import", str(b1) + ".part000", env=site))
    ok(hpc("bundle", "import", str(delta), env=site))
    for i, spec in enumerate(("localhost/lay:app", f"bundle:{delta}")):   # by name (offline), from the delta
        out = tmp_path / f"root{i}.tar"
        ok(hpc("export", spec, "--raw", "-o", str(out), env=site))
        with tarfile.open(out) as tf:
            assert tf.extractfile("opt/two").read() == tarfile.open(fileobj=__import__("io").BytesIO(l2b)) \
                .extractfile("opt/two").read()


def _manifest_body(bundle: Path) -> str:
    with tarfile.open(bundle) as tf:
        data = tf.extractfile("hpcbundle.json").read().decode()
    return data.rstrip("\n").rsplit("\n", 1)[0]


# outputs ---------------------------------------------------------------------------------------------------
def test_include_outputs_and_extract(tmp_path, benv, busybox_amd64):
    need("tar2sqfs")
    image_layout(tmp_path / "lay", busybox_amd64, "t")
    outs = tmp_path / "outs"
    (outs / "sandbox" / "bin").mkdir(parents=True)
    ok(hpc("convert", f"oci:{tmp_path / 'lay'}:t", "--target", "charliecloud", "--format", "squashfs",
           "-o", str(outs / "app.sqfs"), env=benv))
    (outs / "notes.txt").write_bytes(b"compress me " * 50_000)
    (outs / "sandbox" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    b = tmp_path / "o.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "--include-outputs", str(outs), "-o", str(b), env=benv))
    names = set(tar_members(b))
    assert {"outputs/app.sqfs", "outputs/notes.txt.zst", "outputs/sandbox.tar"} <= names   # zstd only where it helps
    dest = tmp_path / "got"
    dest.mkdir()
    r = ok(hpc("bundle", "import", str(b), "--outputs", str(dest), env={**benv, "HPCCONV_STORE": str(tmp_path / "s")}))
    assert "outputs/app.sqfs" in r.stdout
    assert (dest / "app.sqfs").read_bytes() == (outs / "app.sqfs").read_bytes()
    assert (dest / "notes.txt").read_bytes() == (outs / "notes.txt").read_bytes()
    with tarfile.open(dest / "sandbox.tar") as tf:
        assert tf.extractfile("sandbox/bin/tool").read() == b"#!/bin/sh\necho hi\n"
    run = subprocess.run([need("ch-run"), str(dest / "app.sqfs"), "--", "/bin/echo", "carried-ok"],
                         capture_output=True, text=True, env={**benv, "USER": "root"}, timeout=120)
    assert run.returncode == 0 and run.stdout == "carried-ok\n", run.stderr


# push ------------------------------------------------------------------------------------------------------
@pytest.mark.registry
def test_push_after_import_skopeo_pulls_it_back(tmp_path, benv, plain_registry, plain_images):
    idx, blobs = plain_images["test/multi:latest"]
    write_layout(tmp_path / "lay", idx, blobs, "t")
    b = tmp_path / "m.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(b), env=benv))
    site = {**benv, "HPCCONV_STORE": str(tmp_path / "site")}
    ok(hpc("bundle", "import", str(b), env=site))
    ok(hpc("push", f"bundle:{b}", f"docker://{plain_registry.host}/centre/multi:1", "--insecure", env=site))
    assert inspect_raw(plain_registry, "centre/multi:1") == idx          # the index, byte for byte
    got = tmp_path / "pulled"
    skopeo("copy", "--all", "--src-tls-verify=false", f"docker://{plain_registry.host}/centre/multi:1",
           f"oci:{got}:x")
    for d, data in blobs.items():
        assert (got / "blobs" / "sha256" / d.split(":")[1]).read_bytes() == data
    # one platform only: its manifest is published (the registry would refuse the partial index)
    r = ok(hpc("--json", "push", f"bundle:{b}", f"docker://{plain_registry.host}/centre/arm:1", "--insecure",
               "--platform", "linux/arm64", env=site))
    res = json.loads(r.stdout)
    arm = plain_images["arm64"]
    assert res["platforms"] == ["linux/arm64"] and res["digest"] == arm.digest and res["warnings"]
    assert inspect_raw(plain_registry, "centre/arm:1") == arm.manifest
    # pushing again uploads nothing
    r = ok(hpc("--json", "push", f"bundle:{b}", f"docker://{plain_registry.host}/centre/multi:1", "--insecure",
               env=site))
    assert json.loads(r.stdout)["uploaded"] == 0


# --with-tool ---------------------------------------------------------------------------------------------
def test_with_tool_installs_offline_in_fresh_venv(tmp_path, benv):
    small_layout(tmp_path / "lay")
    b = tmp_path / "t.hpcbundle"
    # creation may reach the package index (pip download); keep the caller's proxy settings for it
    make_env = {**os.environ, **{k: v for k, v in benv.items() if k in ("HOME", "HPCCONV_STORE")}}
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "--with-tool", "--split", "4M", "-o", str(b),
           env=make_env))
    r = ok(hpc("bundle", "verify", str(b), env=benv))
    assert f"wheelhouse for Python {sys.version_info[0]}.{sys.version_info[1]}" in r.stdout
    parts = sorted(tmp_path.glob("t.hpcbundle.part*"))[1:]           # every part but part000, in order
    centre = tmp_path / "centre"
    centre.mkdir()
    with open(centre / "joined.tar", "wb") as f:
        for p in parts:
            f.write(p.read_bytes())
    subprocess.run(["tar", "-xf", "joined.tar", "tool/"], cwd=centre, check=True)   # no hpcconv needed
    wheels = {w.name.split("-")[0].lower() for w in (centre / "tool" / "wheels").glob("*.whl")}
    assert {"hpcconv", "typer", "rich", "zstandard", "requests", "cryptography", "isal", "pyelftools"} <= wheels
    offline = clean_env(HOME=tmp_path / "home", PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                        PIP_FIND_LINKS="", PYTHON=sys.executable)
    offline.pop("VIRTUAL_ENV", None)
    venv = centre / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=offline, timeout=300)
    r = subprocess.run(["sh", str(centre / "tool" / "install.sh"), str(venv)], capture_output=True, text=True,
                       env=offline, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    v = subprocess.run([str(venv / "bin" / "hpcconv"), "--version"], capture_output=True, text=True, env=offline)
    assert v.returncode == 0 and v.stdout.startswith("hpcconv "), v.stderr
    # the installed tool verifies the bundle it came in
    ok(subprocess.run([str(venv / "bin" / "hpcconv"), "bundle", "verify", str(b)], capture_output=True, text=True,
                      env=offline))
    # a damaged wheel is refused before pip runs
    w = next((centre / "tool" / "wheels").glob("rich-*.whl"))
    flip(w, 100)
    r = subprocess.run(["sh", str(centre / "tool" / "install.sh"), str(centre / "venv2")], capture_output=True,
                       text=True, env=offline, timeout=600)
    assert r.returncode == 4 and "SHA256SUMS" in r.stderr


@pytest.mark.registry
def test_push_chunked_with_token_auth(tmp_path, benv, token_registry, token_server, test_certs):
    """A layer over the 16 MiB monolithic limit goes up in PATCH chunks; the token carries pull,push."""
    from registryfix import PASSWORD, USER

    big = make_tar([T("d", "dir"), T("d/big", data=os.urandom(40 << 20))])
    img = build_image([big, make_tar([T("e", "dir"), T("e/x", data=b"x")])], compression="gzip")
    image_layout(tmp_path / "lay", img, "t")
    env = {**benv, "HPCCONV_PASSWORD": PASSWORD}
    ok(hpc("push", f"oci:{tmp_path / 'lay'}:t", f"docker://{token_registry.host}/private/pushed:1",
           "--ca-cert", str(test_certs.ca), "--username", USER, env=env))
    assert inspect_raw(token_registry, "private/pushed:1", creds=f"{USER}:{PASSWORD}") == img.manifest
    got = tmp_path / "back"
    skopeo("copy", "--src-cert-dir", str(test_certs.cert_dir), "--src-creds", f"{USER}:{PASSWORD}",
           f"docker://{token_registry.host}/private/pushed:1", f"oci:{got}:x",
           env=clean_env(SSL_CERT_FILE=test_certs.ca))
    for d in [json.loads(img.manifest)["config"]["digest"]] + [l["digest"] for l in json.loads(img.manifest)["layers"]]:
        assert (got / "blobs" / "sha256" / d.split(":")[1]).read_bytes() == img.blobs[d]
    patches = [q for q in token_registry.requests_log() if q[0] == "PATCH" and "private/pushed" in q[1]]
    assert len(patches) >= 3 and all(q[2] == 202 for q in patches)     # 40 MiB in 16 MiB chunks
    scopes = [s["path"] for s in token_server.seen if "private%2Fpushed" in s["path"] or "private/pushed" in s["path"]]
    assert any("push" in s for s in scopes)
    # wrong password: exit 3, nothing half-published under the tag
    r = hpc("push", f"oci:{tmp_path / 'lay'}:t", f"docker://{token_registry.host}/private/other:1",
            "--ca-cert", str(test_certs.ca), "--username", USER, env={**benv, "HPCCONV_PASSWORD": "wrong"})
    assert r.returncode == 3, r.stderr


def test_split_sizes():
    from hpcconv.bundle.create import parse_size
    from hpcconv.errors import UsageError

    assert parse_size("fat32") == 4 * 1024 ** 3 - 1           # FAT32 cannot hold a 4 GiB file
    assert parse_size("4G") == 4 * 1024 ** 3 and parse_size("4GiB") == 4 * 1024 ** 3
    assert parse_size("4.7GB") == 4_700_000_000 and parse_size("700M") == 700 * 1024 ** 2
    for bad_size in ("", "12x", "-1G", "100"):
        with pytest.raises(UsageError):
            parse_size(bad_size)


def test_split_import_reads_once_and_names_a_bad_part(made, benv, tmp_path, monkeypatch):
    from hpcconv.bundle import importer, reader

    real = reader.verify_parts

    def no_second_pass(loc, parts, rep, hash_parts=True):
        assert not hash_parts, "parts were hashed in a second pass"
        return real(loc, parts, rep, hash_parts)

    monkeypatch.setattr(reader, "verify_parts", no_second_pass)
    assert reader.verify(made["split"])["parts"] >= 5
    res = importer.import_bundle(made["split"], str(tmp_path / "s1"))
    assert res["blobs_written"] == 5                      # 3 layers, config, manifest
    # a damaged part found during that single pass: named, and nothing is tagged
    part = made["parts"][2]
    flip(part, 10)
    r = hpc("bundle", "import", str(made["split"]), env={**benv, "HPCCONV_STORE": str(tmp_path / "s2")})
    bad(r, part.name)
    assert json.loads((tmp_path / "s2" / "index.json").read_text())["manifests"] == []


# parity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["drop", "flip", "truncate"])
def test_parity_rebuilds_one_part(tmp_path, benv, keys, damage):
    small_layout(tmp_path / "lay")
    b = tmp_path / "p.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(b), "--split", "64k", "--parity",
           "--sign", str(keys["key"]), env=benv))
    parts = sorted(tmp_path.glob("p.hpcbundle.part*"))
    assert (tmp_path / "p.hpcbundle.parity").stat().st_size == 64 * 1024
    victim = parts[-1] if damage == "truncate" else parts[2]    # the short last part too
    original = victim.read_bytes()
    if damage == "drop":
        victim.unlink()
    elif damage == "flip":
        flip(victim, 1234)
    else:
        victim.write_bytes(original[:-100])
    r = hpc("bundle", "verify", str(b), "--key", str(keys["pub"]), env=benv)
    bad(r, victim.name, "bundle repair")
    r = ok(hpc("bundle", "repair", str(b), "--key", str(keys["pub"]), env=benv))
    assert victim.name in r.stdout
    assert victim.read_bytes() == original
    ok(hpc("bundle", "verify", str(b), "--key", str(keys["pub"]), env=benv))
    ok(hpc("bundle", "import", str(b), env={**benv, "HPCCONV_STORE": str(tmp_path / "s")}))


def test_parity_cannot_rebuild_two_parts(tmp_path, benv):
    small_layout(tmp_path / "lay")
    b = tmp_path / "p.hpcbundle"
    ok(hpc("bundle", "create", f"oci:{tmp_path / 'lay'}:t", "-o", str(b), "--split", "64k", "--parity", env=benv))
    parts = sorted(tmp_path.glob("p.hpcbundle.part*"))
    flip(parts[1], 10)
    flip(parts[3], 10)
    r = hpc("bundle", "repair", str(b), env=benv)
    bad(r, parts[1].name, parts[3].name, "send the others again")
    flip(parts[3], 10)                                        # undo one: now a single bad part
    (tmp_path / "p.hpcbundle.parity").write_bytes(b"\0" * 64 * 1024)   # but the parity part is wrong
    r = hpc("bundle", "repair", str(b), env=benv)
    bad(r, parts[1].name)


@pytest.mark.parametrize("use_numpy", [True, False])
def test_parity_xor_paths_agree(monkeypatch, use_numpy):
    from hpcconv.bundle import parity

    if not use_numpy:
        monkeypatch.setattr(parity, "_np", None)
    elif parity._np is None:
        pytest.skip("numpy is not installed (optional accelerator)")
    for n, m in ((4096, 4096), (1003, 999), (17, 0)):
        acc0, data = os.urandom(n), os.urandom(m)
        acc = bytearray(acc0)
        parity._xor(acc, data)
        assert bytes(acc) == bytes(x ^ y for x, y in zip(acc0, data)) + acc0[m:]
