"""The Apptainer layout inside our SIF files, run for real: the partition (dumped by the reference
siftool) runs under `ch-run`, and the runscript and env scripts must print what `docker run` of the
same image prints on the Docker engine (the independent oracle), for ENTRYPOINT/CMD/ENV cases in
shell and exec form with quotes, `$`, backslashes, empty values and arguments replacing CMD.
With `apptainer` or `singularity` installed the SIF is also run by it; absent, those tests skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import WORK, need
from siftools import ch_run, chrun_env, hpcconv, sift, siftool  # noqa: F401

pytestmark = [pytest.mark.docker, pytest.mark.chrun]

# name -> (Dockerfile body after FROM, argument lists to try besides none)
DATA_ARGS = ["x y", "$HOME", "a\\b", "", "it's", "q\"t", "*", "-n", "`id`", "$(id)"]
CASES = {
    "exec_cmd": ('CMD ["printf", "[%s]\\\\n", "a b", "$HOME", "back\\\\\\\\slash", "it\'s", "q\\"uote", "", "*"]\n',
                 [["printf", "<%s>\\n", *DATA_ARGS]]),
    "shell_cmd": ("ENV GREETING=\"hi there\"\n"
                  "CMD printf '[%s]\\n' \"$GREETING\" '$NOT' \"a\\\\b\" \"\" 'it'\"'\"'s' `echo tick`\n",
                  [["sh", "-c", "echo \"$0|$1|$GREETING\"", "zero", "one"]]),
    "entrypoint_and_cmd": ('ENTRYPOINT ["printf", "<%s>\\\\n"]\nCMD ["x y", "$z", "\\\\", ""]\n', [DATA_ARGS, ["-"]]),
    "entrypoint_only": ('ENTRYPOINT ["printf", "[%s]\\\\n", "fixed"]\n', [DATA_ARGS]),
    "entrypoint_shell": ('ENTRYPOINT echo "ep:$0:$#:$GREETING"\nENV GREETING=g\n', [DATA_ARGS]),
    "entrypoint_empty_string": ('ENTRYPOINT ["printf", "%s|%s|%s\\\\n"]\nCMD ["", "b", ""]\n', [["", ""]]),
}
ENV_BLOCK = ('ENV A="with space" B=\'dollar $x and `tick`\' C="back\\\\slash" D="" E="q\\"uote" '
             'F="brace}x{" G="a=b=c" H="it\'s" I="star *" PATH=/opt/bin:/usr/bin:/bin\n'
             'RUN mkdir -p /opt/bin && printf \'#!/bin/sh\\necho opt-bin\\n\' > /opt/bin/tool && chmod 755 /opt/bin/tool\n'
             'CMD ["tool"]\n')
ENV_NAMES = ["A", "B", "C", "D", "E", "F", "G", "H", "I", "PATH"]
SHOW_ENV = 'for v in ' + " ".join(ENV_NAMES) + '; do eval "printf \'%s=[%s]\\n\' $v \\"\\${$v-unset}\\""; done'


@pytest.fixture(scope="module")
def images(docker_engine, docker_busybox, tmp_path_factory):
    """Build every case on the Docker engine; returns name -> tag."""
    out = {}
    for name, (body, _) in {**CASES, "env": (ENV_BLOCK, [])}.items():
        ctx = tmp_path_factory.mktemp(f"ctx-{name}")
        (ctx / "Dockerfile").write_text(f"FROM {docker_busybox}\n{body}")
        out[name] = docker_engine.build(ctx, f"hpcconv-test/sing-{name.replace('_', '-')}:1")
    return out


def docker_run(engine, tag: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["run", "--rm", "--network", "none"]
    if entrypoint is not None:
        cmd += ["--entrypoint", entrypoint]
    return engine.run(*cmd, tag, *args, check=False)


@pytest.fixture(scope="module")
def sifs(images, docker_engine, siftool, tmp_path_factory):
    """name -> (sif path, dumped squashfs partition)."""
    d = tmp_path_factory.mktemp("sifs")
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(d / "store"), "SOURCE_DATE_EPOCH": "0"}
    out = {}
    for name, tag in images.items():
        sif = d / f"{name}.sif"
        hpcconv("-q", "convert", f"docker-daemon:{tag}", "--target", "singularity", "-o", str(sif), env=env)
        part = d / f"{name}.sqfs"
        part.write_bytes(sift(siftool, "dump", "4", str(sif), binary=True))
        out[name] = (sif, part)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_runscript_matches_docker_run(case, images, sifs, docker_engine):
    _, arglists = CASES[case]
    _, part = sifs[case]
    for args in [[], *arglists]:
        want = docker_run(docker_engine, images[case], *args)
        assert want.returncode == 0, want.stderr
        got = ch_run(part, "/.singularity.d/actions/run", *args)
        assert got.returncode == 0, got.stderr.decode()
        assert got.stdout == want.stdout, f"{case} {args!r}:\n docker: {want.stdout!r}\n ours:   {got.stdout!r}"
        # the /singularity link runs the runscript itself (no env scripts): same argv handling
        if case not in ("entrypoint_shell", "shell_cmd"):  # these print ENV, which only actions/run sets
            got = ch_run(part, "/singularity", *args)
            assert got.stdout == want.stdout, (case, args)


def test_env_scripts_match_docker_env(images, sifs, docker_engine):
    want = docker_run(docker_engine, images["env"], "sh", "-c", SHOW_ENV)
    assert want.returncode == 0, want.stderr
    _, part = sifs["env"]
    got = ch_run(part, "/.singularity.d/actions/exec", "sh", "-c", SHOW_ENV)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert b"PATH=[/opt/bin:/usr/bin:/bin]" in got.stdout
    # and the CMD found through the image's PATH, as docker run does
    assert ch_run(part, "/.singularity.d/actions/run").stdout == docker_run(docker_engine, images["env"]).stdout \
        == b"opt-bin\n"


def test_env_precedence_is_apptainers(sifs):
    """Host values win over the image's (`${K:-default}`), except PATH, which the image sets."""
    _, part = sifs["env"]
    env = chrun_env({"A": "from host", "D": "host fills empty", "PATH": "/host/bin:/usr/bin:/bin"})
    got = ch_run(part, "/.singularity.d/actions/exec", "sh", "-c", SHOW_ENV, env=env).stdout.decode()
    assert "A=[from host]" in got and "D=[host fills empty]" in got
    assert "B=[dollar $x and `tick`]" in got
    assert "PATH=[/opt/bin:/usr/bin:/bin]" in got


def test_env_script_text(sifs, siftool):
    """The exact lines of 10-docker2singularity.sh (Apptainer's format), as stored in inspect-metadata."""
    sif, _ = sifs["env"]
    attrs = json.loads(sift(siftool, "dump", "2", str(sif)))["data"]["attributes"]
    text = attrs["environment"]["/.singularity.d/env/10-docker2singularity.sh"]
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert 'export A="${A:-"with space"}"' in lines
    assert 'export B="${B:-"dollar \\$x and \\`tick\\`"}"' in lines
    assert 'export C="${C:-"back\\\\slash"}"' in lines
    assert 'export D="${D:-""}"' in lines
    assert 'export PATH="/opt/bin:/usr/bin:/bin"' in lines


def test_sandbox_runs_like_docker(images, docker_engine, tmp_path):
    out = tmp_path / "sandbox"
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(tmp_path / "store")}
    r = hpcconv("--json", "convert", f"docker-daemon:{images['entrypoint_and_cmd']}", "--target", "singularity",
                "--format", "sandbox", "-o", str(out), env=env)
    assert json.loads(r.stdout)["format"] == "sandbox"
    assert (out / ".singularity.d" / "runscript").stat().st_mode & 0o777 == 0o755
    assert (out / "singularity").readlink() == Path(".singularity.d/runscript")
    for args in ([], DATA_ARGS):
        want = docker_run(docker_engine, images["entrypoint_and_cmd"], *args).stdout
        assert ch_run(out, "/.singularity.d/actions/run", *args).stdout == want


def test_permissions_fixed_for_non_root(docker_engine, docker_busybox, siftool, tmp_path):
    """A file only root could read and a 0700 directory become usable by the calling user, and the
    change is reported; checked by running as a non-root user under ch-run."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        f"FROM {docker_busybox}\nRUN mkdir -p /root/app && echo model > /root/app/weights && "
        "chmod 600 /root/app/weights && chmod 700 /root/app\nCMD [\"cat\", \"/root/app/weights\"]\n")
    tag = docker_engine.build(ctx, "hpcconv-test/sing-perms:1")
    out = tmp_path / "p.sif"
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(tmp_path / "store")}
    res = json.loads(hpcconv("--json", "convert", f"docker-daemon:{tag}", "--target", "singularity", "-o", str(out),
                             env=env).stdout)
    kinds = {c["kind"]: c for c in res["changes"]}
    assert "/root/app/weights" in kinds["file-a+r"]["examples"]
    assert "/root/app" in kinds["dir-a+rx"]["examples"]
    part = tmp_path / "p.sqfs"
    part.write_bytes(sift(siftool, "dump", "4", str(out), binary=True))
    # squashfuse does not check permissions, so unpack the partition (unsquashfs keeps modes and
    # owners) where an unprivileged user can reach it, and run ch-run as that user: the kernel checks.
    base = WORK / "perm-tests"
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    root = base / f"p-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    try:
        r = subprocess.run([need("unsquashfs"), "-q", "-d", str(root), str(part)], capture_output=True)
        assert r.returncode == 0, r.stderr
        got = subprocess.run([need("setpriv"), "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              need("ch-run"), str(root), "--", "/.singularity.d/actions/run"],
                             capture_output=True, env=chrun_env({"USER": "nobody"}))
        assert got.returncode == 0, got.stderr
        assert got.stdout == b"model\n"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _apptainer() -> str:
    for tool in ("apptainer", "singularity"):
        p = shutil.which(tool)
        if p:
            return p
    pytest.skip("neither apptainer nor singularity is installed (not installable here); the SIF is run by "
                "ch-run instead")


@pytest.mark.parametrize("case", ["entrypoint_and_cmd", "exec_cmd"])
def test_apptainer_runs_the_sif(case, images, sifs, docker_engine):
    tool = _apptainer()
    sif, _ = sifs[case]
    for args in [[], *CASES[case][1]]:
        want = docker_run(docker_engine, images[case], *args).stdout
        got = subprocess.run([tool, "run", str(sif), *args], capture_output=True)
        assert got.stdout == want, (case, args, got.stderr)


@pytest.mark.qemu
def test_arm64_sif_runs_like_docker(docker_engine, deb_cache, siftool, tmp_path):
    """An arm64 image (busybox-static:arm64), run through qemu-user binfmt by both engines."""
    from conftest import REQUIRE_ALL
    from dockertools import busybox_image

    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        msg = "qemu-aarch64 binfmt is not enabled (run scripts/setup-system.sh)"
        pytest.fail(msg) if REQUIRE_ALL else pytest.skip(msg)
    img = busybox_image("arm64", deb_cache, config={"Entrypoint": ["sh", "-c", 'printf "[%s]\\n" "$(uname -m)" "$@"',
                                                                   "arg0"],
                                                    "Cmd": ["a b", "$HOME"], "Env": ["PATH=/bin", "X=arm"]})
    tag = docker_engine.load(img, "hpcconv-test/sing-arm64:1")
    out = tmp_path / "arm.sif"
    env = {"DOCKER_HOST": docker_engine.host, "HPCCONV_STORE": str(tmp_path / "store")}
    hpcconv("-q", "convert", f"docker-daemon:{tag}", "--platform", "linux/arm64", "--target", "singularity",
            "-o", str(out), env=env)
    assert "arm64" in sift(siftool, "list", str(out))
    part = tmp_path / "arm.sqfs"
    part.write_bytes(sift(siftool, "dump", "4", str(out), binary=True))
    for args in ([], ["x y", "$X", ""]):
        want = docker_engine.run("run", "--rm", "--network", "none", "--platform", "linux/arm64", tag, *args)
        got = ch_run(part, "/.singularity.d/actions/run", *args)
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout and want.stdout.startswith(b"[aarch64]\n")
