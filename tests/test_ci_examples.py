"""examples/ci: the GitLab job and the GitHub workflow are valid YAML, publish the JUnit file that the
hpcconv step writes, keep it when checks fail, and every hpcconv command line in them parses with
the real command-line interface (options that do not exist would fail here)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import typer.main
import yaml

from hpcconv.cli import app

CI = Path(__file__).resolve().parent.parent / "examples" / "ci"


def hpcconv_lines(text: str) -> list[list[str]]:
    out = []
    for script in re.findall(r"(hpcconv (?:[^\n\\]|\\\n)+)", text):
        words = shlex.split(script.replace("\\\n", " "))
        out.append(words)
    return out


def parse_cli(words: list[str]) -> None:
    cmd = typer.main.get_command(app)
    args = [os.path.expandvars(w) for w in words[1:]]
    ctx = cmd.make_context("hpcconv", list(args), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):      # a group (typer vendors click: match by shape)
        pending = list(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])) + ctx.args
        name, sub, rest = cmd.resolve_command(ctx, pending)
        ctx = sub.make_context(name, rest, parent=ctx)
        cmd = sub


def gitlab_commands() -> list[list[str]]:
    job = yaml.safe_load((CI / "gitlab-ci.yml").read_text())["hpc-image"]
    return [shlex.split(line) for line in job["script"] if line.startswith("hpcconv ")]


def test_gitlab_job_publishes_the_junit_it_writes(monkeypatch):
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    job = doc["hpc-image"]
    cmds = gitlab_commands()
    assert cmds, "no hpcconv step"
    junit = [c[c.index("--junit") + 1] for c in cmds if "--junit" in c]
    assert junit and job["artifacts"]["reports"]["junit"] == junit[0]
    assert job["artifacts"]["when"] == "always"
    monkeypatch.setenv("SITE_PROFILE", job["variables"]["SITE_PROFILE"])
    for c in cmds:
        parse_cli(c)


def test_github_workflow_publishes_the_junit_it_writes(monkeypatch):
    doc = yaml.safe_load((CI / "github-actions.yml").read_text())
    steps = doc["jobs"]["convert"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    cmds = hpcconv_lines(runs)
    junit = [c[c.index("--junit") + 1] for c in cmds if "--junit" in c]
    pub = next(s for s in steps if "junit" in s.get("uses", ""))
    assert junit and pub["with"]["report_paths"] == junit[0] and pub["if"] == "always()"
    monkeypatch.setenv("SITE_PROFILE", doc["jobs"]["convert"]["env"]["SITE_PROFILE"])
    for c in cmds:
        parse_cli(c)


def test_cli_parser_check_can_fail():
    for bad in (["hpcconv", "recipe", "run", "x.toml", "-o", "out", "--no-such-option"],
                ["hpcconv", "launcher", "img", "--runtime", "charliecloud"],          # --profile missing
                ["hpcconv", "no-such-command"]):
        with pytest.raises(Exception) as e:
            parse_cli(bad)
        assert type(e.value).__name__ in ("NoSuchOption", "MissingParameter", "UsageError"), e.value
