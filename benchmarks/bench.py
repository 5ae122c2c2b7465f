#!/usr/bin/env python3
"""hpcconv vs its peers and the hardware floor (issue 7). Stdlib only; run as root.

    benchmarks/bench.py [--reps 3] [--ch-convert-reps 1] [--only CASE,...] [--json out.json]

What it does (see benchmarks/README.md):
1. builds the benchmark image once (benchmarks/build-image.sh; cached in the Docker engine);
2. starts two `docker-registry` processes on 127.0.0.1 sharing one storage directory: plain HTTP
   (hpcconv, skopeo) and TLS with a throwaway self-signed certificate (ch-image has no plain HTTP);
   pushes the image (and busybox) once, cached in BENCH_DIR/registry;
3. times every case, interleaved (rep 1 of every case, then rep 2, ...), cold: each run gets a fresh
   store / cache directory and its output is deleted afterwards; page cache is not dropped;
4. prints medians, ratios hpcconv/peer and hpcconv/floor, the peak RSS of each process tree
   (sampled every 50 ms from /proc, summed over the tree), and the temporary disk each run used
   (du of its scratch directories at the end, before clean-up; the output file is not counted).

The floor (one number per rep, the sum of two timed steps, both from the page cache):
* decompress: every layer blob of the image decompressed once with ISA-L (isal_zlib, one core, in
  one process, output discarded);
* compress: the flattened rootfs (a tar made once by `hpcconv export --raw`) compressed once with
  `zstd -3 -T2` (both cores), output discarded.
The compression-only floor (for the warm case) is the second step alone. Neither includes digest
checks, tar parsing, or the SquashFS builder's own work; hpcconv must do all three.

Every process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/var/tmp/hpcbench"))
DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/tmp/hpcconv-test/docker/docker.sock")
PLAIN_PORT = int(os.environ.get("BENCH_PLAIN_PORT", "5055"))
TLS_PORT = int(os.environ.get("BENCH_TLS_PORT", "5455"))
IMAGE = "hpcbench/hpcapp:1"
BUSYBOX = os.environ.get("BENCH_BUSYBOX", "hpcconv-test/busybox:amd64")
ZSTD_LEVEL, GZIP_LEVEL, BLOCK = 3, 6, "1M"
NCPU = len(os.sched_getaffinity(0))

started: list[subprocess.Popen] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_HOST": DOCKER_HOST, **kw.pop("env", {})}
    return subprocess.run(cmd, check=kw.pop("check", True), env=env, **kw)


def hpcconv_exe() -> list[str]:
    exe = Path(sys.executable).parent / "hpcconv"          # the console script, not a pyenv shim
    return [str(exe)] if exe.exists() else [shutil.which("hpcconv")]


# measuring -------------------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_rss(root: int) -> int:
    kids = _children_map()
    todo, total = [root], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, ()))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_measured(steps: list[tuple[list[str], dict]], cwd: Path | None = None, ok=(0,)) -> dict:
    """Run commands one after the other; wall time of all, peak summed RSS of each process tree."""
    t0 = time.monotonic()
    peak = 0
    for cmd, env in steps:
        p = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        done = threading.Event()
        seen = [0]

        def sample(pid=p.pid):
            while not done.is_set():
                seen[0] = max(seen[0], _tree_rss(pid))
                done.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)           # the case's whole process tree
            os.waitpid(p.pid, 0)
            done.set()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        th.join()
        err = p.stderr.read().decode(errors="replace")
        p.stderr.close()
        peak = max(peak, seen[0], ru.ru_maxrss * 1024)
        if p.returncode not in ok:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    return {"wall": time.monotonic() - t0, "rss": peak}


def du(*paths: Path) -> int:
    total = 0
    for p in paths:
        if p.exists():
            out = subprocess.run(["du", "-sb", str(p)], capture_output=True, text=True).stdout
            total += int(out.split()[0]) if out else 0
    return total


def loadavg() -> str:
    return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()


# setup -----------------------------------------------------------------------------------------------
def start_registries() -> None:
    reg = BENCH_DIR / "registry"
    certs = BENCH_DIR / "certs"
    (reg / "data").mkdir(parents=True, exist_ok=True)
    certs.mkdir(exist_ok=True)
    if not (certs / "cert.pem").exists():
        sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(certs / "key.pem"),
            "-out", str(certs / "cert.pem")], capture_output=True)
    for name, port, tls in (("plain", PLAIN_PORT, False), ("tls", TLS_PORT, True)):
        cfg = reg / f"{name}.yml"
        text = (f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n"
                f"    rootdirectory: {reg / 'data'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
        if tls:
            text += f"  tls:\n    certificate: {certs / 'cert.pem'}\n    key: {certs / 'key.pem'}\n"
        cfg.write_text(text)
        p = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=open(reg / f"{name}.log", "w"))
        started.append(p)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PLAIN_PORT}/v2/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError("registry did not start")


def start_engine() -> None:
    """The Docker engine at DOCKER_HOST; when nothing answers on the default (the test engine's)
    socket, start one there the way the test suite does: no bridge, no iptables, so containers never
    get a private-range address. Stopped at the end like the registries."""
    if sh(["docker", "version", "--format", "{{.Server.Version}}"], check=False,
          capture_output=True).returncode == 0:
        return
    sock = Path(DOCKER_HOST.removeprefix("unix://"))
    if not DOCKER_HOST.startswith("unix://") or not shutil.which("dockerd"):
        raise RuntimeError(f"no Docker engine answers at {DOCKER_HOST}")
    root = sock.parent
    root.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
                          "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                          "--pidfile", str(root / "dockerd.pid"), "-H", DOCKER_HOST],
                         stdout=subprocess.DEVNULL, stderr=open(root / "dockerd.log", "ab"), start_new_session=True)
    started.append(p)
    for _ in range(200):
        if p.poll() is not None:
            raise RuntimeError(f"dockerd exited ({p.returncode}); see {root / 'dockerd.log'}")
        if sh(["docker", "version"], check=False, capture_output=True).returncode == 0:
            log(f"started dockerd at {DOCKER_HOST} (pid {p.pid})")
            return
        time.sleep(0.3)
    raise RuntimeError("dockerd did not come up in time")


def stop_started() -> None:
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in started:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def in_registry(repo: str, tag: str) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{PLAIN_PORT}/v2/{repo}/manifests/{tag}", method="HEAD",
                                 headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    try:
        urllib.request.urlopen(req, timeout=5)
        return True
    except OSError:
        return False


def ensure_busybox() -> None:
    """The small case's image: the test suite's busybox base (Debian's busybox-static in one layer),
    which the suite loads into its engine; on a machine where the suite has not run yet, make it
    here with the suite's own helpers."""
    if sh(["docker", "image", "inspect", BUSYBOX], check=False, capture_output=True).returncode == 0:
        return
    if BUSYBOX != "hpcconv-test/busybox:amd64":
        raise RuntimeError(f"{BUSYBOX} (BENCH_BUSYBOX) is not in the Docker engine")
    sys.path.insert(0, str(HERE.parent / "tests"))
    from dockertools import busybox_image, docker_save_archive
    img = busybox_image("amd64", Path("/var/tmp/hpcconv-test/debs"))
    sh(["docker", "load"], input=docker_save_archive(img, BUSYBOX), stdout=subprocess.DEVNULL)


def push(local: str, repo: str, tag: str) -> None:
    if in_registry(repo, tag):
        return
    remote = f"127.0.0.1:{PLAIN_PORT}/{repo}:{tag}"
    sh(["docker", "tag", local, remote])
    sh(["docker", "push", remote], stdout=subprocess.DEVNULL)
    sh(["docker", "rmi", remote], stdout=subprocess.DEVNULL)


def image_facts(repo: str, tag: str) -> dict:
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    m = json.load(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{PLAIN_PORT}/v2/{repo}/manifests/{tag}", headers=accept)))
    return {"layers": len(m["layers"]), "compressed": sum(l["size"] for l in m["layers"]),
            "digests": [l["digest"] for l in m["layers"]]}


# the floor --------------------------------------------------------------------------------------------
FLOOR_DECOMPRESS = r"""
import sys, time
from isal import isal_zlib
t = time.monotonic()
n = 0
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        d = isal_zlib.decompressobj(31)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            n += len(d.decompress(chunk))
            while d.unused_data:                 # multi-member gzip
                rest = d.unused_data
                d = isal_zlib.decompressobj(31)
                n += len(d.decompress(rest))
print(n)
"""


def prepare_floor(repo: str, tag: str) -> dict:
    """A store with the blobs and the flattened tar (made once; reused)."""
    fl = BENCH_DIR / "floor" / repo
    store, tar = fl / "store", fl / "rootfs.tar"
    if not tar.exists():
        fl.mkdir(parents=True, exist_ok=True)
        sh(hpcconv_exe() + ["-q", "export", f"docker://127.0.0.1:{PLAIN_PORT}/{repo}:{tag}", "--insecure",
                            "--store", str(store), "--raw", "-o", str(tar)])
    facts = image_facts(repo, tag)
    blobs = [str(store / "blobs" / d.replace(":", "/")) for d in facts["digests"]]
    return {"blobs": blobs, "tar": tar, "rootfs_bytes": tar.stat().st_size}


def floor_case(fl: dict) -> dict:
    # warm the page cache
    for b in fl["blobs"] + [str(fl["tar"])]:
        sh(["cat", b], stdout=subprocess.DEVNULL)
    d = run_measured([([sys.executable, "-c", FLOOR_DECOMPRESS] + fl["blobs"], {})])
    c = run_measured([(["zstd", f"-{ZSTD_LEVEL}", f"-T{NCPU}", "-q", "-c", "-o", "/dev/null", str(fl["tar"])], {})])
    return {"wall": d["wall"] + c["wall"], "decompress": d["wall"], "compress": c["wall"],
            "rss": max(d["rss"], c["rss"]), "disk": 0}


# cases ------------------------------------------------------------------------------------------------
def hpcconv_case(repo, tag, target, comp, warm_store: Path | None = None, profile: str | None = None,
                 passes: int = 1) -> dict:
    work = BENCH_DIR / "runs" / f"hpcconv-{repo}-{target}-{comp}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = warm_store or work / "store"
    fmt = {"charliecloud": "squashfs", "singularity": "sif", "shifter": "squashfs"}[target]
    out = work / f"out.{fmt}"
    cmd = hpcconv_exe() + ["-q", "convert", f"docker://127.0.0.1:{PLAIN_PORT}/{repo}:{tag}", "--insecure",
                           "--store", str(store), "-t", target, "--format", fmt, "--compression", comp,
                           "-o", str(out)]
    if profile:
        cmd += ["--profile", profile]
    env = {"HPCCONV_SQUASHFS_LEVEL": f"zstd={ZSTD_LEVEL},gzip={GZIP_LEVEL}", "TMPDIR": str(work),
           "HPCCONV_FLATTEN_PASSES": str(passes)}
    r = run_measured([(cmd, env)], ok=(0, 1) if profile else (0,))   # 1: a site check failed (output written)
    r["out"] = du(out) if out.is_dir() else out.stat().st_size     # shifter: a directory (<id>.squashfs, .meta)
    blobs = du(store / "blobs") if warm_store is None else 0
    r["disk"] = du(work) - r["out"] - blobs        # scratch beyond the layer blobs and the output
    r["blobs"] = blobs
    shutil.rmtree(work, ignore_errors=True)
    return r


def umoci_case(repo, tag, comp) -> dict:
    work = BENCH_DIR / "runs" / f"umoci-{repo}-{comp}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out = work / "out.sqfs"
    lvl = ZSTD_LEVEL if comp == "zstd" else GZIP_LEVEL
    steps = [
        (["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://127.0.0.1:{PLAIN_PORT}/{repo}:{tag}",
          f"oci:{work / 'oci'}:{tag}"], {}),
        (["umoci", "unpack", "--image", f"{work / 'oci'}:{tag}", str(work / "bundle")], {}),
        (["mksquashfs", str(work / "bundle" / "rootfs"), str(out), "-noappend", "-no-progress", "-quiet",
          "-comp", comp, "-Xcompression-level", str(lvl), "-b", BLOCK, "-processors", str(NCPU)], {}),
    ]
    r = run_measured(steps)
    r["out"] = out.stat().st_size
    r["blobs"] = du(work / "oci")
    r["disk"] = du(work) - r["out"] - r["blobs"]
    shutil.rmtree(work, ignore_errors=True)
    return r


def ch_case(repo, tag, comp: str | None) -> dict:
    """ch-image --no-cache pull from the TLS mirror, then ch-convert's mksquashfs with the compressor
    swapped (comp), or ch-convert itself (comp None: its defaults, gzip-9, 64 KiB blocks)."""
    work = BENCH_DIR / "runs" / f"ch-{repo}-{comp}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    storage = work / "storage"
    out = work / "out.sqfs"
    ref = f"127.0.0.1:{TLS_PORT}/{repo}:{tag}"
    env = {"USER": "root", "CH_IMAGE_STORAGE": str(storage),
           "REQUESTS_CA_BUNDLE": str(BENCH_DIR / "certs" / "cert.pem"),
           "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    env.pop("CURL_CA_BUNDLE", None)
    steps = [(["/usr/bin/python3", "/usr/bin/ch-image", "--no-cache", "pull", ref], env)]
    if comp is None:
        steps.append((["ch-convert", "-i", "ch-image", ref, str(out)], env))
    else:
        lvl = ZSTD_LEVEL if comp == "zstd" else GZIP_LEVEL
        img = storage / "img" / ref.replace("/", "%").replace(":", "+")
        steps.append((["mksquashfs", str(img), str(out), "-noappend", "-no-progress", "-quiet", "-all-root",
                       "-comp", comp, "-Xcompression-level", str(lvl), "-b", BLOCK, "-processors", str(NCPU),
                       "-e", str(img / ".git"), "-e", str(img / ".gitignore")], env))
    r = run_measured(steps)
    r["out"] = out.stat().st_size
    r["blobs"] = du(storage / "dlcache")
    r["disk"] = du(work) - r["out"] - r["blobs"]
    shutil.rmtree(work, ignore_errors=True)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ch-convert-reps", type=int, default=1, help="ch-convert with its defaults is slow (~80 s)")
    ap.add_argument("--only", default="", help="comma-separated case names to run")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "results.json")
    ap.add_argument("--warm-profile", default="perlmutter-cpu")
    ap.add_argument("--table-from", type=Path, help="print the table of an earlier run's JSON and exit")
    args = ap.parse_args()
    if args.table_from:
        doc = json.loads(args.table_from.read_text())
        _fix_dir_outputs(doc["results"])
        print(table(doc["results"], doc["meta"]))
        return 0
    if os.geteuid() != 0:
        print("run as root (umoci unpack, the Docker engine)", file=sys.stderr)
        return 2
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    # an installed package has its bytecode compiled; an editable one run with PYTHONDONTWRITEBYTECODE
    # (or just edited) would compile its changed modules from source in every timed run (~0.1 s)
    import hpcconv
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(hpcconv.__file__).parent)],
                   check=False, env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: sys.exit(130))
    try:
        start_registries()
        if not (in_registry("hpcapp", "1") and in_registry("busybox", "1")):
            # the registry's storage keeps the images between runs (and machines, when BENCH_DIR is
            # kept): the engine and the image build are needed only the first time
            start_engine()
            sh(["bash", str(HERE / "build-image.sh")], env={"BENCH_DIR": str(BENCH_DIR)})
            push(IMAGE, "hpcapp", "1")
            ensure_busybox()
            push(BUSYBOX, "busybox", "1")
        big, small = image_facts("hpcapp", "1"), image_facts("busybox", "1")
        log(f"hpcapp: {big['layers']} layers, {big['compressed'] / 1e6:.0f} MB compressed")
        fl_big, fl_small = prepare_floor("hpcapp", "1"), prepare_floor("busybox", "1")
        log(f"hpcapp rootfs tar: {fl_big['rootfs_bytes'] / 1e6:.0f} MB")
        warm = BENCH_DIR / "warm-store"
        if not (warm / "index-cache").exists():
            # blobs in the store, and each layer's header index for the two-pass case (an inspect
            # with two passes flattens the image once and keeps the indexes)
            sh(hpcconv_exe() + ["-q", "inspect", f"docker://127.0.0.1:{PLAIN_PORT}/hpcapp:1", "--insecure",
                                "--store", str(warm)], stdout=subprocess.DEVNULL, env={"HPCCONV_FLATTEN_PASSES": "2"})
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        first = BENCH_DIR / "warm-first-profile.sqfs"
        if not only or any(k.startswith("warm") for k in only):
            # the warm case converts for a second profile: the image for the first (default) one is
            # there, as it is for a user, and its compressed blocks may be reused (made afresh each
            # run, so that its block-reuse index is the one this hpcconv writes)
            sh(hpcconv_exe() + ["-q", "convert", f"docker://127.0.0.1:{PLAIN_PORT}/hpcapp:1", "--insecure",
                                "--store", str(warm), "-t", "charliecloud", "--format", "squashfs", "--force",
                                "--compression", "zstd", "-o", str(first)], stdout=subprocess.DEVNULL,
               env={"HPCCONV_SQUASHFS_LEVEL": f"zstd={ZSTD_LEVEL},gzip={GZIP_LEVEL}"})
        cases = {
            "floor": lambda: floor_case(fl_big),
            "hpcconv charliecloud zstd": lambda: hpcconv_case("hpcapp", "1", "charliecloud", "zstd"),
            "hpcconv sif zstd": lambda: hpcconv_case("hpcapp", "1", "singularity", "zstd"),
            "hpcconv shifter zstd": lambda: hpcconv_case("hpcapp", "1", "shifter", "zstd"),
            "skopeo+umoci+mksquashfs zstd": lambda: umoci_case("hpcapp", "1", "zstd"),
            "ch-image+mksquashfs zstd": lambda: ch_case("hpcapp", "1", "zstd"),
            "hpcconv charliecloud gzip": lambda: hpcconv_case("hpcapp", "1", "charliecloud", "gzip"),
            "hpcconv sif gzip": lambda: hpcconv_case("hpcapp", "1", "singularity", "gzip"),
            "hpcconv shifter gzip": lambda: hpcconv_case("hpcapp", "1", "shifter", "gzip"),
            "skopeo+umoci+mksquashfs gzip": lambda: umoci_case("hpcapp", "1", "gzip"),
            "warm: hpcconv charliecloud zstd": lambda: hpcconv_case("hpcapp", "1", "charliecloud", "zstd", warm,
                                                                    args.warm_profile),
            "warm two-pass + index cache: hpcconv charliecloud zstd": lambda: hpcconv_case(
                "hpcapp", "1", "charliecloud", "zstd", warm, args.warm_profile, passes=2),
            "two passes: hpcconv charliecloud zstd": lambda: hpcconv_case("hpcapp", "1", "charliecloud", "zstd",
                                                                          passes=2),
            "small floor": lambda: floor_case(fl_small),
            "small: hpcconv charliecloud zstd": lambda: hpcconv_case("busybox", "1", "charliecloud", "zstd"),
            "small: skopeo+umoci+mksquashfs zstd": lambda: umoci_case("busybox", "1", "zstd"),
            "small: ch-image+mksquashfs zstd": lambda: ch_case("busybox", "1", "zstd"),
            "ch-image+ch-convert (gzip-9, 64K)": lambda: ch_case("hpcapp", "1", None),
        }
        load0 = open("/proc/loadavg").read().strip()
        results: dict[str, list[dict]] = {k: [] for k in cases if not only or k in only}
        for rep in range(args.reps):
            for name in results:
                if name.startswith("ch-image+ch-convert") and rep >= args.ch_convert_reps:
                    continue
                la = loadavg()
                try:
                    r = cases[name]()
                except (RuntimeError, OSError) as e:
                    log(f"rep {rep + 1} {name}: FAILED: {e}")
                    continue
                r["load"] = la
                results[name].append(r)
                log(f"rep {rep + 1} {name}: {r['wall']:.2f} s, rss {r['rss'] / 2**20:.0f} MiB, "
                    f"disk {r.get('disk', 0) / 2**20:.0f} MiB, load {la}")
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpus": NCPU, "commit": commit, "load_start": load0, "uptime": open("/proc/loadavg").read().strip(),
                "image": big, "rootfs_tar_bytes": fl_big["rootfs_bytes"], "zstd_level": ZSTD_LEVEL,
                "gzip_level": GZIP_LEVEL, "block": BLOCK}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        print(table(results, meta))
    finally:
        stop_started()
    return 0


def _fix_dir_outputs(results: dict) -> None:
    """Runs from before the fix above counted Shifter's output directory as scratch: move its size
    (less the scratch the Charliecloud run of the same rep had, the store's index cache) to `out`."""
    for k, v in results.items():
        if "shifter" not in k:
            continue
        cc = results.get(k.replace("shifter", "charliecloud"), [])
        for i, r in enumerate(v):
            if r.get("out", 0) < 1 << 20 and r.get("disk", 0) > 1 << 20:
                scratch = cc[i]["disk"] if i < len(cc) else 0
                r["out"], r["disk"] = r["out"] + r["disk"] - scratch, scratch


def table(results: dict, meta: dict) -> str:
    med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items() if v}
    peers = {"zstd": [k for k in med if k.startswith(("skopeo", "ch-image+mksquashfs")) and k.endswith("zstd")],
             "gzip": [k for k in med if k.startswith("skopeo") and k.endswith("gzip")]}
    lines = [f"{meta['date']}, hpcconv {meta['commit']}, {meta['cpus']} CPUs, loadavg at start {meta['load_start']}, "
             f"at end {meta['uptime']}; image "
             f"{meta['image']['layers']} layers, {meta['image']['compressed'] / 1e6:.0f} MB compressed, rootfs tar "
             f"{meta['rootfs_tar_bytes'] / 1e6:.0f} MB; zstd-{meta['zstd_level']} / gzip-{meta['gzip_level']}, "
             f"block {meta['block']}",
             "",
             "| case | median s | min–max s | n | hpcconv/floor | hpcconv/peer | peak RSS MiB | temp disk MiB | output MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in results.items():
        if not v:
            continue
        walls = [r["wall"] for r in v]
        small = k.startswith("small")
        floor = med.get("small floor" if small else "floor")
        warm = k.startswith("warm")
        fl = ""
        if floor and "floor" not in k:
            if warm:
                cf = statistics.median(r["compress"] for r in results.get("floor", [])) if results.get("floor") else None
                fl = f"{med[k] / cf:.2f} (compress-only)" if cf else ""
            else:
                fl = f"{med[k] / floor:.2f}"
        pr = ""
        if k.startswith(("hpcconv", "small: hpcconv")) and not warm:
            comp = "zstd" if k.endswith("zstd") else "gzip"
            cands = [p for p in med if p.startswith("small: ") == small and p.replace("small: ", "").startswith(
                ("skopeo", "ch-image+mksquashfs")) and p.endswith(comp)]
            pr = ", ".join(f"{p.split(' ')[-2] if small else p.split(' ')[0]}: {med[k] / med[p]:.2f} "
                           + (f"({med[p] / med[k]:.1f}× faster)" if med[p] >= med[k] else
                              f"({med[k] / med[p]:.1f}× slower)") for p in cands)
        extra = ""
        if "floor" in k:
            extra = f" (decompress {statistics.median(r['decompress'] for r in v):.2f} + compress " \
                    f"{statistics.median(r['compress'] for r in v):.2f})"
        lines.append(f"| {k}{extra} | {med[k]:.2f} | {min(walls):.2f}–{max(walls):.2f} | {len(v)} | {fl} | {pr} | "
                     f"{max(r['rss'] for r in v) / 2**20:.0f} | {max(r.get('disk', 0) for r in v) / 2**20:.0f} | "
                     f"{(v[0].get('out', 0) / 1e6):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
