"""Dockerfile parser, HPC lint against profiles, and the Apptainer definition-file translation.

Oracles: the parser's view is compared with what the Dockerfile text says line by line; the lint must
name the line and give a fix; the translated definition file is checked for the sections Apptainer
reads, and its %post is run with /bin/sh -n (syntax) and for real in a scratch root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcconv import dockerfile, lint, translate
from hpcconv.errors import UsageError
from hpcconv.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*/recipe.toml"))


def parse(text: str) -> dockerfile.Dockerfile:
    return dockerfile.parse(text, "Dockerfile")


def hpc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "hpcconv.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


# parser -----------------------------------------------------------------------------------------------
def test_continuations_comments_heredocs_and_forms():
    df = parse("# syntax=docker/dockerfile:1\n"
               "ARG V=1\n"
               "FROM base:${V} AS b\n"
               "RUN a \\\n"
               "  # a comment inside\n"
               "  && b\n"
               "RUN <<EOT bash\n"
               "echo $HOME\n"
               "EOT\n"
               "COPY <<-EOF /etc/x\n"
               "\tline\n"
               "\tEOF\n"
               "CMD [\"x\", \"y z\"]\n"
               "ENTRYPOINT run.sh --flag\n"
               "HEALTHCHECK CMD [\"true\"]\n"
               "COPY --from=b --chown=1:1 /a /b/\n")
    cmds = [(i.cmd, i.line) for i in df.instructions]
    assert cmds == [("ARG", 2), ("FROM", 3), ("RUN", 4), ("RUN", 7), ("COPY", 10), ("CMD", 13), ("ENTRYPOINT", 14),
                    ("HEALTHCHECK", 15), ("COPY", 16)]
    assert df.directives == {"syntax": "docker/dockerfile:1"}
    assert df.stages[0].base == "base:1" and df.stages[0].name == "b"
    run1 = df.instructions[2]
    assert run1.args == "a && b" and run1.json is None
    h = df.instructions[3].heredocs
    assert [x.name for x in h] == ["EOT"] and h[0].body == "echo $HOME\n" and h[0].expand
    assert df.instructions[4].heredocs[0].body == "line\n"          # <<- strips tabs
    assert df.instructions[5].json == ["x", "y z"]
    assert df.instructions[6].json is None and df.instructions[6].shell == "run.sh --flag"
    assert df.instructions[7].json == ["true"]
    assert df.instructions[8].flags == {"from": "b", "chown": "1:1"} and df.instructions[8].args == "/a /b/"


def test_backtick_escape_and_invalid_json_is_shell_form():
    df = parse("# escape=`\nFROM x\nRUN dir c:\\ `\n  && echo ok\nCMD [not json]\n")
    assert df.escape == "`"
    assert df.instructions[1].args == "dir c:\\ && echo ok"
    assert df.instructions[2].json is None


def test_expansion_and_stage_env():
    df = parse("ARG BASE=deb\nFROM ${BASE}:12\nARG A=1\nENV B=${A}x C=${UNSET:-dflt} D=${A:+set}\nENV E $B-y\n")
    assert df.final.base == "deb:12"
    env = dockerfile.stage_env(df, df.final)
    assert env == {"A": "1", "B": "1x", "C": "dflt", "D": "set", "E": "1x-y"}
    assert dockerfile.stage_env(df, df.final, {"A": "9"})["B"] == "9x"
    assert dockerfile.expand("'$A' $A \\$A", {"A": "v"}) == "'$A' v $A"


def test_parse_errors():
    with pytest.raises(UsageError, match="no FROM"):
        parse("# only a comment\n")
    with pytest.raises(UsageError, match="before the first FROM"):
        parse("RUN x\nFROM y\n")
    with pytest.raises(UsageError, match="not terminated"):
        parse("FROM x\nRUN <<EOF\necho\n")


# lint -------------------------------------------------------------------------------------------------
def findings(text: str, profile=None, context=None) -> list:
    return [c for c in lint.lint(parse(text), load_profile(profile) if profile else None, context).items]


def names(cs, status=None):
    return [c.name for c in cs if status is None or c.status == status]


def test_noop_user_and_root_paths_name_line_and_fix():
    cs = findings("FROM x\nEXPOSE 80\nVOLUME /data\nHEALTHCHECK CMD true\nUSER app\nWORKDIR /root/app\n")
    by = {c.name: c for c in cs}
    assert by["lint.noop.expose"].detail.startswith("Dockerfile:2:") and "fix:" in by["lint.noop.expose"].detail
    assert by["lint.noop.volume"].detail.startswith("Dockerfile:3:") and "bind" in by["lint.noop.volume"].detail
    assert by["lint.noop.healthcheck"].detail.startswith("Dockerfile:4:")
    users = [c.detail for c in cs if c.name == "lint.user"]
    assert any(d.startswith("Dockerfile:5:") for d in users) and any(d.startswith("Dockerfile:6:") for d in users)
    assert all(c.stage == "lint" and c.status == "warn" for c in cs)
    # USER root is not reliance on a user
    assert "lint.user" not in names(findings("FROM x\nUSER root\n"))


def test_home_writes_julia_pip_conda():
    cs = findings("FROM debian\nRUN apt-get install -y julia\nRUN julia -e 'using Pkg; Pkg.add(\"A\")'\n")
    j = [c for c in cs if c.name == "lint.home"]
    assert j and j[0].detail.startswith("Dockerfile:2:") and "JULIA_DEPOT_PATH" in j[0].detail
    assert "lint.home" not in names(findings("FROM debian\nENV JULIA_DEPOT_PATH=/opt/depot\n"
                                             "RUN julia -e 'using Pkg; Pkg.add(\"A\")'\n"))
    assert "lint.home" in names(findings("FROM debian\nENV JULIA_DEPOT_PATH=/root/.julia\nRUN julia -e 1\n"))
    pip = findings("FROM python\nRUN pip install --user numpy\n")
    assert any(c.name == "lint.home" and "Dockerfile:2" in c.detail and "--user" in c.detail for c in pip)
    conda = findings("FROM debian\nRUN bash Miniconda3.sh -b -p $HOME/miniconda\n")
    assert "lint.home" in names(conda)
    assert "lint.home" in names(findings("FROM x\nCMD cat ~/.cache/x\n"))


def test_root_entrypoints_inline_and_in_copied_script(tmp_path):
    assert "lint.root-entrypoint" in names(findings('FROM x\nENTRYPOINT ["gosu", "app", "run"]\n'))
    assert "lint.root-entrypoint" in names(findings("FROM x\nCMD su-exec app run\n"))
    (tmp_path / "entry.sh").write_text("#!/bin/sh\n# gosu in a comment does not count\nexec su-exec app \"$@\"\n")
    cs = findings('FROM x\nCOPY entry.sh /usr/local/bin/\nENTRYPOINT ["/usr/local/bin/entry.sh"]\n', context=tmp_path)
    hit = [c for c in cs if c.name == "lint.root-entrypoint"]
    assert hit and "Dockerfile:3" in hit[0].detail and "su-exec" in hit[0].detail and "its line 3" in hit[0].detail
    (tmp_path / "entry.sh").write_text("#!/bin/sh\nexec \"$@\"\n")
    cs = findings('FROM x\nCOPY entry.sh /usr/local/bin/\nENTRYPOINT ["/usr/local/bin/entry.sh"]\n', context=tmp_path)
    assert "lint.root-entrypoint" not in names(cs)


def test_runtime_writes_into_the_read_only_image(tmp_path):
    (tmp_path / "start.sh").write_text("#!/bin/sh\n# sed -i in a comment\nmkdir -p /tmp/cache\n"
                                       "sed -i \"s/@PORT@/$PORT/\" /etc/app.conf\nexec app \"$@\"\n")
    cs = findings('FROM x\nCOPY start.sh /start.sh\nENTRYPOINT ["/start.sh"]\n', context=tmp_path)
    ro = [c for c in cs if c.name == "lint.readonly"]
    assert ro and "Dockerfile:3" in ro[0].detail and "its line 4" in ro[0].detail and "/etc/app.conf" in ro[0].detail
    assert "lint.readonly" in names(findings("FROM x\nCMD app > /var/log/app.log\n"))
    assert "lint.readonly" not in names(findings("FROM x\nCMD app > /tmp/app.log 2>/dev/null\n"))
    (tmp_path / "start.sh").write_text("#!/bin/sh\nmkdir -p /tmp/x && cp /opt/a /tmp/x/ && exec app\n")
    cs = findings('FROM x\nCOPY start.sh /start.sh\nENTRYPOINT ["/start.sh"]\n', context=tmp_path)
    assert "lint.readonly" not in names(cs)


def test_mpi_stack_against_host_mpi_profiles():
    ompi = "FROM debian\nRUN apt-get update && \\\n    apt-get install -y openmpi-bin libopenmpi-dev\n"
    cs = findings(ompi, "supermuc-ng")                       # MPICH-ABI host injection
    bad = [c for c in cs if c.name == "lint.mpi"]
    assert bad and bad[0].status == "fail" and bad[0].detail.startswith("Dockerfile:2:")
    assert "mpich" in bad[0].detail.lower() and "fix:" in bad[0].detail
    assert "lint.mpi" not in names(findings(ompi, "generic-x86-64"))   # container MPI: fine
    mpich = "FROM debian\nRUN apt-get install -y libmpich-dev mpich\n"
    assert "lint.mpi" not in names(findings(mpich, "supermuc-ng"))
    # built from source
    src = "FROM debian\nRUN curl -O https://download.open-mpi.org/release/open-mpi/v4.1/openmpi-4.1.6.tar.bz2\n"
    assert "lint.mpi" in names(findings(src, "supermuc-ng", None), "fail")


def test_buildkit_only_flags():
    cs = findings("FROM x\nRUN --mount=type=cache,target=/root/.cache pip install a\nCOPY --link a /b\n")
    bk = [c for c in cs if c.name == "lint.buildkit"]
    assert [c.detail.split(":")[1] for c in bk] == ["2", "3"] and "classic builder" in bk[0].detail
    assert "lint.buildkit" not in names(findings("FROM x\nRUN <<EOF\necho\nEOF\nCOPY --chown=1 a /b\n"))


def test_fabric_gpu_platform_march():
    ib_no_ucx = "FROM debian\nRUN apt-get install -y libopenmpi-dev openmpi-bin\n"
    fab = [c for c in findings(ib_no_ucx, "marenostrum5-gpp") if c.name == "lint.fabric"]
    assert fab and "TCP" in fab[0].detail and "libucx0" in fab[0].detail
    ok = "FROM debian\nRUN apt-get install -y libopenmpi-dev openmpi-bin libucx0 libibverbs1\n"
    assert "lint.fabric" not in names(findings(ok, "marenostrum5-gpp"))
    opa_only = "FROM debian\nRUN apt-get install -y libmpich-dev libpsm2-2\n"
    other = [c for c in findings(opa_only, "marenostrum5-gpp") if c.name == "lint.fabric"]
    assert any("another interconnect" in c.detail and "psm2" in c.detail for c in other)
    both = "FROM debian\nRUN apt-get install -y libmpich-dev libpsm2-2 libucx0\n"
    assert "lint.fabric" not in names(findings(both, "marenostrum5-gpp"))
    cuda = "FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04\n"
    assert "lint.gpu" in names(findings(cuda, "lumi-c"))
    assert "lint.gpu" not in names(findings(cuda, "juwels-booster"))
    arm = "FROM --platform=linux/arm64 debian\n"
    assert "lint.platform" in names(findings(arm, "supermuc-ng"), "fail")
    assert "lint.platform" not in names(findings(arm, "alps-gh200"))
    m = [c for c in findings("FROM x\nRUN gcc -O3 -march=native a.c\n", "supermuc-ng") if c.name == "lint.march"]
    assert m and "skylake" in m[0].detail
    lvl = [c for c in findings("FROM x\nRUN gcc -O3 -march=skylake-avx512 a.c\n", "juwels-booster")
           if c.name == "lint.march"]
    assert lvl and lvl[0].status == "fail" and "x86-64-v4" in lvl[0].detail and "x86-64-v3" in lvl[0].detail
    assert "lint.march" not in names(findings("FROM x\nRUN gcc -march=skylake-avx512 a.c\n", "supermuc-ng"))
    assert "lint.march" in names(findings("FROM x\nRUN gcc -march=x86-64-v3 a.c\n", "generic-aarch64"), "fail")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_recipe_dockerfiles_lint_clean_for_their_profiles(recipe):
    from hpcconv import recipes

    r = recipes.load(recipe)
    for p in r.profiles:
        cs = lint.lint(dockerfile.load(r.dockerfile), load_profile(p), r.context, r.build_args)
        assert [c.status for c in cs.items] == ["pass"], [c.detail for c in cs.items]


def test_lint_command_exit_codes(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian\nEXPOSE 80\n")
    r = hpc("lint", str(tmp_path / "Dockerfile"))
    assert r.returncode == 0, r.stderr
    assert "Dockerfile:2" in r.stderr
    r = hpc("lint", str(tmp_path / "Dockerfile"), "--strict")
    assert r.returncode == 1
    (tmp_path / "Dockerfile").write_text("FROM debian\nRUN apt-get install -y openmpi-bin\n")
    assert hpc("lint", str(tmp_path / "Dockerfile"), "--profile", "supermuc-ng").returncode == 1
    assert hpc("lint", str(tmp_path / "Dockerfile"), "--profile", "no-such-profile").returncode == 2


# translation --------------------------------------------------------------------------------------------
def sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur = None
    for ln in text.splitlines():
        if ln.startswith("%"):
            cur = ln
            out[cur] = []
        elif cur and ln.strip():
            out[cur].append(ln)
    return out


def test_translate_sections_and_warnings(tmp_path):
    df = parse("ARG BASE=debian:12\nFROM ${BASE}\nARG GREETING=hi\nENV APP=/opt/app PATH=/opt/app/bin:$PATH\n"
               "LABEL org.opencontainers.image.title=tool\nWORKDIR /opt/app\nCOPY tool.sh bin/tool\n"
               "RUN mkdir -p /opt/out && echo \"$GREETING $APP\" > /opt/out/msg\nEXPOSE 80\nUSER app\n"
               "ENTRYPOINT [\"/opt/app/bin/tool\"]\nCMD [\"--help\"]\n")
    t = translate.translate(df, {"GREETING": "hello"})
    s = sections(t.text)
    assert "Bootstrap: docker" in t.text and "From: debian:12" in t.text
    assert s["%files"] == ["    tool.sh /opt/app/bin/tool"]
    post = "\n".join(s["%post"])
    assert "GREETING=hello" in post and 'export APP="/opt/app"' in post and "mkdir -p /opt/app && cd /opt/app" in post
    assert s["%environment"] == ['    export APP="/opt/app"', '    export PATH="/opt/app/bin:$PATH"']
    assert any("exec /opt/app/bin/tool --help" in x for x in s["%runscript"])
    assert s["%labels"] == ["    org.opencontainers.image.title tool"]
    assert any("EXPOSE" in w and "Dockerfile:9" in w for w in t.warnings)
    assert any("USER" in w and "Dockerfile:10" in w for w in t.warnings)
    # %post is valid shell and does what the Dockerfile's RUN steps did (run it in a scratch dir)
    body = "\n".join(s["%post"]).replace("/opt/", f"{tmp_path}/opt/")
    r = subprocess.run(["/bin/sh", "-c", body], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "opt/out/msg").read_text() == f"hello {tmp_path}/opt/app\n"


def test_translate_multistage_heredoc_and_untranslatable():
    df = parse("FROM golang AS build\nRUN go build -o /app .\nFROM debian\nCOPY --from=build /app /usr/bin/app\n"
               "COPY --from=nginx:latest /etc/nginx /etc/nginx\nRUN <<EOF\nset -e\necho a > /x\nEOF\n"
               "ADD https://example.org/f.txt /opt/\n")
    t = translate.translate(df)
    assert t.text.count("Bootstrap: docker") == 2 and "Stage: build" in t.text
    assert "%files from build\n    /app /usr/bin/app" in t.text
    assert "echo a > /x" in t.text and "curl -fsSL -o /opt/f.txt https://example.org/f.txt" in t.text
    assert any("nginx:latest" in w and "Dockerfile:5" in w for w in t.warnings)
    assert any("ADD of a URL" in w for w in t.warnings)


def test_recipe_translate_command(tmp_path):
    out = tmp_path / "app.def"
    r = hpc("recipe", "translate", str(ROOT / "recipes/python-numpy/Dockerfile"), "--to", "singularity-def",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "From: debian:12-slim" in text and "python3-numpy" in text and "%runscript" in text
    assert "analyze.py /opt/analyze/bin/analyze" in text
    assert hpc("recipe", "translate", str(ROOT / "recipes/python-numpy/Dockerfile"), "--to", "docker").returncode == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_recipe_dockerfiles_translate_to_valid_definition_files(recipe, tmp_path):
    from hpcconv import recipes

    r = recipes.load(recipe)
    t = translate.translate(dockerfile.load(r.dockerfile), r.build_args)
    s = sections(t.text)
    assert "%post" in s and "Bootstrap: docker" in t.text
    assert not [w for w in t.warnings if "not translated" in w or "left out" in w], t.warnings
    # every %post (one per stage) is valid shell
    for block in t.text.split("%post")[1:]:
        body = block.split("\n%")[0].split("\nBootstrap:")[0]
        f = tmp_path / "post.sh"
        f.write_text(body)
        n = subprocess.run(["sh", "-n", str(f)], capture_output=True, text=True)
        assert n.returncode == 0, (n.stderr, body)
    # %files sources exist in the build context
    for line in s.get("%files", []):
        assert (r.context / line.split()[0]).exists(), line
