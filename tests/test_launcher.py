"""hpcconv launcher: the sbatch script passes `bash -n` and names every bind the profile defines, for
every site profile and every runtime; host MPI, environment and srun --mpi follow the profile."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpcconv.launcher import binds
from hpcconv.pipeline import site_profiles
from hpcconv.profiles import load_profile

SITES = [p.name for p in site_profiles()]
RUNTIMES = ["charliecloud", "singularity", "shifter"]


def launcher(*args):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", "launcher", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("site", SITES)
def test_script_is_valid_bash_and_names_every_bind(site, runtime, tmp_path):
    img = {"charliecloud": "/scratch/img.sqfs", "singularity": "/scratch/img.sif", "shifter": "id:hpcconv-abc"}[runtime]
    r = launcher("--runtime", runtime, "--profile", site, img, "--", "mpi-hello", "--n", "2")
    assert r.returncode == 0, r.stderr
    script = r.stdout
    f = tmp_path / "job.sh"
    f.write_text(script)
    n = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert n.returncode == 0, n.stderr + script
    assert script.startswith("#!/bin/bash\n#SBATCH ")
    prof = load_profile(site)
    flag = {"charliecloud": "-b ", "singularity": "--bind ", "shifter": "--volume="}[runtime]
    run_line = script[script.index("srun"):]
    for spec in list(prof.site.binds) + list(prof.mpi.binds):
        src = spec.split(":")[0]
        assert f"{flag}{src}" in run_line, (spec, script)
    for d in prof.site.mountpoints:
        assert f":{d}" in run_line, (d, script)
    if prof.mpi.mode == "host":
        for d in prof.mpi.lib_dirs:
            assert f':{d}' in run_line
        assert "HOST_MPI_LIB_DIR_1" in script
    if prof.mpi.pmi:
        assert f"srun --mpi={prof.mpi.pmi[0]}" in script
    else:
        assert "--mpi=" not in script
    env = {**prof.interconnect.env, **prof.mpi.env, **prof.site.env}
    for k in env:
        assert k in run_line or f"export {k}=" in script
    if runtime == "charliecloud":
        assert " --set-env " in run_line.replace("\\\n", " ")
    if runtime == "shifter":
        assert "#SBATCH --image=id:hpcconv-abc" in script and "shifter --image=id:hpcconv-abc" in script
    assert "mpi-hello --n 2" in script


def test_bind_count_matches_profile():
    p = load_profile("lumi-c")
    got = {(b.src, b.dst) for b in binds(p)}
    assert ("/pfs", "/pfs") in got and ("/opt/cray", "/opt/cray") in got and ("/users", "/users") in got
    assert all(b.why for b in binds(p))


def test_host_mpi_script_runs_with_a_stub_srun(tmp_path):
    """Run the Charliecloud script for a host-MPI profile with stub srun/ch-run on PATH: the binds, the
    environment and the command reach ch-run as separate, correctly quoted arguments."""
    r = launcher("--runtime", "charliecloud", "--profile", "supermuc-ng", "/img dir/app.sqfs", "-o",
                 str(tmp_path / "job.sh"), "--", "echo", "a b")
    assert r.returncode == 0, r.stderr
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/sh\necho "srun $1"; shift; exec "$@"\n')
    (bin_ / "ch-run").write_text('#!/bin/sh\nfor a in "$@"; do echo "arg[$a]"; done\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOST_MPI_LIB_DIR_1": "/usr/lib/impi", "HOST_MPI_LIB_DIR_2": "/usr/lib/dep"}
    out = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    args = out.stdout.splitlines()
    assert args[0] == "srun --mpi=pmi2"
    assert "arg[/usr/lib/impi:/opt/hpcconv/host-mpi/lib]" in args
    assert "arg[--set-env=FI_PROVIDER=psm2]" in args and "arg[--set-env=I_MPI_FABRICS=shm:ofi]" in args
    assert args[-4:] == ["arg[/img dir/app.sqfs]", "arg[--]", "arg[echo]", "arg[a b]"]
    # without the host MPI directory the job stops with a message instead of running
    env.pop("HOST_MPI_LIB_DIR_1")
    out = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "HOST_MPI_LIB_DIR_1" in out.stderr


def test_image_the_runtime_cannot_run_is_a_usage_error(tmp_path):
    r = launcher("--runtime", "charliecloud", "--profile", "lumi-c", "/x/app.sif")
    assert r.returncode == 2 and "ch-run cannot run" in r.stderr
    r = launcher("--runtime", "shifter", "--profile", "perlmutter-cpu", "/x/app.sif")
    assert r.returncode == 2 and "by id" in r.stderr
    d = tmp_path / "app.shifter"
    d.mkdir()
    (d / "hpcconv-0123.squashfs").write_bytes(b"hsqs")
    (d / "hpcconv-0123.meta").write_text("FORMAT: squashfs\n")
    r = launcher("--runtime", "shifter", "--profile", "perlmutter-cpu", str(d))
    assert r.returncode == 0 and "#SBATCH --image=id:hpcconv-0123" in r.stdout
