"""Preparation for a profile (rewrite/prepare.py through hpcconv.pipeline): bind targets, ld.so.conf.d
entries, environment, dropped driver libraries, compression, on real images and real sinks.

Oracles: the output read back by tools that are not hpcconv (the file system of a `dir` output,
Python's tarfile, `unsquashfs`, the real `ldconfig` rebuilding the loader cache of an output tree,
the Shifter meta and Apptainer env scripts as written), never hpcconv's own readers."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from conftest import need
from ocitools import T, build_image, image_layout, make_tar
from preptools import CLIBDIR, glibc_files, host_lib, layout_of, ldconfig, marked_libmpi, rootfs

from hpcconv import pipeline
from hpcconv.emit import sinks
from hpcconv.profiles import load_profile
from hpcconv.sources import SourceOptions

LUMI_DIRS = ["opt/hpcconv/host-mpi/lib", "opt/hpcconv/host-mpi/dep", "opt/cray", "var/spool/slurmd",
             "users", "project", "scratch", "flash", "appl", "pfs"]


def hpcconv(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def mpi_image(tmp_path_factory):
    """glibc, the container's own libmpi.so.12 (a marked build) and a loader cache, with an image
    LD_LIBRARY_PATH of its own."""
    need("gcc")
    d = tmp_path_factory.mktemp("img")
    ctr = marked_libmpi(d / "ctr", "container")
    root = rootfs(d / "root", {**glibc_files(), f"{CLIBDIR}/libmpi.so.12.1.0": ctr},
                  {f"{CLIBDIR}/libmpi.so.12": "libmpi.so.12.1.0"})
    ldconfig(root)
    return layout_of(d, root, config={"Env": ["PATH=/usr/bin:/bin", "LD_LIBRARY_PATH=/opt/app/lib",
                                              "FI_PROVIDER=tcp"]})


def ldcache(root) -> list[tuple[str, str]]:
    out = subprocess.run(["ldconfig", "-r", str(root), "-p"], capture_output=True, text=True, check=True).stdout
    return [(ln.split()[0], ln.rsplit("=> ", 1)[1]) for ln in out.splitlines() if "=>" in ln]


def test_dir_output_and_a_rebuilt_loader_cache_put_the_host_mpi_first(mpi_image, tmp_path, store_dir):
    out = tmp_path / "img"
    r = hpcconv("convert", f"oci:{mpi_image}", "--profile", "lumi-c", "--format", "dir", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    for d in LUMI_DIRS:
        assert (out / d).is_dir() and not os.listdir(out / d), d
    assert not os.path.lexists(out / "usr/lib64/libcxi.so.1")       # a file bind target is not faked
    conf = (out / "etc/ld.so.conf.d/00-hpcconv-host-mpi.conf").read_text().splitlines()
    assert [ln for ln in conf if not ln.startswith("#")] == ["/opt/hpcconv/host-mpi/lib", "/opt/hpcconv/host-mpi/dep"]
    assert sorted(os.listdir(out / "etc/ld.so.conf.d"))[0] == "00-hpcconv-host-mpi.conf"
    env = dict(ln.split("=", 1) for ln in (out / "ch/environment").read_text().splitlines())
    assert env["LD_LIBRARY_PATH"] == "/opt/hpcconv/host-mpi/lib:/opt/hpcconv/host-mpi/dep:/opt/app/lib"
    assert env["FI_PROVIDER"] == "tcp"      # lumi-c sets no fabric environment: the image's value stays
    # no host library in the image: the cache still lists only the container's libmpi
    assert [p for n, p in ldcache(out) if n == "libmpi.so.12"] == [f"/{CLIBDIR}/libmpi.so.12"]
    # a runtime binds the host MPI and rebuilds the cache (Sarus: ldconfig -r): the host's comes first
    host = out / "opt/hpcconv/host-mpi/lib"
    marked_libmpi(tmp_path / "host", "host", "12.4.0")
    for f in os.listdir(tmp_path / "host"):
        shutil.copy(tmp_path / "host" / f, host / f, follow_symlinks=False)
    subprocess.run(["ldconfig", "-r", str(out)], check=True)
    hits = [p for n, p in ldcache(out) if n == "libmpi.so.12"]
    assert hits[0] == "/opt/hpcconv/host-mpi/lib/libmpi.so.12" and f"/{CLIBDIR}/libmpi.so.12" in hits
    # control: without hpcconv's ld.so.conf.d entry the host directory is not in the cache at all
    (out / "etc/ld.so.conf.d/00-hpcconv-host-mpi.conf").unlink()
    subprocess.run(["ldconfig", "-r", str(out)], check=True)
    assert [p for n, p in ldcache(out) if n == "libmpi.so.12"] == [f"/{CLIBDIR}/libmpi.so.12"]


@pytest.mark.parametrize("tool", ["tar2sqfs", "mksquashfs"])
def test_squashfs_sinks_take_the_appended_entries(mpi_image, tmp_path, store_dir, monkeypatch, tool):
    need(tool)
    if tool == "mksquashfs":   # the sink's fallback when tar2sqfs is not installed
        real = sinks._which
        monkeypatch.setattr(sinks, "_which", lambda t: None if t == "tar2sqfs" else real(t))
    out = tmp_path / "img.sqfs"
    res = pipeline.convert(f"oci:{mpi_image}", SourceOptions(), "charliecloud", out, "squashfs",
                           profile=load_profile("lumi-c"))
    assert not res.checks.failed, [c for c in res.checks.items if c.status == "fail"]
    lls = subprocess.run([need("unsquashfs"), "-lls", str(out)], capture_output=True, text=True, check=True).stdout
    names = {ln.split()[-1].replace("squashfs-root/", "", 1): ln[0] for ln in lls.splitlines() if "squashfs-root/" in ln}
    for d in LUMI_DIRS + ["etc/ld.so.conf.d", "opt/hpcconv"]:
        assert names.get(d) == "d", d
    assert names["etc/ld.so.conf.d/00-hpcconv-host-mpi.conf"] == "-"


def test_shifter_meta_and_squashfs(mpi_image, tmp_path, store_dir):
    need("unsquashfs")
    out = tmp_path / "shifter"
    out.mkdir()
    r = hpcconv("convert", f"oci:{mpi_image}", "--target", "shifter", "--profile", "perlmutter-cpu", "-o", str(out),
                "--force")
    assert r.returncode == 0, r.stderr
    meta = next(out.glob("*.meta")).read_text().splitlines()
    assert ("ENV: LD_LIBRARY_PATH=/opt/udiImage/modules/mpich:/opt/udiImage/modules/mpich/dep:/opt/app/lib"
            in meta)
    lls = subprocess.run(["unsquashfs", "-lls", str(next(out.glob("*.squashfs")))], capture_output=True, text=True,
                         check=True).stdout
    for d in ("global/homes", "global/cfs", "pscratch", "etc/libibverbs.d"):
        assert f"squashfs-root/{d}\n" in lls + "\n", d
    assert "squashfs-root/opt/udiImage" not in lls      # Shifter's own site content goes there
    c = {x["name"]: x for x in json.loads(hpcconv("--json", "convert", f"oci:{mpi_image}", "--target", "shifter",
                                                  "--profile", "perlmutter-cpu", "-o", str(out), "--force").stdout)["checks"]}
    assert "Shifter provides /opt/udiImage itself" in c["prepare.mpi"]["detail"]


def test_apptainer_environment(mpi_image, tmp_path, store_dir):
    out = tmp_path / "sandbox"
    r = hpcconv("convert", f"oci:{mpi_image}", "--target", "singularity", "--format", "sandbox",
                "--profile", "supermuc-ng", "-o", str(out))
    assert r.returncode == 0, r.stderr
    env = subprocess.run(["sh", "-c", f". {out}/.singularity.d/env/10-docker2singularity.sh; env"],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}).stdout.splitlines()
    assert "LD_LIBRARY_PATH=/opt/hpcconv/host-mpi/lib:/opt/hpcconv/host-mpi/dep:/opt/app/lib" in env
    assert "FI_PROVIDER=psm2" in env and "I_MPI_FABRICS=shm:ofi" in env      # the site's mpi.env wins
    assert (out / "hppfs").is_dir()


def _tar_members(path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with tarfile.open(path) as tf:
        for ti in tf:
            data = tf.extractfile(ti).read() if ti.isfile() else None
            assert ti.name not in out, f"{ti.name} twice"
            out[ti.name.rstrip("/")] = (ti, data)
    return out


def test_export_replaces_a_stale_preparation_and_fixes_ld_so_conf(tmp_path, store_dir):
    layer = make_tar([T("etc", "dir"), T("etc/ld.so.conf", data=b"/usr/local/lib\n"),
                      T("etc/ld.so.conf.d", "dir"), T("etc/ld.so.conf.d/00-hpcconv-host-mpi.conf", data=b"/old\n"),
                      T("scratch", "sym", link="/tmp"), T("project", data=b"not a directory"),
                      T("usr", "dir"), T("usr/lib", "dir"), T("usr/lib/x86_64-linux-gnu", "dir"),
                      T(f"{CLIBDIR}/libc.so.6", data=open(host_lib("libc.so.6"), "rb").read())])
    layout = image_layout(tmp_path / "l", build_image([layer]))
    out = tmp_path / "root.tar"
    r = hpcconv("--json", "export", f"oci:{layout}", "--profile", "lumi-c", "-o", str(out))
    assert r.returncode == 0, r.stderr
    m = _tar_members(out)
    assert m["etc/ld.so.conf.d/00-hpcconv-host-mpi.conf"][1].decode().splitlines()[1:] == \
        ["/opt/hpcconv/host-mpi/lib", "/opt/hpcconv/host-mpi/dep"]
    assert m["etc/ld.so.conf"][1] == b"/usr/local/lib\ninclude /etc/ld.so.conf.d/*.conf\n"
    assert m["scratch"][0].issym() and m["project"][0].isfile()          # never replaced
    assert m["opt/hpcconv/host-mpi/lib"][0].isdir() and m["opt/hpcconv"][0].isdir()
    names = list(m)
    for p in names:                                                       # parents before contents
        parent = p.rsplit("/", 1)[0] if "/" in p else None
        assert parent is None or names.index(parent) < names.index(p), p
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["prepare.site"]["status"] == "warn"
    assert "/scratch is a symlink" in checks["prepare.site"]["detail"]
    assert "/project is a file" in checks["prepare.site"]["detail"]
    assert checks["prepare.env"]["status"] == "warn" and "LD_LIBRARY_PATH=" in checks["prepare.env"]["detail"]
    raw = tmp_path / "raw.tar"
    assert hpcconv("export", f"oci:{layout}", "--profile", "lumi-c", "--raw", "-o", str(raw)).returncode == 0
    rm = _tar_members(raw)
    assert "opt/hpcconv" not in rm and rm["etc/ld.so.conf.d/00-hpcconv-host-mpi.conf"][1] == b"/old\n"


def test_nvidia_driver_libraries_dropped_and_bind_targets_made(tmp_path, store_dir):
    lib = f"{CLIBDIR}/libcuda.so.535.104.05"
    layer = make_tar([T("usr", "dir"), T("usr/lib", "dir"), T(CLIBDIR, "dir"),
                      T(f"{CLIBDIR}/libc.so.6", data=open(host_lib("libc.so.6"), "rb").read()),
                      T(lib, data=b"stale driver"), T(f"{CLIBDIR}/libcuda.so.1", "sym", link="libcuda.so.535.104.05"),
                      T(f"{CLIBDIR}/libnvidia-ml.so.535.104.05", data=b"nvml"),
                      T("opt", "dir"), T("opt/copy-of-libcuda", "hard", link=lib),
                      T("usr/local", "dir"), T("usr/local/cuda-12.4", "dir"), T("usr/local/cuda-12.4/compat", "dir"),
                      T("usr/local/cuda-12.4/compat/libcuda.so.550.54.15", data=b"forward compat")])
    layout = image_layout(tmp_path / "l", build_image([layer], config={"Env": ["CUDA_VERSION=12.4.1"]}))
    out = tmp_path / "img"
    r = hpcconv("--json", "convert", f"oci:{layout}", "--profile", "perlmutter-gpu", "--format", "dir", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    for gone in (lib, f"{CLIBDIR}/libcuda.so.1", f"{CLIBDIR}/libnvidia-ml.so.535.104.05"):
        assert not os.path.lexists(out / gone), gone
    # the same inode under another name: the layer stores the content under the driver's name, which
    # the single-pass flatten yields first, so the hardlink goes with it, reported
    assert not os.path.lexists(out / "opt/copy-of-libcuda")
    dropped = [c for c in json.loads(r.stdout)["checks"] if c["name"] == "prepare.hardlinks"]
    assert dropped[0]["status"] == "warn" and "/opt/copy-of-libcuda" in dropped[0]["detail"]
    assert (out / "usr/local/cuda-12.4/compat/libcuda.so.550.54.15").read_bytes() == b"forward compat"
    for d in ("usr/local/nvidia/lib64", "usr/local/nvidia/lib", "usr/local/nvidia/bin"):
        assert (out / d).is_dir()
    assert "/usr/local/nvidia/lib64" in (out / "etc/ld.so.conf.d/01-hpcconv-nvidia.conf").read_text().splitlines()
    # the two-pass flatten gives the content to the first name in path order: there it stays
    out2 = tmp_path / "img2"
    r2 = hpcconv("convert", f"oci:{layout}", "--profile", "perlmutter-gpu", "--format", "dir", "-o", str(out2),
                 env={"HPCCONV_FLATTEN_PASSES": "2"})
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert (out2 / "opt/copy-of-libcuda").read_bytes() == b"stale driver"
    assert not os.path.lexists(out2 / lib)
    env = dict(ln.split("=", 1) for ln in (out / "ch/environment").read_text().splitlines())
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["LD_LIBRARY_PATH"] == ("/opt/udiImage/modules/mpich:/opt/udiImage/modules/mpich/dep:"
                                      "/usr/local/nvidia/lib64:/usr/local/nvidia/lib")
    assert env["PATH"].endswith(":/usr/local/nvidia/bin") and env["PATH"].startswith("/usr/local/sbin:")
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["prepare.gpu"]["status"] == "pass" and "3 stale driver libraries dropped" in checks["prepare.gpu"]["detail"]


def test_compression_follows_the_site(mpi_image, tmp_path, store_dir):
    need("unsquashfs")
    zsite = tmp_path / "zsite.toml"
    zsite.write_text('extends = ["lumi-c"]\nsources = ["test"]\n[host]\nsquashfs = ["zstd", "gzip"]\n')
    lz4 = tmp_path / "lz4site.toml"
    lz4.write_text('extends = ["lumi-c"]\nsources = ["test"]\n[host]\nsquashfs = ["lz4"]\n')

    def conv(name, *extra):
        out = tmp_path / f"{name}.sqfs"
        r = hpcconv("--json", "convert", f"oci:{mpi_image}", "-o", str(out), *extra)
        assert r.returncode == 0, r.stderr
        info = subprocess.run(["unsquashfs", "-s", str(out)], capture_output=True, text=True).stdout
        comp = next(ln.split()[-1] for ln in info.splitlines() if ln.startswith("Compression"))
        return comp, {c["name"]: c for c in json.loads(r.stdout)["checks"]}

    comp, c = conv("z", "--profile", str(zsite))
    assert comp == "zstd" and c["prepare.compression"]["status"] == "pass"
    comp, c = conv("g", "--profile", "lumi-c")
    assert comp == "gzip"
    comp, c = conv("asked", "--profile", "lumi-c", "--compression", "zstd")
    assert comp == "zstd" and c["prepare.compression"]["status"] == "warn"
    comp, c = conv("l", "--profile", str(lz4))
    assert comp == "gzip" and c["prepare.compression"]["status"] == "warn" and "lz4" in c["prepare.compression"]["detail"]
    comp, _ = conv("none")
    assert comp == "gzip"


def test_runner_keeps_the_stream_contract_for_additions():
    """Unit level: additions under missing parents get those parents first, existing dirs are not
    repeated, and a hardlink to a dropped entry goes with it."""
    from hpcconv.entries import DIR, FILE, HARDLINK, Entry
    from hpcconv.rewrite.base import Pass, PassRunner

    class P(Pass):
        def edit(self, e, head):
            return None if e.path == "a/drop" else e

        def additions(self):
            return [Entry("a", DIR), Entry("x/y/z", DIR), Entry("x/y/z/f", FILE, size=2, reader=io.BytesIO(b"hi"))]

    stream = [Entry("a", DIR), Entry("a/drop", FILE, size=1, reader=io.BytesIO(b"1")),
              Entry("a/link", HARDLINK, linkname="a/drop"), Entry("a/keep", FILE, size=0)]
    got = [(e.path, e.type) for e in PassRunner([P()]).transform(iter(stream))]
    assert got == [("a", "dir"), ("a/keep", "file"), ("x", "dir"), ("x/y", "dir"), ("x/y/z", "dir"),
                   ("x/y/z/f", "file")]


def test_target_runtime_against_the_site_and_tar_compression(mpi_image, tmp_path, store_dir):
    out = tmp_path / "img.tar.gz"
    r = hpcconv("--json", "convert", f"oci:{mpi_image}", "--profile", "lumi-c", "--format", "tar", "-o", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    c = {x["name"]: x for x in data["checks"]}
    assert c["prepare.runtime"]["status"] == "warn" and "singularity" in c["prepare.runtime"]["detail"]
    assert data["compression"] == "gzip" and "prepare.compression" not in c
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"                       # gzip, whatever the site's squashfs list
    sif = tmp_path / "img.sif"
    r = hpcconv("--json", "convert", f"oci:{mpi_image}", "--profile", "lumi-c", "--target", "singularity",
                "-o", str(sif))
    c = {x["name"]: x for x in json.loads(r.stdout)["checks"]}
    assert r.returncode == 0 and c["prepare.runtime"]["status"] == "pass"


def test_export_of_a_wrong_arch_image_writes_nothing(tmp_path, deb_cache, store_dir):
    from dockertools import busybox_layer

    layout = image_layout(tmp_path / "bb", build_image([busybox_layer("amd64", deb_cache)]))
    out = tmp_path / "root.tar"
    r = hpcconv("export", f"oci:{layout}", "--profile", "alps-gh200", "-o", str(out))
    assert r.returncode == 1 and not out.exists() and r.stdout.startswith("not exported: image is linux/amd64")


def test_an_earlier_ld_conf_listing_the_image_mpi_is_reported(tmp_path, store_dir):
    def run(name):
        layer = make_tar([T("etc", "dir"), T("etc/ld.so.conf.d", "dir"),
                          T(f"etc/ld.so.conf.d/{name}", data=b"/opt/mpich/lib\n"),
                          T("opt", "dir"), T("opt/mpich", "dir"), T("opt/mpich/lib", "dir"),
                          T("opt/mpich/lib/libmpi.so.12", data=b"x")])
        d = tmp_path / name
        layout = image_layout(d, build_image([layer]))
        r = hpcconv("--json", "export", f"oci:{layout}", "--profile", "lumi-c", "-o", str(d / "out.tar"))
        assert r.returncode == 0, r.stderr
        return {c["name"]: c for c in json.loads(r.stdout)["checks"]}["prepare.mpi"]

    c = run("000_mpich.conf")          # before "00-hpcconv-..." when a UTF-8 collation ignores '-' and '_'
    assert c["status"] == "warn" and "/etc/ld.so.conf.d/000_mpich.conf" in c["detail"] and "/opt/mpich/lib" in c["detail"]
    assert run("zz-mpich.conf")["status"] == "pass"
