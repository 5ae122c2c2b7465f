"""Issue 5 end to end with the real components: Docker engine builds (SDK, streamed log), the staged
harness (lint, build, pull, flatten, rewrite, emit, run), user tests in Docker and under ch-run, the
reports (validated against the shipped JSON Schema and JUnit XSD), `hpcconv test`, `recipe run`.

Oracles: `ch-run` executing the outputs directly (not through the harness), `docker run`, siftool for
SIF structure, the schema validators (each also shown to reject a broken document)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
import xmlschema

from conftest import WORK, need
from debianbase import import_into
from ocitools import image_layout
from siftools import siftool  # noqa: F401,F811  (fixture)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "hpcconv/schemas/report.schema.json").read_text())
XSD = xmlschema.XMLSchema(str(ROOT / "hpcconv/schemas/junit-10.xsd"))

pytestmark = pytest.mark.docker


def hpc(*args, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def env(docker_engine, tmp_path) -> dict:
    return {**docker_engine.env(), "USER": "root", "HPCCONV_STORE": str(tmp_path / "store"),
            "HOME": str(tmp_path / "home")}


@pytest.fixture(scope="session")
def debian_base(docker_engine) -> str:
    need("debootstrap")
    return import_into(docker_engine, WORK / "debian")


def chrun(img: Path, *cmd: str, opts=("--set-env",)) -> subprocess.CompletedProcess:
    return subprocess.run([need("ch-run"), *opts, str(img), "--", *cmd], capture_output=True, text=True,
                          env={**os.environ, "USER": "root"}, timeout=300)


def valid_report(path: Path) -> dict:
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    return doc


def valid_junit(path: Path) -> ET.Element:
    XSD.validate(str(path))
    return ET.parse(path).getroot()


def checks_of(doc: dict, run_substr: str) -> list[dict]:
    return [c for r in doc["runs"] if run_substr in r["name"] for c in r["checks"]]


def junit_failures(root: ET.Element) -> list[tuple[str, str]]:
    return [(s.get("name"), tc.get("name")) for s in root.iter("testsuite") for tc in s.iter("testcase")
            if tc.find("failure") is not None]


# acceptance 1: hpcconv build on a recipe Dockerfile -> Charliecloud image + SIF, user tests pass in Docker
# and under ch-run --------------------------------------------------------------------------------------
def test_build_numpy_recipe_charliecloud_and_sif(debian_base, env, tmp_path, siftool):
    need("ch-run")
    out = tmp_path / "out"
    r = hpc("build", ROOT / "recipes/python-numpy", "-t", "hpcconv-test/python-numpy:1", "--build-arg",
            f"BASE={debian_base}", "--target", "charliecloud", "--target", "singularity", "--profile", "supermuc-ng",
            "--tests-from", ROOT / "recipes/python-numpy/recipe.toml", "-o", out,
            "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml", env=env)
    assert r.returncode == 0, r.stdout + r.stderr[-6000:]
    assert "Step 1/" in r.stderr          # the build log was streamed
    sqfs, sif = out / "python-numpy.sqfs", out / "python-numpy.sif"
    assert sqfs.read_bytes()[:4] == b"hsqs"
    from siftools import sif_list

    assert any(row["type"].startswith("FS") for row in sif_list(siftool, sif))
    doc = valid_report(tmp_path / "r.json")
    assert doc["status"] in ("pass", "warn") and doc["exit_code"] == 0
    names = {(c["stage"], c["name"], c["status"]) for c in checks_of(doc, "")}
    for t in ("numpy imports", "analysis runs", "bad input fails"):
        assert ("build", f"test[docker]: {t}", "pass") in names
    for run in doc["runs"][1:]:
        st = {c["name"]: c["status"] for c in run["checks"]}
        for t in ("numpy imports", "analysis runs", "bad input fails", "default command (docker run IMAGE)"):
            assert st[f"test[ch-run]: {t}"] == "pass", run
        assert st["smoke run (ch-run)"] == "pass"
        assert st["layer digests"] == "pass" and st["platform"] == "pass"
        assert {c["stage"] for c in run["checks"]} >= {"lint", "pull", "flatten", "rewrite", "emit", "run"}
        assert all(c["duration"] >= 0 for c in run["checks"])
    assert {r_["target"] for r_ in doc["runs"][1:]} == {"charliecloud", "singularity"}
    # no runtime for SIF other than ch-run here: a skip with the reason, not a pass
    if not (shutil.which("apptainer") or shutil.which("singularity")):
        sk = [c for c in checks_of(doc, "singularity") if c["name"] == "runtime apptainer"]
        assert sk and sk[0]["status"] == "skip" and "not installed" in sk[0]["detail"]
    root = valid_junit(tmp_path / "j.xml")
    assert junit_failures(root) == []
    # the oracle: ch-run runs the Charliecloud output directly
    x = chrun(sqfs, "analyze", "--demo", "100")
    assert x.returncode == 0 and x.stdout.startswith("n=100 mean="), x.stderr


# acceptance 2: a test passing in Docker but failing after conversion -> recipe run exit 1, the JUnit
# report shows exactly that test failing in the run stage ---------------------------------------------
def write_recipe(d: Path, base: str, tests: str, targets='["charliecloud"]', extra_df: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(f"FROM {base}\nRUN mkdir -p /opt/app && echo hello-from-image > /opt/app/msg\n"
                                  f"{extra_df}ENV APP_MSG=/opt/app/msg\nWORKDIR /opt/app\n")
    f = d / "recipe.toml"
    f.write_text(textwrap.dedent(f"""\
        name = "bb-app"
        dockerfile = "Dockerfile"
        tag = "hpcconv-test/bb-app:{d.name}"
        targets = {targets}
        """) + tests)
    return f


def test_recipe_run_catches_docker_vs_converted_difference(docker_busybox, env, tmp_path):
    need("ch-run")
    tests = textwrap.dedent("""\
        [[tests]]
        name = "reads its data"
        run = "cat $APP_MSG"
        expect = "hello-from-image"

        [[tests]]
        name = "writes into the image"
        run = "echo result > /opt/app/out.txt"
        """)
    rf = write_recipe(tmp_path / "r1", docker_busybox, tests, '["charliecloud", "singularity"]')
    r = hpc("recipe", "run", rf, "-o", tmp_path / "out", "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
            env=env)
    assert r.returncode == 1, r.stdout + r.stderr[-4000:]
    root = valid_junit(tmp_path / "j.xml")
    fails = junit_failures(root)
    assert sorted(fails) == sorted([("bb-app charliecloud:squashfs / run", "test[ch-run]: writes into the image"),
                                    ("bb-app singularity:sif / run", "test[ch-run]: writes into the image")]), fails
    tc = next(tc for s in root.iter("testsuite") for tc in s.iter("testcase") if tc.find("failure") is not None)
    assert "passes in Docker, fails under ch-run" in tc.find("failure").get("message")
    doc = valid_report(tmp_path / "r.json")
    assert doc["status"] == "fail" and doc["exit_code"] == 1
    docker_side = {c["name"]: c["status"] for c in checks_of(doc, "bb-app build")}
    assert docker_side["test[docker]: writes into the image"] == "pass"
    assert docker_side["test[docker]: reads its data"] == "pass"
    # without the failing test the same recipe passes: the exit status follows the checks
    rf2 = write_recipe(tmp_path / "r2", docker_busybox, tests.split("[[tests]]\nname = \"writes")[0])
    r = hpc("recipe", "run", rf2, "-o", tmp_path / "out2", "--junit", tmp_path / "j2.xml", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert junit_failures(valid_junit(tmp_path / "j2.xml")) == []


def test_strict_turns_lint_warnings_into_failures(docker_busybox, env, tmp_path):
    rf = write_recipe(tmp_path / "r3", docker_busybox, "", extra_df="EXPOSE 8080\n")
    r = hpc("recipe", "run", rf, "-o", tmp_path / "o1", "--report", tmp_path / "a.json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert valid_report(tmp_path / "a.json")["status"] == "warn"
    r = hpc("recipe", "run", rf, "-o", tmp_path / "o2", "--strict", "--junit", tmp_path / "s.xml", "--report",
            tmp_path / "s.json", env=env)
    assert r.returncode == 1
    root = valid_junit(tmp_path / "s.xml")
    warn_fails = [tc for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert warn_fails and all(tc.find("failure").get("type") == "warning" for tc in warn_fails)
    assert any(tc.get("name") == "lint.noop.expose" for tc in warn_fails)
    doc = valid_report(tmp_path / "s.json")
    assert doc["strict"] is True and doc["status"] == "fail"


# build errors and the engine ---------------------------------------------------------------------------
def test_build_failure_shows_failing_step_and_exits_1(docker_busybox, env, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {docker_busybox}\nRUN echo first-step-ok\n\nRUN echo about-to-fail && "
                                    "exit 7\nRUN echo never\n")
    r = hpc("build", ctx, "-o", tmp_path / "out", "--report", tmp_path / "r.json", env=env)
    assert r.returncode == 1
    assert "first-step-ok" in r.stderr and "about-to-fail" in r.stderr    # streamed
    doc = valid_report(tmp_path / "r.json")
    b = next(c for c in doc["runs"][0]["checks"] if c["name"] == "docker build")
    assert b["status"] == "fail"
    assert "step 3/4" in b["detail"] and "Dockerfile:4" in b["detail"] and "7" in b["detail"], b["detail"]
    assert len(doc["runs"]) == 1                                          # nothing converted


def test_engine_unreachable_exits_3(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/nothing.sock", "HPCCONV_STORE": str(tmp_path / "s")}
    r = hpc("build", tmp_path, "-o", tmp_path / "out", env=env, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "cannot reach the Docker engine" in r.stderr
    r = hpc("convert", tmp_path / "Dockerfile", "-o", tmp_path / "x.sqfs", env=env, timeout=120)
    assert r.returncode == 3, r.stderr


def test_convert_a_dockerfile_builds_then_converts(docker_busybox, env, tmp_path):
    need("ch-run")
    ctx = tmp_path / "app"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {docker_busybox}\nRUN echo built-by-docker > /msg\n")
    out = tmp_path / "app.sqfs"
    r = hpc("convert", ctx / "Dockerfile", "--target", "charliecloud", "-o", out, "--report", tmp_path / "r.json",
            "--test", "cat /msg", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    st = {c["name"]: c["status"] for r_ in valid_report(tmp_path / "r.json")["runs"] for c in r_["checks"]}
    assert st["docker build"] == "pass" and st["test[docker]: cat /msg"] == "pass"
    assert st["test[ch-run]: cat /msg"] == "pass"
    x = chrun(out, "cat", "/msg")
    assert x.returncode == 0 and x.stdout == "built-by-docker\n"


# hpcconv test on existing outputs -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs(docker_engine, docker_busybox, tmp_path_factory):
    """One busybox image converted to every output kind (by the plain convert command)."""
    d = tmp_path_factory.mktemp("outs")
    env = {**docker_engine.env(), "USER": "root", "HPCCONV_STORE": str(d / "store")}
    src = f"docker-daemon:{docker_busybox}"
    made = {}
    for key, args, path in [("sqfs", ("--target", "charliecloud"), d / "bb.sqfs"),
                            ("dir", ("--target", "charliecloud", "--format", "dir"), d / "bb-dir"),
                            ("tar", ("--target", "charliecloud", "--format", "tar"), d / "bb.tar.gz"),
                            ("sif", ("--target", "singularity"), d / "bb.sif"),
                            ("shifter", ("--target", "shifter"), d / "bb-shifter")]:
        r = hpc("convert", src, *args, "-o", path, env=env)
        assert r.returncode == 0, r.stderr
        made[key] = path
    return made


@pytest.mark.parametrize("kind", ["sqfs", "dir", "tar", "sif", "shifter"])
def test_hpcconv_test_runs_every_output_kind(outputs, kind, tmp_path):
    need("ch-run")
    env = {**os.environ, "USER": "root"}
    r = hpc("test", outputs[kind], "--profile", "generic-x86-64", "--run", "echo inside; test -x /bin/sh",
            "--run-image", "/bin/echo via-entrypoint", "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
            env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = valid_report(tmp_path / "r.json")
    st = {c["name"]: c for c in doc["runs"][0]["checks"]}
    assert st["smoke run (ch-run)"]["status"] == "pass"
    assert st["test[ch-run]: echo inside; test -x /bin/sh"]["status"] == "pass"
    assert "inside" in st["test[ch-run]: echo inside; test -x /bin/sh"]["detail"]
    assert st["test[ch-run]: run image /bin/echo via-entrypoint"]["status"] == "pass"
    assert "via-entrypoint" in st["test[ch-run]: run image /bin/echo via-entrypoint"]["detail"]
    assert any(n.startswith("valid:") and c["status"] == "pass" for n, c in st.items())
    valid_junit(tmp_path / "j.xml")
    # a failing command fails the run stage and the exit status
    r = hpc("test", outputs[kind], "--run", "exit 3", "--junit", tmp_path / "f.xml", env=env)
    assert r.returncode == 1
    assert junit_failures(valid_junit(tmp_path / "f.xml")) == [(f"{outputs[kind]} / run", "test[ch-run]: exit 3")]


def test_runtime_absent_is_a_skip_with_reason(outputs, tmp_path):
    env = {"PATH": "/nonexistent", "USER": "root", "HOME": str(tmp_path)}
    r = hpc("test", outputs["sif"], "--run", "true", "--report", tmp_path / "r.json", env=env)
    assert r.returncode == 0, r.stderr
    doc = valid_report(tmp_path / "r.json")
    st = {c["name"]: c for c in doc["runs"][0]["checks"]}
    assert st["runtime ch-run"]["status"] == "skip" and "not installed" in st["runtime ch-run"]["detail"]
    assert st["runtime apptainer"]["status"] == "skip"
    assert not any(c["stage"] == "run" and c["status"] == "pass" for c in doc["runs"][0]["checks"])


def test_corrupt_sif_fails_validation(outputs, tmp_path):
    bad = tmp_path / "bad.sif"
    data = bytearray(outputs["sif"].read_bytes())
    bad.write_bytes(bytes(data[: len(data) // 2]))       # truncated: the partition ends past the file
    r = hpc("test", bad, "--report", tmp_path / "r.json", env={**os.environ, "USER": "root"})
    assert r.returncode == 1
    doc = valid_report(tmp_path / "r.json")
    st = {c["name"]: c["status"] for c in doc["runs"][0]["checks"]}
    assert st["valid: SIF structure"] == "fail" and st["run"] == "skip"


def test_foreign_arch_runs_emulated(busybox_arm64, tmp_path):
    need("ch-run")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("qemu-aarch64 binfmt is not enabled (scripts/setup-system.sh)")
    layout = image_layout(tmp_path / "oci", busybox_arm64, "arm64")
    env = {**os.environ, "USER": "root", "HPCCONV_STORE": str(tmp_path / "store")}
    out = tmp_path / "arm.sif"
    r = hpc("convert", f"oci:{layout}:arm64", "--target", "singularity", "-o", out, env=env)
    assert r.returncode == 0, r.stderr
    r = hpc("test", out, "--run", "uname -m", "--report", tmp_path / "r.json", env=env)
    assert r.returncode == 0, r.stderr
    st = {c["name"]: c for c in valid_report(tmp_path / "r.json")["runs"][0]["checks"]}
    t = st["test[ch-run]: uname -m"]
    assert t["status"] == "pass" and "emulated (arm64 on amd64 via qemu-aarch64 binfmt)" in t["detail"]
    assert "aarch64" in t["detail"]


# the schemas themselves can fail ------------------------------------------------------------------------
def test_schemas_reject_broken_reports(tmp_path):
    from hpcconv.harness.checks import Checks
    from hpcconv.harness.report import RunReport, to_json, write_junit

    rep = RunReport("x", Checks())
    rep.checks.add("run", "t", "fail", "boom <&> \x01 ctrl", 0.5)
    rep.checks.add("emit", "s", "skip", "no runtime", 0)
    doc = to_json([rep], "test")
    jsonschema.validate(doc, SCHEMA)
    bad = json.loads(json.dumps(doc))
    bad["runs"][0]["checks"][0]["status"] = "ok"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    bad = json.loads(json.dumps(doc))
    del bad["summary"]["fail"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    write_junit(tmp_path / "j.xml", [rep])
    root = valid_junit(tmp_path / "j.xml")
    assert root.get("tests") == "2" and root.get("failures") == "1"
    assert next(root.iter("skipped")).get("message") == "no runtime"
    broken = (tmp_path / "j.xml").read_text().replace('<testcase name="t"', "<testcase")
    (tmp_path / "b.xml").write_text(broken)
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        XSD.validate(str(tmp_path / "b.xml"))


def test_convert_with_tests_junit_and_no_test(docker_busybox, env, tmp_path):
    need("ch-run")
    src = f"docker-daemon:{docker_busybox}"
    r = hpc("convert", src, "--target", "singularity", "-o", tmp_path / "a.sif", "--test", "echo ok-inside",
            "--report", tmp_path / "a.json", "--junit", tmp_path / "a.xml", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = valid_report(tmp_path / "a.json")
    st = {c["name"]: c for c in doc["runs"][0]["checks"]}
    assert st["test[docker]: echo ok-inside"]["status"] == "pass"
    assert st["test[ch-run]: echo ok-inside"]["status"] == "pass" and "ok-inside" in st["test[ch-run]: echo ok-inside"]["detail"]
    assert st["valid: SIF structure"]["status"] == "pass" and st["smoke run (ch-run)"]["status"] == "pass"
    valid_junit(tmp_path / "a.xml")
    r = hpc("convert", src, "--target", "charliecloud", "-o", tmp_path / "b.sqfs", "--test", "exit 4", env=env)
    assert r.returncode == 1
    r = hpc("convert", src, "--target", "charliecloud", "-o", tmp_path / "c.sqfs", "--test", "exit 4", "--no-test",
            "--report", tmp_path / "c.json", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = valid_report(tmp_path / "c.json")
    assert not any(c["stage"] == "run" for c in doc["runs"][0]["checks"])
    assert any(c["name"] == "valid: squashfs readable" for c in doc["runs"][0]["checks"])


def test_build_for_an_aarch64_site_on_amd64_runs_emulated(docker_engine, busybox_arm64, env, tmp_path):
    """--profile of an aarch64 site: the build targets linux/arm64 (RUN through qemu binfmt), the user
    test runs emulated in Docker and under ch-run, and the reports say so."""
    need("ch-run")
    from hpcconv.harness.run import host_arch

    if host_arch() != "amd64":
        pytest.skip("written for an amd64 host")
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("qemu-aarch64 binfmt is not enabled (scripts/setup-system.sh)")
    base = docker_engine.load(busybox_arm64, "hpcconv-test/busybox:arm64")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base}\nRUN uname -m > /built-on\n")
    r = hpc("build", ctx, "--profile", "generic-aarch64", "--target", "charliecloud", "-o", tmp_path / "out",
            "--test", "cat /built-on; uname -m", "--report", tmp_path / "r.json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = valid_report(tmp_path / "r.json")
    st = {c["name"]: c for run in doc["runs"] for c in run["checks"]}
    assert "linux/arm64" in st["build platform"]["detail"]
    assert st["test[docker]: cat /built-on; uname -m"]["detail"].count("aarch64") == 2
    t = st["test[ch-run]: cat /built-on; uname -m"]
    assert t["status"] == "pass" and "emulated (arm64 on amd64" in t["detail"] and t["detail"].count("aarch64") >= 2
    assert st["platform"]["status"] == "pass"


def test_recipe_run_directory_one_combined_report(docker_busybox, env, tmp_path):
    need("ch-run")
    d = tmp_path / "recipes"
    write_recipe(d / "built", docker_busybox, '[[tests]]\nrun = "cat /opt/app/msg"\nexpect = "hello"\n')
    (d / "existing").mkdir()
    (d / "existing" / "recipe.toml").write_text(textwrap.dedent(f"""\
        name = "existing"
        source = "docker-daemon:{docker_busybox}"
        profiles = ["generic-x86-64", "supermuc-ng"]
        targets = ["shifter"]
        [[tests]]
        name = "busybox shell"
        run = "echo $0; busybox | head -1"
        expect = "re:^BusyBox v1\\\\."
        """))
    r = hpc("recipe", "run", d, "-o", tmp_path / "out", "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
            env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = valid_report(tmp_path / "r.json")
    names = [run["name"] for run in doc["runs"]]
    assert names == ["bb-app build", "bb-app charliecloud:squashfs", "existing docker",
                     "existing shifter:squashfs @ generic-x86-64", "existing shifter:squashfs @ supermuc-ng"], names
    st = {(run["name"], c["name"]): c["status"] for run in doc["runs"] for c in run["checks"]}
    assert st[("existing docker", "test[docker]: busybox shell")] == "pass"
    for p in ("generic-x86-64", "supermuc-ng"):
        assert st[(f"existing shifter:squashfs @ {p}", "test[ch-run]: busybox shell")] == "pass"
        assert st[(f"existing shifter:squashfs @ {p}", "runtime shifter")] == "skip"
        assert list((tmp_path / "out" / "existing" / p / "existing.shifter").glob("hpcconv-*.meta"))
    suites = {s.get("name") for s in valid_junit(tmp_path / "j.xml").iter("testsuite")}
    assert "existing shifter:squashfs @ supermuc-ng / run" in suites and "bb-app build / build" in suites


def test_heredoc_dockerfile_builds_with_the_classic_builder(docker_busybox, docker_engine, env, tmp_path):
    """The SDK's classic builder knows no heredocs: hpcconv lowers them; the files the image holds are
    what BuildKit's heredoc semantics give (expansion, quoted delimiters, <<- tabs, shebang, COPY)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(textwrap.dedent(f"""\
        # syntax=docker/dockerfile:1
        FROM {docker_busybox}
        ARG WHO=world
        ENV GREETING=hello
        RUN <<EOF
        echo "$GREETING from script" > /x
        echo 'it'"'"'s 100% \\\\n' >> /x
        EOF
        RUN cat > /y <<-'EOT'
        \tliteral $GREETING
        \tEOT
        COPY --chmod=0600 <<EOF /etc/motd
        hello $WHO
        EOF
        RUN <<EOF
        #!/bin/sh
        echo "shebang $0" >> /x
        EOF
        """))
    r = hpc("build", ctx, "-t", "hpcconv-test/heredoc:1", "-o", tmp_path / "out", "--report", tmp_path / "r.json",
            "--test", "cat /x /y /etc/motd; stat -c %a /etc/motd", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = docker_engine.run("run", "--rm", "hpcconv-test/heredoc:1", "cat", "/x", "/y", "/etc/motd").stdout.decode()
    assert out.splitlines()[:2] == ["hello from script", "it's 100% \\\\n"]
    assert out.splitlines()[2].startswith("shebang /tmp/.hpcconv-heredoc-")
    assert out.splitlines()[3:] == ["literal $GREETING", "hello world"]
    st = {c["name"]: c for run in valid_report(tmp_path / "r.json")["runs"] for c in run["checks"]}
    assert "Dockerfile:5: RUN heredoc lowered" in st["heredocs"]["detail"]
    assert st["test[docker]: cat /x /y /etc/motd; stat -c %a /etc/motd"]["detail"].endswith("600")
    assert st["test[ch-run]: cat /x /y /etc/motd; stat -c %a /etc/motd"]["status"] == "pass"
    # nothing of the lowering is left in the image
    assert docker_engine.run("run", "--rm", "hpcconv-test/heredoc:1", "sh", "-c",
                             "ls /tmp/.hpcconv-heredoc-* 2>/dev/null | wc -l").stdout.decode().strip() == "0"


def test_hpcconv_test_binds_host_directories(outputs, tmp_path):
    need("ch-run")
    host = tmp_path / "site-lib"
    host.mkdir()
    (host / "marker").write_text("from-the-host\n")
    env = {**os.environ, "USER": "root"}
    for kind in ("sqfs", "sif"):
        r = hpc("test", outputs[kind], "--bind", f"{host}:/var", "--run", "cat /var/marker", "--report",
                tmp_path / f"{kind}.json", env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        st = {c["name"]: c for c in valid_report(tmp_path / f"{kind}.json")["runs"][0]["checks"]}
        assert "from-the-host" in st["test[ch-run]: cat /var/marker"]["detail"]
    r = hpc("test", outputs["sqfs"], "--run", "cat /var/marker", env=env)
    assert r.returncode == 1                       # without the bind the file is not there
    assert hpc("test", outputs["sqfs"], "--bind", "relative:/mnt", env=env).returncode == 2


def test_quiet_and_json_reach_the_harness_commands(outputs, tmp_path):
    env = {**os.environ, "USER": "root"}
    r = hpc("-q", "test", outputs["sqfs"], "--run", "true", env=env)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stderr
    r = hpc("--json", "test", outputs["sqfs"], "--run", "true", env=env)
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["command"] == "test" and "┃" not in r.stderr      # no table with --json


@pytest.mark.skipif(os.environ.get("HPCCONV_TEST_ALL_RECIPES") != "1",
                    reason="builds every Debian-based recipe (minutes each, gcc + MPI from the Debian archive): "
                           "set HPCCONV_TEST_ALL_RECIPES=1")
@pytest.mark.parametrize("recipe", ["mpich-hello", "openmpi-ucx", "omnipath-psm2"])
def test_debian_recipes_build_and_pass(recipe, debian_base, env, tmp_path):
    need("ch-run")
    r = hpc("recipe", "run", ROOT / "recipes" / recipe / "recipe.toml", "--build-arg", f"BASE={debian_base}",
            "-o", tmp_path / "out", "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml", env=env,
            timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    doc = valid_report(tmp_path / "r.json")
    tests = [c for run in doc["runs"] for c in run["checks"] if c["name"].startswith("test[")]
    assert tests and all(c["status"] == "pass" for c in tests), [c for c in tests if c["status"] != "pass"]
    assert any(c["name"].startswith("test[ch-run]") for c in tests)
    assert junit_failures(valid_junit(tmp_path / "j.xml")) == []


def test_entrypoint_tests_run_the_image_the_docker_way(docker_busybox, env, tmp_path):
    """[[tests]] with entrypoint = true: `docker run IMAGE [ARGS]` in Docker; after conversion the way each
    runtime runs an image (ch-run /ch/run.sh, the SIF's run action, Shifter's ENTRY + CMD)."""
    need("ch-run")
    d = tmp_path / "ep"
    d.mkdir()
    (d / "Dockerfile").write_text(f'FROM {docker_busybox}\nENTRYPOINT ["/bin/echo", "ep:"]\nCMD ["default"]\n')
    (d / "recipe.toml").write_text(textwrap.dedent("""\
        name = "ep"
        dockerfile = "Dockerfile"
        tag = "hpcconv-test/ep:1"
        targets = ["charliecloud", "singularity", "shifter"]

        [[tests]]
        name = "default command"
        entrypoint = true
        expect = "re:^ep: default$"

        [[tests]]
        name = "arguments replace CMD"
        entrypoint = true
        run = "one 'two words'"
        expect = "re:^ep: one two words$"
        """))
    r = hpc("recipe", "run", d / "recipe.toml", "-o", tmp_path / "out", "--report", tmp_path / "r.json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = valid_report(tmp_path / "r.json")
    got = {(run["name"], c["name"]): c for run in doc["runs"] for c in run["checks"] if c["name"].startswith("test[")}
    assert got[("ep build", "test[docker]: default command")]["status"] == "pass"
    for t in ("charliecloud:squashfs", "singularity:sif", "shifter:squashfs"):
        for name in ("default command", "arguments replace CMD"):
            c = got[(f"ep {t}", f"test[ch-run]: {name}")]
            assert c["status"] == "pass", c
    assert "ep: one two words" in got[("ep shifter:squashfs", "test[ch-run]: arguments replace CMD")]["detail"]
