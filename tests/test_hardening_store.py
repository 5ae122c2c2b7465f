"""Issue 8 shared store: 8 hpcconv processes on one store against a real docker-registry, each
blob downloaded once (the registry's own access log counts the GETs), `store verify` clean, and
`store gc` removing unreferenced blobs safely while another process is pulling."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from registryfix import LoopbackProxy, Registry, clean_env, push_layout, sha256_file

pytestmark = pytest.mark.registry


def hpc(*args, env, timeout=180):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture
def henv(tmp_path, store_dir):
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(HOME=home, HPCCONV_STORE=store_dir)


@pytest.fixture(scope="module")
def shared(registry_root, tmp_path_factory):
    """A registry of its own (so its access log counts only this module's requests) holding three
    images that share layers: a = [base, one], b = [base, two], c = [base, one, three]."""
    from ocitools import T, build_image, image_layout, make_tar

    reg = Registry(registry_root, "shared").start()
    tmp = tmp_path_factory.mktemp("shared-layouts")
    base = make_tar([T("bin", "dir"), T("bin/sh", data=b"#!base\n" + os.urandom(300_000), mode=0o755),
                     T("etc", "dir"), T("etc/passwd", data=b"root:x:0:0::/:/bin/sh\n")])
    one = make_tar([T("opt", "dir"), T("opt/one", data=os.urandom(200_000))])
    two = make_tar([T("opt", "dir"), T("opt/two", data=os.urandom(200_000))])
    three = make_tar([T("opt/three", data=os.urandom(100_000))])
    imgs = {"a": build_image([base, one]), "b": build_image([base, two]), "c": build_image([base, one, three])}
    for name, img in imgs.items():
        push_layout(image_layout(tmp / name, img, "t"), "t", reg, f"shared/{name}:1")
    yield reg, imgs
    reg.stop()


def blob_digests(img) -> set[str]:
    m = json.loads(img.manifest)
    return {m["config"]["digest"]} | {d["digest"] for d in m["layers"]}


def test_eight_processes_share_one_store(shared, henv, store_dir, tmp_path):
    reg, imgs = shared
    since = len(reg.requests_log())
    src = {n: f"docker://{reg.host}/shared/{n}:1" for n in imgs}
    jobs = [("pull", "a"), ("pull", "b"), ("pull", "c"), ("convert", "a"), ("convert", "b"), ("convert", "c"),
            ("convert", "a"), ("pull", "c")]
    procs = []
    for i, (cmd, name) in enumerate(jobs):
        args = [sys.executable, "-m", "hpcconv.cli", "--quiet", cmd, src[name], "--insecure"]
        if cmd == "convert":
            args += ["--target", "charliecloud", "--format", "tar", "-o", str(tmp_path / f"out{i}-{name}.tar")]
        procs.append(subprocess.Popen(args, env=henv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(rc == 0 for rc, _ in results), results
    # each blob was downloaded exactly once, whatever the interleaving
    gets: dict[str, int] = {}
    for method, path, status in reg.requests_log()[since:]:
        if method == "GET" and "/blobs/" in path and status in (200, 206):
            d = path.rsplit("/", 1)[-1]
            gets[d] = gets.get(d, 0) + 1
    wanted = set().union(*(blob_digests(i) for i in imgs.values()))
    assert set(gets) == wanted and all(n == 1 for n in gets.values()), gets
    # outputs of the same image are identical
    outs = {}
    for f in tmp_path.glob("out*.tar"):
        outs.setdefault(f.stem.split("-")[1], set()).add(hashlib.sha256(f.read_bytes()).hexdigest())
    assert set(outs) == {"a", "b", "c"} and all(len(v) == 1 for v in outs.values())
    assert not list(tmp_path.glob(".out*"))                       # no temporaries left next to outputs
    # the store: every blob hashes to its name (checked here), and `store verify` agrees
    for p in (store_dir / "blobs" / "sha256").iterdir():
        assert sha256_file(p) == f"sha256:{p.name}"
    r = hpc("store", "verify", env=henv)
    assert r.returncode == 0 and "clean" in r.stdout, (r.stdout, r.stderr)
    r = hpc("--json", "store", "verify", env=henv)
    rep = json.loads(r.stdout)
    assert rep["clean"] and rep["refs"] == 3 and rep["blobs"] == len(wanted) + 3 and rep["partials"] == 0
    assert not list((store_dir / "tmp").iterdir())                # no partials, no lock files


def test_store_verify_finds_problems(shared, henv, store_dir):
    reg, imgs = shared
    assert hpc("pull", f"docker://{reg.host}/shared/c:1", "--insecure", env=henv).returncode == 0
    layers = [d["digest"] for d in json.loads(imgs["c"].manifest)["layers"]]
    bad = store_dir / "blobs" / "sha256" / layers[0].split(":")[1]
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    (store_dir / "blobs" / "sha256" / layers[2].split(":")[1]).unlink()
    r = hpc("store", "verify", env=henv)
    assert r.returncode == 4
    assert f"blob {layers[0]}: content hashes to" in r.stderr
    assert f"blob {layers[2]} is missing" in r.stderr and "2 problem(s)" in r.stdout


def test_gc_while_another_process_pulls(shared, henv, store_dir, test_certs, tmp_path):
    """Store: image b (tagged), an old unreferenced blob, and image c's last layer as an
    interrupted earlier pull left them (old, unreferenced). While a slowed pull of c runs (it finds
    those layers present and skips them), `store gc --grace 0` runs: it removes the unreferenced
    blob, keeps b's blobs, and keeps the layer the running pull relies on (its lease), so the pull
    ends with a complete image and `store verify` is clean."""
    from ocitools import sha256

    reg, imgs = shared
    assert hpc("pull", f"docker://{reg.host}/shared/b:1", "--insecure", env=henv).returncode == 0
    old = time.time() - 7200
    junk = b"unreferenced junk\n"
    junk_path = store_dir / "blobs" / "sha256" / sha256(junk).split(":")[1]
    junk_path.write_bytes(junk)
    c_layers = [d["digest"] for d in json.loads(imgs["c"].manifest)["layers"]]
    three = store_dir / "blobs" / "sha256" / c_layers[2].split(":")[1]
    # c's third layer, as if an earlier pull of c had been killed after fetching it (untagged)
    three.write_bytes(imgs["c"].blobs[c_layers[2]])
    for p in (junk_path, three):
        os.utime(p, (old, old))
    proxy = LoopbackProxy(test_certs, reg)
    proxy.throttle = 150_000
    try:
        pull = subprocess.Popen([sys.executable, "-m", "hpcconv.cli", "pull", f"docker://{proxy.host_port}/shared/c:1",
                                 "--ca-cert", str(test_certs.ca)], env=henv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not any(c_layers[1] in s.path for s in proxy.seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pull.poll() is None, "the pull finished before gc could run: slow it down more"
        r = hpc("--json", "store", "gc", "--grace", "0", env=henv)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
    finally:
        proxy.stop()
    assert sha256(junk) in rep["removed"] and not junk_path.exists()
    assert rep["index_cache_removed"] == 0
    assert c_layers[2] not in rep["removed"] and rep["kept_leased"] >= 1 and rep["live_leases"] >= 1
    assert not (set(rep["removed"]) & blob_digests(imgs["b"]))
    r = hpc("store", "verify", env=henv)
    assert r.returncode == 0, r.stdout + r.stderr
    # the pull removed its lease when it exited (a killed process's lease is removed by gc:
    # test_hardening_interrupt.py); everything left is referenced now
    assert not list((store_dir / "leases").iterdir())
    r = hpc("--json", "store", "gc", "--grace", "0", env=henv)
    rep = json.loads(r.stdout)
    assert rep["removed"] == [] and rep["live_leases"] == 0 and rep["stale_leases_removed"] == 0


def test_gc_reclaims_leftovers_of_dead_processes(henv, store_dir):
    """Partial downloads nobody holds (older than --partial-grace), lock files, atomic-write
    temporaries: what a SIGKILLed process leaves is reclaimed; a partial held by a live writer is not."""
    from hpcconv.store import Store

    st = Store.open(store_dir)
    tmp = store_dir / "tmp"
    old = time.time() - 3 * 86400
    stale = tmp / ("sha256-" + "a" * 64 + ".partial")
    stale.write_bytes(b"half")
    (tmp / ("sha256-" + "a" * 64 + ".lock")).write_bytes(b"")
    (tmp / ("sha256-" + "b" * 64 + ".lock")).write_bytes(b"")          # a lock without a partial
    cache = store_dir / "index-cache" / "sha256"
    cache.mkdir(parents=True)
    (cache / ("d" * 64 + ".v1.json")).write_text("{}")        # the index of a blob that is gone
    (cache / ("d" * 64 + ".diff_id")).write_text("x y\n")     # and its diff_id record
    (cache / ("d" * 64 + ".elf.json")).write_text("{}")       # and its files' ELF findings
    reuse = store_dir / "block-reuse" / "zstd-3-1048576-zstd1.5.7"
    reuse.mkdir(parents=True)
    (reuse / ("e" * 32 + ".idx")).write_bytes(
        b'hpcconv block-reuse 2\n{"path": "/nonexistent/image.sqfs", "base": 0, "stat": [1, 2, 3, 4]}\n')
    dead_tmp = store_dir / ".tmp-deadbeef"
    dead_tmp.write_bytes(b"{}")
    for p in (stale, dead_tmp):
        os.utime(p, (old, old))
    held_digest = "sha256:" + "c" * 64
    with st.writer(held_digest, 10) as w:            # a live writer in this process holds its partial
        w.write(b"12345")
        w._f.flush()
        os.utime(w.partial, (old, old))
        r = hpc("--json", "store", "gc", "--dry-run", env=henv)
        dry = json.loads(r.stdout)
        assert dry["dry_run"] and dry["partials_removed"] == 1 and stale.exists() and dead_tmp.exists()
        r = hpc("--json", "store", "gc", env=henv)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert w.partial.exists()
    assert rep["partials_removed"] == 1 and rep["temporaries_removed"] == 1 and rep["index_cache_removed"] == 3
    assert rep["block_reuse_removed"] == 1                   # an index of an image that is gone
    assert not list(cache.iterdir()) and not list(reuse.iterdir())
    assert not stale.exists() and not dead_tmp.exists()
    assert sorted(p.name for p in tmp.iterdir()) == [w.partial.name]
