"""`hpcconv pull docker://…` against real docker-registry instances on 127.0.0.1.

Images are pushed by skopeo; results are checked independently of hpcconv's code: manifests are
compared with `skopeo inspect --raw`, store blobs are re-hashed from disk, configs parsed by hand,
and the registry's own access log tells which requests were made.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registryfix import (PASSWORD, USER, LoopbackProxy, StorageServer, clean_env, inspect_raw, push_layout,
                         sha256_file)

pytestmark = pytest.mark.registry


def hpc(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True,
                          env=env, input=input, timeout=300)


@pytest.fixture
def henv(tmp_path, store_dir) -> dict:
    """A clean environment: private HOME (no docker/podman credentials), private store, no proxies."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=home, HPCCONV_STORE=store_dir)
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_AUTH_CONFIG",
              "HPCCONV_PASSWORD", "HPCCONV_USERNAME"):
        env.pop(k, None)
    return env


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def store_blobs(store: Path) -> dict[str, Path]:
    d = store / "blobs" / "sha256"
    return {f"sha256:{p.name}": p for p in d.iterdir()} if d.is_dir() else {}


def assert_store_consistent(store: Path, partials_ok: dict[str, bytes] | None = None) -> None:
    """Every published blob's content matches its name. No partial downloads are left behind, except
    (with `partials_ok`: digest -> true content) a correct prefix of a download cancelled mid-way."""
    for digest, path in store_blobs(store).items():
        assert sha256_file(path) == digest, path
    for p in (store / "tmp").glob("*.partial"):
        digest = "sha256:" + p.name[len("sha256-"):-len(".partial")]
        assert partials_ok is not None and digest in partials_ok, p
        data = p.read_bytes()
        assert data and partials_ok[digest].startswith(data), p


def refs(store: Path) -> dict[str, dict]:
    idx = json.loads((store / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in idx["manifests"]}


def blob_gets(reg, since: int) -> list[tuple[str, str, int]]:
    return [r for r in reg.requests_log()[since:] if r[0] == "GET" and ("/blobs/" in r[1] or "/manifests/" in r[1])]


# plain HTTP -------------------------------------------------------------------------------------------
def test_plain_http_needs_insecure(plain_registry, plain_images, henv):
    r = hpc("pull", f"docker://{plain_registry.host}/test/busybox:amd64", env=henv)
    assert r.returncode == 3, r.stderr
    assert "--insecure" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pull_plain_verifies_against_skopeo(plain_registry, plain_images, henv, store_dir):
    img = plain_images["test/busybox:amd64"]
    r = hpc("--json", "pull", f"docker://{plain_registry.host}/test/busybox:amd64", "--insecure", env=henv)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    raw = inspect_raw(plain_registry, "test/busybox:amd64")
    assert out["digest"] == sha256(raw) == img.digest
    man = json.loads(raw)
    assert [l["digest"] for l in out["layers"]] == [l["digest"] for l in man["layers"]]
    blobs = store_blobs(store_dir)
    for d in [man["config"]["digest"]] + [l["digest"] for l in man["layers"]]:
        assert blobs[d].read_bytes() == img.blobs[d]
    assert blobs[sha256(raw)].read_bytes() == raw
    assert_store_consistent(store_dir)
    entry = refs(store_dir)[f"{plain_registry.host}/test/busybox:amd64"]
    assert entry["digest"] == sha256(raw) and entry["size"] == len(raw)
    assert entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_second_pull_downloads_nothing(plain_registry, plain_images, henv):
    src = f"docker://{plain_registry.host}/test/multi:latest"
    assert hpc("pull", src, "--insecure", "--platform", "linux/arm64", env=henv).returncode == 0
    mark = len(plain_registry.requests_log())
    r = hpc("pull", src, "--insecure", "--platform", "linux/arm64", env=henv)
    assert r.returncode == 0, r.stderr
    after = plain_registry.requests_log()[mark:]
    assert blob_gets(plain_registry, mark) == []
    assert ("HEAD", "/v2/test/multi/manifests/latest", 200) in after   # the tag is still checked


def test_platform_selection(plain_registry, plain_images, henv, store_dir):
    index = json.loads(inspect_raw(plain_registry, "test/multi:latest"))
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    src = f"docker://{plain_registry.host}/test/multi:latest"
    for plat, arch in (("linux/arm64", "arm64"), ("linux/arm64/v8", "arm64"), ("aarch64", "arm64"),
                       ("linux/amd64", "amd64")):
        r = hpc("--json", "pull", src, "--insecure", "--platform", plat, env=henv)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["digest"] == by_arch[arch]
        man = json.loads((store_dir / "blobs" / "sha256" / by_arch[arch].split(":")[1]).read_bytes())
        cfg = json.loads((store_dir / "blobs" / "sha256" / man["config"]["digest"].split(":")[1]).read_bytes())
        assert cfg["architecture"] == arch
        assert out["layers"][0]["digest"] == json.loads(plain_images[arch].manifest)["layers"][0]["digest"]
    # the tag points at the index, which is stored too
    idx_raw = inspect_raw(plain_registry, "test/multi:latest")
    assert refs(store_dir)[f"{plain_registry.host}/test/multi:latest"]["digest"] == sha256(idx_raw)
    assert (store_dir / "blobs" / "sha256" / sha256(idx_raw).split(":")[1]).read_bytes() == idx_raw
    assert_store_consistent(store_dir)
    r = hpc("pull", src, "--insecure", "--platform", "linux/s390x", env=henv)
    assert r.returncode == 3 and "linux/arm64" in r.stderr and "linux/amd64" in r.stderr


def test_zstd_layers(plain_registry, plain_images, henv, store_dir):
    zimg = plain_images["test/zstd:1"]
    r = hpc("--json", "pull", f"docker://{plain_registry.host}/test/zstd:1", "--insecure", env=henv)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["digest"] == zimg.digest
    assert {l["mediaType"] for l in out["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    for l in out["layers"]:
        assert (store_dir / "blobs" / "sha256" / l["digest"].split(":")[1]).read_bytes() == zimg.blobs[l["digest"]]


def test_library_image_and_offline_digest(plain_registry, plain_images, store_dir, monkeypatch):
    """open_source gives layers readable from the store; a digest already in the store needs no network
    (the second open names a closed port: any connection attempt would fail)."""
    from hpcconv.image import Platform
    from hpcconv.sources import SourceOptions, open_source

    for k in list(os.environ):
        if "proxy" in k.lower():
            monkeypatch.delenv(k)
    opts = SourceOptions(platform=Platform.parse("linux/arm64"), insecure=True, store_path=str(store_dir))
    img = open_source(f"docker://{plain_registry.host}/test/multi:latest", opts)
    assert img.index is not None and img.source == "docker"
    assert img.config.platform.architecture == "arm64"
    arm = plain_images["arm64"]
    with img.layers[0].open() as f:
        assert f.read() == arm.blobs[img.layers[0].digest]
    idx_digest = refs(store_dir)[f"{plain_registry.host}/test/multi:latest"]["digest"]
    off = open_source(f"docker://127.0.0.1:1/test/multi@{idx_digest}",
                      SourceOptions(platform=Platform.parse("linux/arm64/v8"), store_path=str(store_dir)))
    assert off.digest == arm.digest and off.index is not None
    off = open_source(f"docker://127.0.0.1:1/whatever@{arm.digest}", SourceOptions(store_path=str(store_dir)))
    assert off.config.platform.architecture == "arm64"
    # not in the store: the network is needed, and the closed port gives a clean exit-3 error
    from hpcconv.errors import NetworkError

    with pytest.raises(NetworkError):
        open_source(f"docker://127.0.0.1:1/x@{plain_images['amd64'].digest}", SourceOptions(store_path=str(store_dir)))


def test_schema1_is_rejected_clearly(registry_root, henv, tmp_path):
    """skopeo converts an image to signed schema 1 and pushes it to a registry that still accepts it."""
    from ocitools import T, build_image, image_layout, make_tar
    from registryfix import Registry, skopeo

    reg = Registry(registry_root, "schema1", extra={"compatibility": {"schema1": {"enabled": True}}}).start()
    try:
        img = build_image([make_tar([T("a", data=b"x" * 100)])])
        skopeo("copy", "--dest-tls-verify=false", "--format", "v2s1", f"oci:{image_layout(tmp_path / 'l', img, 't')}:t",
               f"docker://{reg.host}/old/img:1")
        r = hpc("pull", f"docker://{reg.host}/old/img:1", "--insecure", env=henv)
        assert r.returncode == 3, r.stderr
        assert "schema 1" in r.stderr and "Traceback" not in r.stderr
    finally:
        reg.stop()


def test_unknown_repo_and_tag(plain_registry, plain_images, henv):
    r = hpc("pull", f"docker://{plain_registry.host}/test/busybox:nope", "--insecure", env=henv)
    assert r.returncode == 3 and "not found" in r.stderr
    r = hpc("pull", f"docker://{plain_registry.host}/no/such:1", "--insecure", env=henv)
    assert r.returncode == 3 and "not found" in r.stderr
    r = hpc("pull", f"docker://{plain_registry.host}/Bad:1", "--insecure", env=henv)
    assert r.returncode == 2


# corruption ----------------------------------------------------------------------------------------
def test_corrupt_blob_exit4_and_store_clean(plain_registry, registry_root, henv, store_dir, tmp_path):
    """Overwrite a layer's data file inside the registry's storage (same size, other bytes): the
    registry then serves wrong content under the right digest, as a broken mirror or disk would."""
    from ocitools import T, build_image, image_layout, make_tar

    img = build_image([make_tar([T("payload", data=os.urandom(200_000))]),
                       make_tar([T("other", data=os.urandom(5000))])])
    push_layout(image_layout(tmp_path / "corrupt", img, "t"), "t", plain_registry, "test/corrupt:1")
    bad = json.loads(img.manifest)["layers"][0]["digest"]
    f = plain_registry.blob_file(bad)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = hpc("pull", f"docker://{plain_registry.host}/test/corrupt:1", "--insecure", env=henv)
    assert r.returncode == 4, r.stderr
    assert bad in r.stderr and "does not match" in r.stderr
    assert bad not in store_blobs(store_dir)
    assert not (store_dir / "tmp" / f"sha256-{bad.split(':')[1]}.partial").exists()
    # the other blobs may have been cancelled mid-way: their partial files are kept for a resume
    assert_store_consistent(store_dir, partials_ok={d: b for d, b in img.blobs.items() if d != bad})
    assert f"{plain_registry.host}/test/corrupt:1" not in refs(store_dir)


def test_corrupt_manifest_from_proxy_exit4(plain_registry, plain_images, test_certs, henv, store_dir):
    """A proxy alters the child manifest it relays (fetched by digest from the index): exit 4."""
    proxy = LoopbackProxy(test_certs, plain_registry)
    try:
        proxy.mutate = lambda path, body: body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2') \
            if "/manifests/sha256:" in path else body
        r = hpc("pull", f"docker://{proxy.host_port}/test/multi:latest", "--ca-cert", str(test_certs.ca),
                "--platform", "linux/amd64", env=henv)
        assert r.returncode == 4, r.stderr
        assert "manifest" in r.stderr and "does not match" in r.stderr
        assert refs(store_dir) == {}
    finally:
        proxy.stop()


# resume, retries, redirects (through a loopback proxy) ----------------------------------------------
def test_range_resume_from_partial(plain_registry, plain_images, test_certs, henv, store_dir):
    img = plain_images["test/busybox:amd64"]
    layer = json.loads(img.manifest)["layers"][0]
    data = img.blobs[layer["digest"]]
    half = len(data) // 2
    (store_dir / "tmp").mkdir(parents=True, exist_ok=True)
    partial = store_dir / "tmp" / f"sha256-{layer['digest'].split(':')[1]}.partial"
    partial.write_bytes(data[:half])
    proxy = LoopbackProxy(test_certs, plain_registry)
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/busybox:amd64", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        gets = [s for s in proxy.seen if s.method == "GET" and layer["digest"] in s.path]
        assert len(gets) == 1
        assert gets[0].headers.get("Range") == f"bytes={half}-" and gets[0].status == 206
        assert sha256_file(store_dir / "blobs" / "sha256" / layer["digest"].split(":")[1]) == layer["digest"]
        assert not partial.exists()
        assert_store_consistent(store_dir)
    finally:
        proxy.stop()


def test_range_ignored_restarts(plain_registry, plain_images, test_certs, henv, store_dir):
    """A server that ignores Range answers 200 with the whole blob: the partial is dropped, not appended to."""
    img = plain_images["test/busybox:amd64"]
    layer = json.loads(img.manifest)["layers"][0]
    data = img.blobs[layer["digest"]]
    (store_dir / "tmp").mkdir(parents=True, exist_ok=True)
    (store_dir / "tmp" / f"sha256-{layer['digest'].split(':')[1]}.partial").write_bytes(data[:1000])
    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.strip_range = True
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/busybox:amd64", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        gets = [s for s in proxy.seen if s.method == "GET" and layer["digest"] in s.path]
        assert [(g.headers.get("Range"), g.status) for g in gets] == [("bytes=1000-", 200)]
        assert (store_dir / "blobs" / "sha256" / layer["digest"].split(":")[1]).read_bytes() == data
        assert_store_consistent(store_dir)
    finally:
        proxy.stop()


def test_dropped_connection_resumes(plain_registry, plain_images, test_certs, henv, store_dir):
    """The connection drops half-way through a layer: the same run resumes with Range and verifies."""
    img = plain_images["test/busybox:amd64"]
    layer = json.loads(img.manifest)["layers"][0]
    size = layer["size"]
    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.cut_first = {layer["digest"]: 1}
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/busybox:amd64", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        gets = [s for s in proxy.seen if s.method == "GET" and layer["digest"] in s.path]
        assert [(g.headers.get("Range"), g.status) for g in gets] == [(None, -200), (f"bytes={size // 2}-", 206)]
        assert sha256_file(store_dir / "blobs" / "sha256" / layer["digest"].split(":")[1]) == layer["digest"]
        assert_store_consistent(store_dir)
    finally:
        proxy.stop()


def test_bad_partial_is_redownloaded(plain_registry, plain_images, test_certs, henv, store_dir):
    img = plain_images["test/busybox:amd64"]
    layer = json.loads(img.manifest)["layers"][0]
    (store_dir / "tmp").mkdir(parents=True, exist_ok=True)
    partial = store_dir / "tmp" / f"sha256-{layer['digest'].split(':')[1]}.partial"
    partial.write_bytes(b"\0" * 1000)                     # wrong bytes from an earlier, broken run
    proxy = LoopbackProxy(test_certs, plain_registry)
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/busybox:amd64", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        gets = [s for s in proxy.seen if s.method == "GET" and layer["digest"] in s.path]
        assert [g.headers.get("Range") for g in gets] == ["bytes=1000-", None]
        assert_store_consistent(store_dir)
        assert layer["digest"] in store_blobs(store_dir)
    finally:
        proxy.stop()


def test_retry_after_503(plain_registry, plain_images, test_certs, henv, store_dir):
    proxy = LoopbackProxy(test_certs, plain_registry)
    try:
        proxy.fail_first = {"/blobs/": 2, "/manifests/": 1}
        r = hpc("pull", f"docker://{proxy.host_port}/test/zstd:1", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        assert sum(1 for s in proxy.seen if s.status == 503) == 3
        assert_store_consistent(store_dir)
        proxy.fail_first = {"/manifests/": 100}
        r = hpc("pull", f"docker://{proxy.host_port}/test/busybox:amd64", "--ca-cert", str(test_certs.ca),
                env={**henv, "HPCCONV_HTTP_ATTEMPTS": "2"})
        assert r.returncode == 3 and "503" in r.stderr
    finally:
        proxy.stop()


def test_redirect_to_other_host_gets_no_authorization(tls_registry, tls_images, test_certs, henv, store_dir):
    """No registry here redirects blobs on demand, so a loopback proxy in front of the TLS+auth registry
    answers blob GETs with a 307 to a 'storage' server on 127.0.0.2 (another host), which records the
    headers it receives."""
    storage = StorageServer(test_certs, tls_registry, "secure/busybox", USER, PASSWORD)
    proxy = LoopbackProxy(test_certs, tls_registry, storage)
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/secure/busybox:1", "--ca-cert", str(test_certs.ca),
                "--username", USER, env={**henv, "HPCCONV_PASSWORD": PASSWORD})
        assert r.returncode == 0, r.stderr
        blob_hits = [s for s in proxy.seen if "/blobs/" in s.path]
        assert blob_hits and all(s.status == 307 and s.headers.get("Authorization", "").startswith("Basic ")
                                 for s in blob_hits)
        assert len(storage.seen) == len(blob_hits)
        for s in storage.seen:
            assert "Authorization" not in s.headers and "authorization" not in {k.lower() for k in s.headers}
            assert s.status == 200
        assert_store_consistent(store_dir)
        man = json.loads(tls_images["secure/busybox:1"].manifest)
        for d in [man["config"]["digest"]] + [l["digest"] for l in man["layers"]]:
            assert d in store_blobs(store_dir)
    finally:
        proxy.stop()
        storage.stop()


# TLS + Basic auth ----------------------------------------------------------------------------------
def _docker_config(env: dict, host: str, user: str, password: str) -> None:
    import base64

    d = Path(env["HOME"]) / ".docker"
    d.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (d / "config.json").write_text(json.dumps({"auths": {f"https://{host}": {"auth": auth}}}))


def test_tls_basic_auth_with_config_json(tls_registry, tls_images, test_certs, henv, store_dir):
    src = f"docker://{tls_registry.host}/secure/busybox:1"
    r = hpc("pull", src, "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 3 and "requires authentication" in r.stderr
    _docker_config(henv, tls_registry.host, USER, PASSWORD)
    r = hpc("--json", "pull", src, "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 0, r.stderr
    raw = inspect_raw(tls_registry, "secure/busybox:1", creds=f"{USER}:{PASSWORD}")
    assert json.loads(r.stdout)["digest"] == sha256(raw)
    assert_store_consistent(store_dir)
    # DOCKER_CONFIG points elsewhere: that file is used instead of ~/.docker
    other = Path(henv["HOME"]) / "other-docker"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"auths": {tls_registry.host: {"username": USER,
                                                                                  "password": "wrong"}}}))
    r = hpc("pull", src, "--ca-cert", str(test_certs.ca), env={**henv, "DOCKER_CONFIG": str(other)})
    assert r.returncode == 3 and "refused the credentials" in r.stderr


def test_tls_needs_the_ca(tls_registry, tls_images, test_certs, henv):
    _docker_config(henv, tls_registry.host, USER, PASSWORD)
    src = f"docker://{tls_registry.host}/secure/busybox:1"
    r = hpc("pull", src, env=henv)
    assert r.returncode == 3 and "certificate verify failed" in r.stderr and "--ca-cert" in r.stderr
    env = {k: v for k, v in henv.items() if k != "REQUESTS_CA_BUNDLE"}
    env["SSL_CERT_FILE"] = str(test_certs.ca)
    r = hpc("pull", src, env=env)
    assert r.returncode == 0, r.stderr
    # --insecure accepts the unverified certificate for this registry
    r = hpc("pull", src, "--insecure", env={**henv, "HPCCONV_STORE": henv["HPCCONV_STORE"] + "-2"})
    assert r.returncode == 0, r.stderr


def test_password_stdin(tls_registry, tls_images, test_certs, henv):
    r = hpc("pull", f"docker://{tls_registry.host}/secure/busybox:1", "--ca-cert", str(test_certs.ca),
            "--username", USER, "--password-stdin", env=henv, input=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr


# token auth ----------------------------------------------------------------------------------------
def test_token_registry(token_registry, token_images, token_server, test_certs, henv, store_dir):
    src = f"docker://{token_registry.host}/private/busybox:1"
    before = len(token_server.seen)
    r = hpc("pull", src, "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 3, r.stderr
    assert "requires authentication" in r.stderr
    anon = token_server.seen[before:]
    assert len(anon) == 2                  # the first token, then one retry after the 401 (insufficient_scope)
    assert all("Authorization" not in s["headers"] for s in anon)
    henv["DOCKER_AUTH_CONFIG"] = json.dumps({"auths": {token_registry.host: {"username": USER, "password": PASSWORD}}})
    before = len(token_server.seen)
    r = hpc("--json", "pull", src, "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 0, r.stderr
    seen = token_server.seen[before:]
    raw = inspect_raw(token_registry, "private/busybox:1", creds=f"{USER}:{PASSWORD}")
    assert json.loads(r.stdout)["digest"] == sha256(raw)
    assert len(seen) == 1                                    # one token, cached for every request
    assert seen[0]["headers"]["Authorization"].startswith("Basic ")
    assert "scope=repository%3Aprivate%2Fbusybox%3Apull" in seen[0]["path"]
    assert_store_consistent(store_dir)
    henv["DOCKER_AUTH_CONFIG"] = json.dumps({"auths": {token_registry.host: {"username": USER, "password": "no"}}})
    r = hpc("pull", src, "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 3 and "refused" in r.stderr


def test_token_registry_with_credential_helper(token_registry, token_images, test_certs, henv, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text("#!/bin/sh\nread url\necho \"$url\" > \"%s\"\n"
                      "printf '{\"ServerURL\":\"%%s\",\"Username\":\"%s\",\"Secret\":\"%s\"}' \"$url\"\n"
                      % (tmp_path / "asked", USER, PASSWORD))
    helper.chmod(0o755)
    d = Path(henv["HOME"]) / ".docker"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"credHelpers": {token_registry.host: "test"}}))
    env = {**henv, "PATH": f"{bindir}:{henv['PATH']}"}
    r = hpc("pull", f"docker://{token_registry.host}/private/busybox:1", "--ca-cert", str(test_certs.ca), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "asked").read_text().strip() == token_registry.host


# proxies and headers -------------------------------------------------------------------------------
def test_https_proxy_env_is_honoured(tls_registry, tls_images, test_certs, henv, tmp_path):
    """HTTPS_PROXY is used (as requests would), also for loopback unless NO_PROXY names it."""
    from registryfix import ConnectProxy

    _docker_config(henv, tls_registry.host, USER, PASSWORD)
    px = ConnectProxy()
    try:
        src = f"docker://{tls_registry.host}/secure/busybox:1"
        r = hpc("pull", src, "--ca-cert", str(test_certs.ca), env={**henv, "HTTPS_PROXY": px.url})
        assert r.returncode == 0, r.stderr
        assert px.targets and set(px.targets) == {tls_registry.host}
        n = len(px.targets)
        r = hpc("pull", src, "--ca-cert", str(test_certs.ca),
                env={**henv, "HTTPS_PROXY": px.url, "NO_PROXY": "127.0.0.1", "HPCCONV_STORE": str(tmp_path / "s2")})
        assert r.returncode == 0, r.stderr
        assert len(px.targets) == n
    finally:
        px.stop()


def test_manifest_accept_header_and_identity_encoding(plain_registry, plain_images, test_certs, henv):
    proxy = LoopbackProxy(test_certs, plain_registry)
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/multi:latest", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        mans = [s for s in proxy.seen if "/manifests/" in s.path]
        assert mans
        for s in mans:
            accept = [a.strip() for a in s.headers["Accept"].split(",")]
            assert set(accept) == {"application/vnd.oci.image.index.v1+json",
                                   "application/vnd.docker.distribution.manifest.list.v2+json",
                                   "application/vnd.oci.image.manifest.v1+json",
                                   "application/vnd.docker.distribution.manifest.v2+json"}
        blobs = [s for s in proxy.seen if "/blobs/" in s.path]
        assert blobs and all(s.headers.get("Accept-Encoding") == "identity" for s in blobs)
        # tag -> digest once (HEAD, then GET of the tag), children by digest
        tags = [s for s in mans if s.path.endswith("/manifests/latest")]
        assert [s.method for s in tags] == ["HEAD", "GET"]
        assert all("/manifests/sha256:" in s.path for s in mans if s not in tags)
    finally:
        proxy.stop()


def test_token_registry_identity_token(token_registry, token_images, token_server, test_certs, henv):
    """An `identitytoken` (refresh token) is exchanged with an OAuth2 POST; the answer has only
    `access_token`."""
    henv["DOCKER_AUTH_CONFIG"] = json.dumps({"auths": {token_registry.host: {"identitytoken": f"refresh-{USER}"}}})
    before = len(token_server.seen)
    r = hpc("pull", f"docker://{token_registry.host}/private/busybox:1", "--ca-cert", str(test_certs.ca), env=henv)
    assert r.returncode == 0, r.stderr
    posts = [s for s in token_server.seen[before:] if s.get("method") == "POST"]
    assert len(posts) == 1 and posts[0]["form"]["scope"] == "repository:private/busybox:pull"
    assert posts[0]["form"]["grant_type"] == "refresh_token"
    henv["DOCKER_AUTH_CONFIG"] = json.dumps({"auths": {token_registry.host: {"identitytoken": "stale"}}})
    r = hpc("pull", f"docker://{token_registry.host}/private/busybox:1", "--ca-cert", str(test_certs.ca),
            env={**henv, "HPCCONV_STORE": henv["HPCCONV_STORE"] + "-2"})
    assert r.returncode == 3 and "refused" in r.stderr


def test_blobs_download_in_parallel(plain_registry, plain_images, test_certs, henv, store_dir):
    """Config and both layers of test/zstd:1 are fetched at the same time (each answer is delayed)."""
    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.blob_delay = 1.0
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/test/zstd:1", "--ca-cert", str(test_certs.ca), env=henv)
        assert r.returncode == 0, r.stderr
        blobs = [s for s in proxy.seen if "/blobs/" in s.path]
        assert len(blobs) == 3
        assert max(s.start for s in blobs) < min(s.end for s in blobs)     # all three were in flight together
    finally:
        proxy.stop()


def test_export_from_registry(plain_registry, plain_images, henv, tmp_path):
    """End to end through the CLI: the zstd image flattened into a tar (flatten is another module;
    this checks that the docker:// Image plugs into it)."""
    import tarfile

    out = tmp_path / "rootfs.tar"
    r = hpc("export", f"docker://{plain_registry.host}/test/zstd:1", "--insecure", "-o", str(out), env=henv)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tf:
        names = tf.getnames()
        assert tf.extractfile("etc/zstd-layer").read() == b"zstd layer\n" * 1000
        assert "opt/second" in names
