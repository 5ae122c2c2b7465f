"""Acceptance (issue 4): an image converted with an MPICH-ABI host-MPI profile runs under the real
`ch-run` with a host directory bound at the profile's MPI bind target, and the dynamic loader resolves
`libmpi.so.12` from that directory first.

The image: Debian 12's glibc and loader (the host's own files), a program linked against
`libmpi.so.12`, and the container's own libmpi.so.12 that prints "container". The host directory holds
a different build of libmpi.so.12 that prints "host". Oracles: the program's output and the loader's
own answer (`ld.so --list`, `LD_DEBUG=libs`) inside ch-run; without the bind the container's copy runs.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import need
from preptools import APP, CLIBDIR, gcc, glibc_files, layout_of, marked_libmpi, rootfs

from hpcconv.profiles import load_profile


def hpcconv(*args):
    import sys

    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True)


def chrun(img, *cmd, binds=(), env=None):
    opts = [a for b in binds for a in ("-b", b)]
    return subprocess.run([need("ch-run"), "--set-env", *opts, str(img), "--", *cmd], capture_output=True, text=True,
                          env={**os.environ, "USER": os.environ.get("USER") or "root", **(env or {})}, timeout=120)


@pytest.fixture(scope="module")
def mpi_app(tmp_path_factory):
    need("gcc")
    d = tmp_path_factory.mktemp("mpiapp")
    ctr = marked_libmpi(d / "container", "container", "12.1.0")
    host = d / "host"
    marked_libmpi(host, "host", "12.4.0")
    app = gcc(d / "mpiapp", APP, f"-L{ctr.parent}", "-l:libmpi.so.12")
    root = rootfs(d / "root", {**glibc_files(), "usr/local/bin/mpiapp": app, f"{CLIBDIR}/libmpi.so.12.1.0": ctr},
                  {f"{CLIBDIR}/libmpi.so.12": "libmpi.so.12.1.0"})
    return layout_of(d, root), host


@pytest.mark.parametrize("profile", ["lumi-c", "perlmutter-cpu"])
@pytest.mark.parametrize("fmt", ["squashfs", "dir"])
def test_host_mpi_wins_under_ch_run(mpi_app, tmp_path, store_dir, profile, fmt):
    layout, hostdir = mpi_app
    target = load_profile(profile).mpi.lib_dirs[0]
    out = tmp_path / ("img.sqfs" if fmt == "squashfs" else "img")
    r = hpcconv("convert", f"oci:{layout}", "--profile", profile, "--format", fmt, "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr

    # without the host MPI the image still runs, on its own libmpi
    plain = chrun(out, "/usr/local/bin/mpiapp")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "container"

    bound = chrun(out, "/usr/local/bin/mpiapp", binds=[f"{hostdir}:{target}"])
    assert bound.returncode == 0, bound.stderr
    assert bound.stdout.strip() == "host"

    listing = chrun(out, "/lib64/ld-linux-x86-64.so.2", "--list", "/usr/local/bin/mpiapp",
                    binds=[f"{hostdir}:{target}"])
    assert listing.returncode == 0, listing.stderr
    line = next(ln for ln in listing.stdout.splitlines() if "libmpi.so.12" in ln)
    assert f"=> {target}/libmpi.so.12 " in line

    debug = chrun(out, "/usr/local/bin/mpiapp", binds=[f"{hostdir}:{target}"], env={"LD_DEBUG": "libs"})
    tried = [ln for ln in debug.stderr.splitlines() if "trying file=" in ln and "libmpi.so.12" in ln]
    assert tried and tried[0].split("trying file=")[1].startswith(f"{target}/")   # searched first
    inits = [ln.split("calling init:")[1].strip() for ln in debug.stderr.splitlines() if "calling init:" in ln]
    assert f"{target}/libmpi.so.12" in inits
    assert not any(i.startswith(f"/{CLIBDIR}/libmpi") for i in inits)


def test_bind_target_exists_only_because_of_the_profile(mpi_app, tmp_path, store_dir):
    """The same image converted without a profile has no bind target: ch-run cannot bind there (a
    squashfs is read-only), which is why preparation creates it."""
    layout, hostdir = mpi_app
    out = tmp_path / "img.sqfs"
    r = hpcconv("convert", f"oci:{layout}", "-o", str(out))
    assert r.returncode == 0, r.stderr
    bad = chrun(out, "/usr/local/bin/mpiapp", binds=[f"{hostdir}:/opt/hpcconv/host-mpi/lib"])
    assert bad.returncode != 0 or bad.stdout.strip() != "host"


@pytest.mark.parametrize("dtags,wins", [("--disable-new-dtags", "container"), ("--enable-new-dtags", "host")])
def test_an_rpath_to_the_image_mpi_beats_ld_library_path_and_is_reported(tmp_path, store_dir, dtags, wins):
    """DT_RPATH is searched before LD_LIBRARY_PATH (DT_RUNPATH after): with an RPATH naming the image's
    MPI directory the host MPI loses under ch-run, and the check says so."""
    import json

    need("gcc")
    ctr = marked_libmpi(tmp_path / "ctr", "container")
    marked_libmpi(tmp_path / "host", "host", "12.4.0")
    app = gcc(tmp_path / "mpiapp", APP, f"-L{ctr.parent}", "-l:libmpi.so.12", "-Wl,-rpath,/opt/mpich/lib",
              f"-Wl,{dtags}")
    root = rootfs(tmp_path / "root", {**glibc_files(), "usr/local/bin/mpiapp": app,
                                      "opt/mpich/lib/libmpi.so.12.1.0": ctr},
                  {"opt/mpich/lib/libmpi.so.12": "libmpi.so.12.1.0"})
    layout = layout_of(tmp_path, root)
    r = hpcconv("--json", "convert", f"oci:{layout}", "--profile", "lumi-c", "-o", str(tmp_path / "img.sqfs"))
    assert r.returncode == 0, r.stderr
    c = {x["name"]: x for x in json.loads(r.stdout)["checks"]}["prepare.mpi"]
    run = chrun(tmp_path / "img.sqfs", "/usr/local/bin/mpiapp", binds=[f"{tmp_path / 'host'}:/opt/hpcconv/host-mpi/lib"])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == wins
    if wins == "container":
        assert c["status"] == "warn" and "DT_RPATH /opt/mpich/lib" in c["detail"] and "/usr/local/bin/mpiapp" in c["detail"]
    else:
        assert c["status"] == "pass" and "DT_RPATH" not in c["detail"]


def test_the_printed_site_run_line_runs_with_the_host_mpi(mpi_app, tmp_path, store_dir):
    """`convert --profile` prints the run line for the site (binds from the profile, srun with its PMI);
    with the host MPI directory filled in and without srun (no Slurm here) it runs as printed."""
    import json
    import shlex

    layout, hostdir = mpi_app
    out = tmp_path / "img.sqfs"
    r = hpcconv("--json", "convert", f"oci:{layout}", "--profile", "supermuc-ng", "-o", str(out))
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)["site_run"]
    assert line.startswith("srun --mpi=pmi2 ch-run -b HOST_MPI_LIBDIR:/opt/hpcconv/host-mpi/lib ")
    words = shlex.split(line.replace("HOST_MPI_LIBDIR", str(hostdir)).replace("HOST_MPI_DEPDIR", str(hostdir)))
    words = words[2:]                                             # drop srun --mpi=pmi2
    words[0] = need("ch-run")
    words = words[:words.index("--") + 1] + ["/usr/local/bin/mpiapp"]
    run = subprocess.run(words, capture_output=True, text=True, env={**os.environ, "USER": "root"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "host"
    human = hpcconv("convert", f"oci:{layout}", "--profile", "supermuc-ng", "-o", str(out), "--force").stdout
    assert f"at supermuc-ng: {line}" in human
