"""Issue 8 fault matrix: a real docker-registry made to misbehave.

No real registry drops connections, lies about Content-Length or trickles bytes on demand, so a
loopback proxy (registryfix.LoopbackProxy) sits between hpcconv and the registry and injects each
fault; the server restart is the real docker-registry process stopped and started again on the
same port and storage. Every case ends either with a correct pull (blobs resumed with Range where
possible) or with a one-line error, and in both cases the store holds only blobs whose content
hashes to their name (re-hashed here, independently of hpcconv) and partial files that are a true
prefix of the blob.

Already covered elsewhere (tests/test_registry_pull.py): resume from a partial file, a server that
ignores Range, a bad partial re-downloaded, corrupt bytes from the registry (exit 4), 503 with
Retry-After, the redirect's missing Authorization.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from registryfix import (PASSWORD, USER, LoopbackProxy, Registry, StorageServer, clean_env, push_layout,
                         sha256_file)

pytestmark = pytest.mark.registry


def hpc(*args, env, timeout=120):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def henv(tmp_path, store_dir):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=home, HPCCONV_STORE=store_dir, HPCCONV_BACKOFF_BASE="0.05")
    for k in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_AUTH_CONFIG", "HPCCONV_PASSWORD"):
        env.pop(k, None)
    return env


def check_store(store, blobs: dict[str, bytes]) -> None:
    """Only verified blobs; a partial download must be a prefix of the real blob."""
    d = store / "blobs" / "sha256"
    for p in (d.iterdir() if d.is_dir() else []):
        assert sha256_file(p) == f"sha256:{p.name}", p
    for p in (store / "tmp").glob("*.partial") if (store / "tmp").is_dir() else []:
        digest = "sha256:" + p.name[len("sha256-"):-len(".partial")]
        assert digest in blobs and blobs[digest].startswith(p.read_bytes()), p


def one_line_error(r, code=3) -> None:
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcconv: error:") and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def fault_image(plain_registry, registry_root):
    """Three layers of incompressible data (1.5 MB, 600 kB, 200 kB) on the plain registry."""
    from ocitools import T, build_image, image_layout, make_tar

    img = build_image([make_tar([T("big", data=os.urandom(1_500_000))]),
                       make_tar([T("mid", data=os.urandom(600_000))]),
                       make_tar([T("small", data=os.urandom(200_000))])])
    push_layout(image_layout(registry_root / "layouts" / "faults", img, "t"), "t", plain_registry, "test/faults:1")
    layers = [d["digest"] for d in json.loads(img.manifest)["layers"]]
    SIZES.update({d["digest"]: d["size"] for d in json.loads(img.manifest)["layers"]})
    return img, layers


SIZES: dict[str, int] = {}


def _gets(proxy, digest):
    return [s for s in proxy.seen if s.method == "GET" and digest in s.path]


# name -> (setup(proxy, layers), extra env, expected exit code, check(proxy, layers) or None)
CASES = {
    "dropped-mid-blob": (lambda p, L: p.cut_first.update({L[0]: 2, L[1]: 1}), {}, 0,
                         lambda p, L: [g.status for g in _gets(p, L[0])] == [-200, -206, 206]
                         and all(g.headers.get("Range") for g in _gets(p, L[0])[1:])),
    "429-retry-after": (lambda p, L: p.statuses.update({L[0]: [429, 429]}), {}, 0,
                        lambda p, L: [g.status for g in _gets(p, L[0])] == [429, 429, 200]
                        and _gets(p, L[0])[1].start - _gets(p, L[0])[0].start >= 0.9),
    "5xx-burst": (lambda p, L: p.statuses.update({"/blobs/": [500, 502, 503, 500], "/manifests/": [502, 503]}),
                  {"HPCCONV_HTTP_ATTEMPTS": "6"}, 0,
                  lambda p, L: sorted(s.status for s in p.seen if s.status >= 500) == [500, 500, 502, 502, 503, 503]),
    "truncated-body": (lambda p, L: p.cut_first.update({L[2]: 1}), {}, 0,
                       lambda p, L: [(g.status, g.headers.get("Range")) for g in _gets(p, L[2])]
                       == [(-200, None), (206, f"bytes={SIZES[L[2]] // 2}-")]),
    # the whole body, but a Content-Length that promises more and a closed connection: size and
    # digest decide, so this completes without a second request
    "content-length-too-long": (lambda p, L: p.length_delta.update({L[0]: [+300_000]}), {}, 0,
                                lambda p, L: [g.status for g in _gets(p, L[0])] == [1200]),
    "content-length-too-short": (lambda p, L: p.length_delta.update({L[0]: [-100_000]}), {}, 0,
                                 lambda p, L: [g.status for g in _gets(p, L[0])] == [1200, 206]
                                 and _gets(p, L[0])[1].headers.get("Range") == f"bytes={SIZES[L[0]] - 100_000}-"),
    "persistent-503": (lambda p, L: p.statuses.update({L[1]: [503] * 50}), {"HPCCONV_HTTP_ATTEMPTS": "2"}, 3, None),
    "persistent-drops": (lambda p, L: p.cut_first.update({L[0]: 50}), {"HPCCONV_HTTP_ATTEMPTS": "3"}, 3, None),
    "silent-server-times-out": (lambda p, L: setattr(p, "blob_delay", 4.0),
                                {"HPCCONV_HTTP_ATTEMPTS": "2", "HPCCONV_BACKOFF_BASE": "0.01"}, 3, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_matrix(case, fault_image, plain_registry, test_certs, henv, store_dir):
    img, layers = fault_image
    setup, extra, expect, check = CASES[case]
    proxy = LoopbackProxy(test_certs, plain_registry)
    args = ["pull", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca)]
    if case == "silent-server-times-out":
        args = ["--timeout", "1"] + args
    try:
        setup(proxy, layers)
        t0 = time.monotonic()
        r = hpc(*args, env={**henv, **extra})
        took = time.monotonic() - t0
        if expect == 0:
            assert r.returncode == 0, r.stderr
            for d in layers:
                assert sha256_file(store_dir / "blobs" / "sha256" / d.split(":")[1]) == d
            if check is not None:
                assert check(proxy, layers), [(s.path[-12:], s.status, s.headers.get("Range"))
                                              for s in proxy.seen if "/blobs/" in s.path]
        else:
            one_line_error(r, expect)
            assert f"{proxy.host_port}/test/faults:1" not in (store_dir / "index.json").read_text()
        assert took < 60
        check_store(store_dir, img.blobs)
    finally:
        proxy.stop()


def test_slow_server_watchdog_then_resume(fault_image, plain_registry, test_certs, henv, store_dir):
    """A server that trickles below HPCCONV_MIN_RATE for longer than HPCCONV_SLOW_TIMEOUT is cut
    (the read timeout alone never fires: bytes keep coming); the error is one line, the partial is
    a verified prefix, and the next run resumes it with Range."""
    img, layers = fault_image
    proxy = LoopbackProxy(test_certs, plain_registry)
    env = {**henv, "HPCCONV_MIN_RATE": "200000", "HPCCONV_SLOW_TIMEOUT": "1", "HPCCONV_HTTP_ATTEMPTS": "2"}
    try:
        proxy.throttle = 50_000
        t0 = time.monotonic()
        r = hpc("pull", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca), env=env)
        one_line_error(r)
        assert "slower than 200000 bytes/s" in r.stderr and time.monotonic() - t0 < 30
        check_store(store_dir, img.blobs)
        partial = store_dir / "tmp" / f"sha256-{layers[0].split(':')[1]}.partial"
        kept = partial.stat().st_size
        assert 0 < kept < len(img.blobs[layers[0]])
        proxy.throttle = 0
        proxy.seen.clear()
        r = hpc("pull", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca), env=env)
        assert r.returncode == 0, r.stderr
        assert [g.headers.get("Range") for g in _gets(proxy, layers[0])] == [f"bytes={kept}-"]
        check_store(store_dir, img.blobs)
        assert not partial.exists()
    finally:
        proxy.stop()


def test_redirect_to_other_host_with_drop_completes(tls_registry, registry_root, test_certs, henv, store_dir):
    """Blob GETs are redirected (307) to a storage host on 127.0.0.2; the first storage response
    per blob is cut half-way: the pull resumes by asking the registry again, never sends the
    registry credentials to the storage host, and the store is verified."""
    from ocitools import T, build_image, image_layout, make_tar

    img = build_image([make_tar([T("r", data=os.urandom(400_000))])])
    push_layout(image_layout(registry_root / "layouts" / "redir", img, "t"), "t", tls_registry, "secure/redir:1",
                creds=f"{USER}:{PASSWORD}")
    storage = StorageServer(test_certs, tls_registry, "secure/redir", USER, PASSWORD)
    proxy = LoopbackProxy(test_certs, tls_registry, storage)
    try:
        r = hpc("pull", f"docker://{proxy.host_port}/secure/redir:1", "--ca-cert", str(test_certs.ca),
                "--username", USER, env={**henv, "HPCCONV_PASSWORD": PASSWORD})
        assert r.returncode == 0, r.stderr
        assert storage.seen and all("Authorization" not in s.headers for s in storage.seen)
        check_store(store_dir, img.blobs)
        for d in json.loads(img.manifest)["layers"]:
            assert (store_dir / "blobs" / "sha256" / d["digest"].split(":")[1]).exists()
    finally:
        proxy.stop()
        storage.stop()


def test_server_restarted_mid_pull(registry_root, test_certs, henv, store_dir, tmp_path):
    """The real docker-registry process is stopped while a (slowed) pull is under way and started
    again on the same port with the same storage: the pull rides it out with retries."""
    from ocitools import T, build_image, image_layout, make_tar

    reg = Registry(registry_root, "restart").start()
    try:
        img = build_image([make_tar([T(f"f{i}", data=os.urandom(150_000))]) for i in range(6)])
        push_layout(image_layout(tmp_path / "restart", img, "t"), "t", reg, "test/restart:1")
        proxy = LoopbackProxy(test_certs, reg)
        proxy.throttle = 300_000                       # ~0.5 s per layer
        env = {**henv, "HPCCONV_HTTP_ATTEMPTS": "8", "HPCCONV_BACKOFF_BASE": "0.4"}
        p = subprocess.Popen([sys.executable, "-m", "hpcconv.cli", "pull", f"docker://{proxy.host_port}/test/restart:1",
                              "--ca-cert", str(test_certs.ca)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not any("/blobs/" in s.path for s in proxy.seen) and time.monotonic() < deadline:
            time.sleep(0.02)
        reg.stop()
        down_from = len(proxy.seen)
        time.sleep(1.0)
        reg.start()
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert len(proxy.seen) > down_from
        check_store(store_dir, img.blobs)
        for d in json.loads(img.manifest)["layers"]:
            assert sha256_file(store_dir / "blobs" / "sha256" / d["digest"].split(":")[1]) == d["digest"]
        proxy.stop()
    finally:
        reg.stop()


def test_top_layers_are_flattened_while_lower_ones_still_download(fault_image, plain_registry, test_certs,
                                                                  store_dir):
    """A conversion reads the top layer while the bottom one is on its way: the proxy holds the
    bottom layer's blob back until the flatten has yielded the top layer's file (were the layers
    fetched first, the open would wait out the gate and the checks below fail)."""
    import hashlib
    import threading

    from hpcconv.flatten import Flattener
    from hpcconv.sources import SourceOptions, open_source

    img, layers = fault_image
    proxy = LoopbackProxy(test_certs, plain_registry)
    gate = threading.Event()
    proxy.gates[layers[0].split(":")[1]] = gate
    blob0 = store_dir / "blobs" / "sha256" / layers[0].split(":")[1]
    index = store_dir / "index.json"
    try:
        opts = SourceOptions(store_path=str(store_dir), ca_cert=str(test_certs.ca), stream_layers=True)
        image = open_source(f"docker://{proxy.host_port}/test/faults:1", opts)
        assert image.downloads is not None and not blob0.exists()
        entries = Flattener(image, single_pass=True).entries()
        first = next(entries)
        assert first.path == "small" and len(first.reader.read()) == 200_000
        assert not blob0.exists()                       # still held back
        assert "test/faults:1" not in (index.read_text() if index.exists() else "")
        gate.set()
        rest = {e.path: hashlib.sha256(e.reader.read()).hexdigest() for e in entries}
        assert set(rest) == {"mid", "big"}
        image.downloads.finish()
        assert sha256_file(blob0) == layers[0]
        assert f"{proxy.host_port}/test/faults:1" in index.read_text()   # tagged once complete
        check_store(store_dir, img.blobs)
    finally:
        gate.set()
        proxy.stop()


@pytest.mark.parametrize("follow", [True, False], ids=["following", "waiting"])
def test_a_layer_is_read_while_its_blob_downloads(fault_image, plain_registry, test_certs, store_dir, monkeypatch,
                                                 follow):
    """The bottom layer arrives slowly (throttled): its file is yielded from the growing partial file
    before the blob is complete, and its content is exact (the digest is checked at the end of the
    read and again by the download). With HPCCONV_FOLLOW_DOWNLOADS=0 the reader waits for the
    whole blob instead (the same check fails: the test can tell the two apart)."""
    import hashlib

    from hpcconv.flatten import Flattener
    from hpcconv.sources import SourceOptions, open_source

    from hpcconv import image as image_mod
    from hpcconv import store as store_mod

    monkeypatch.setenv("HPCCONV_FOLLOW_DOWNLOADS", "1" if follow else "0")
    hashed = []                       # the blobs a reader hashes bytes of as it reads them
    real = image_mod.hasher_for

    class Counting:
        def __init__(self, digest):
            self.digest, self.h = digest, real(digest)

        def update(self, data):
            if data and self.digest not in hashed:
                hashed.append(self.digest)
            self.h.update(data)

        def hexdigest(self):
            return self.h.hexdigest()
    monkeypatch.setattr(image_mod, "hasher_for", Counting)
    monkeypatch.setattr(store_mod, "hasher_for", real)          # (the download's own hashes: not a reader's)
    img, layers = fault_image
    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.throttle = 500_000                             # the 1.5 MB bottom layer takes ~3 s
    blob0 = store_dir / "blobs" / "sha256" / layers[0].split(":")[1]
    try:
        opts = SourceOptions(store_path=str(store_dir), ca_cert=str(test_certs.ca), stream_layers=True)
        image = open_source(f"docker://{proxy.host_port}/test/faults:1", opts)
        entries = Flattener(image, single_pass=True).entries()
        got = {}
        for e in entries:
            if e.path == "big":
                complete_when_yielded = blob0.exists()
            got[e.path] = hashlib.sha256(e.reader.read()).hexdigest()
        image.downloads.finish()
        assert complete_when_yielded == (not follow)
        # followed, the bottom layer's bytes are the download's, hashed by it only (flatten._Vouched)
        assert (layers[0] in hashed) == (not follow), hashed
        want = {}
        for d in layers:
            with tarfile.open(fileobj=io.BytesIO(gzip.decompress(img.blobs[d]))) as tf:
                for ti in tf:
                    want[ti.name] = hashlib.sha256(tf.extractfile(ti).read()).hexdigest()
        assert got == want
        check_store(store_dir, img.blobs)
    finally:
        proxy.stop()


@pytest.mark.parametrize("passes", ["1", "2"])
def test_a_layer_downloaded_again_while_it_is_read(fault_image, plain_registry, test_certs, henv, store_dir,
                                                   tmp_path, passes):
    """The bottom layer's first answer carries other bytes (a valid layer of its own), slowly, and
    breaks off half-way; the server ignores the resume's Range and sends the right blob whole, which
    the download verifies. The single pass has read part of the wrong bytes by then, from the
    partial file, without hashing them (the download vouches for what it wrote, flatten._Vouched):
    it must not keep them. It reads the layers again, in two passes, from the verified blob, and
    the image holds the right file (kept, the wrong bytes and the right ones make a stream that
    does not decompress, or the wrong file). The two-pass flatten (HPCCONV_FLATTEN_PASSES=2) hashes
    what it follows itself: the mixed stream fails its check, a one-line error, no output."""
    from ocitools import T, build_image, make_tar

    img, layers = fault_image
    bottom = layers[0].split(":")[1]
    other = build_image([make_tar([T("big", data=os.urandom(1_500_000))])]).blobs
    other_blob = next(v for v in other.values() if len(v) > 1_000_000)
    proxy = LoopbackProxy(test_certs, plain_registry)
    proxy.throttle = 1_000_000
    proxy.cut_first = {bottom: 1}
    proxy.strip_range = True
    served = []

    def mutate(path, body):
        if bottom in path and not served:
            served.append(path)
            return other_blob
        return body
    proxy.mutate = mutate
    out, report = tmp_path / "out.sqfs", tmp_path / "report.json"
    try:
        r = hpc("convert", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca),
                "-t", "charliecloud", "--format", "squashfs", "-o", str(out), "--report", str(report),
                env={**henv, "HPCCONV_FLATTEN_PASSES": passes})
        gets = _gets(proxy, layers[0])
        assert [(g.status, g.headers.get("Range")) for g in gets] == [(-200, None),
                                                                      (200, f"bytes={len(other_blob) // 2}-")]
        check_store(store_dir, img.blobs)
        if passes == "2":
            one_line_error(r, 4)
            assert not out.exists()
            return
        assert r.returncode == 0, r.stderr
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(img.blobs[layers[0]]))) as tf:
            want = tf.extractfile("big").read()
        got = subprocess.run(["unsquashfs", "-cat", str(out), "big"], capture_output=True, check=True).stdout
        assert got == want
        checks = {(c["stage"], c["name"]): c for run in json.loads(report.read_text())["runs"] for c in run["checks"]}
        again = checks[("flatten", "single pass")]
        assert "downloaded again while it was read" in again["detail"], again
    finally:
        proxy.stop()


def test_convert_stops_downloads_when_a_layer_is_corrupt(fault_image, plain_registry, test_certs, henv, store_dir,
                                                         tmp_path):
    """The bottom layer arrives corrupt while the top ones are being converted: one-line error (exit
    4), no output, no tag, only verified blobs in the store, and the process does not linger."""
    img, layers = fault_image
    proxy = LoopbackProxy(test_certs, plain_registry)
    bad = layers[0].split(":")[1]
    proxy.mutate = lambda path, body: body[:-10] + b"x" * 10 if bad in path else body
    out = tmp_path / "out.sqfs"
    try:
        t0 = time.monotonic()
        r = hpc("convert", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca),
                "-t", "charliecloud", "--format", "squashfs", "-o", str(out), env=henv)
        assert time.monotonic() - t0 < 60
        one_line_error(r, 4)
        assert layers[0] in r.stderr or "digest" in r.stderr, r.stderr
        assert not [n for n in os.listdir(tmp_path) if "out" in n], os.listdir(tmp_path)   # no output, no temporary
        assert f"{proxy.host_port}/test/faults:1" not in ((store_dir / "index.json").read_text()
                                                          if (store_dir / "index.json").exists() else "")
        check_store(store_dir, img.blobs)
    finally:
        proxy.stop()


def test_convert_for_a_site_the_image_does_not_fit_fetches_no_layer(fault_image, plain_registry, test_certs,
                                                                   henv, store_dir, tmp_path):
    """An amd64 image for an arm64 site: the platform check fails (exit 1) from the config alone;
    the layer downloads already started are stopped (the proxy holds every layer blob back: were
    they waited for, the run would take the gate's 60 s), nothing is tagged, no output."""
    import threading

    img, layers = fault_image
    proxy = LoopbackProxy(test_certs, plain_registry)
    gate = threading.Event()
    for d in layers:
        proxy.gates[d.split(":")[1]] = gate
    out = tmp_path / "out.sqfs"
    try:
        t0 = time.monotonic()
        r = hpc("--json", "convert", f"docker://{proxy.host_port}/test/faults:1", "--ca-cert", str(test_certs.ca),
                "--profile", "alps-gh200", "-t", "charliecloud", "--format", "squashfs", "-o", str(out), env=henv)
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["platform"]["status"] == "fail"
        assert took < 30 and not out.exists()
        assert not any((store_dir / "blobs" / "sha256" / d.split(":")[1]).exists() for d in layers)
        assert f"{proxy.host_port}/test/faults:1" not in ((store_dir / "index.json").read_text()
                                                          if (store_dir / "index.json").exists() else "")
    finally:
        gate.set()
        proxy.stop()
