"""Reports: the JSON report (schema ``hpcconv/schemas/report.schema.json``, version 1), JUnit XML
(the Jenkins/GitLab ``junit-10.xsd`` shape, ``hpcconv/schemas/junit-10.xsd``) and the terminal table.

JSON report, version 1 (stable: fields are only ever added)::

    {"schema": "hpcconv-report", "version": 1, "tool": {"name": "hpcconv", "version": "0.1.0"},
     "command": "recipe run", "created": "2026-...Z", "strict": false,
     "status": "pass|warn|fail", "exit_code": 0|1,
     "summary": {"total", "pass", "warn", "fail", "skip", "duration"},
     "runs": [{"name", "source", "dockerfile", "docker_image", "profile", "target", "format", "output",
               "status", "duration",
               "checks": [{"stage", "name", "status", "detail", "duration"}]}]}

JUnit: one ``<testsuite>`` per (run, stage), named ``RUN / STAGE``; one ``<testcase>`` per check
(``classname`` = ``hpcconv.RUN.STAGE``); ``fail`` -> ``<failure>``, ``skip`` -> ``<skipped>``,
``warn`` -> a passing test with the warning in ``<system-out>`` (a ``<failure type="warning">`` with
``--strict``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from .. import __version__
from .checks import FAIL, PASS, SKIP, WARN, Checks

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
REPORT_SCHEMA = SCHEMA_DIR / "report.schema.json"
JUNIT_XSD = SCHEMA_DIR / "junit-10.xsd"
STAGE_ORDER = ["lint", "build", "pull", "flatten", "rewrite", "prepare", "emit", "run"]


@dataclass
class RunReport:
    name: str
    checks: Checks = field(default_factory=Checks)
    source: str | None = None
    dockerfile: str | None = None
    docker_image: str | None = None
    profile: str | None = None
    target: str | None = None
    format: str | None = None
    output: str | None = None

    def status(self, strict: bool = False) -> str:
        if self.checks.failed or (strict and self.checks.warned):
            return FAIL
        return WARN if self.checks.warned else PASS

    def to_json(self, strict: bool = False) -> dict:
        return {"name": self.name, "source": self.source, "dockerfile": self.dockerfile,
                "docker_image": self.docker_image, "profile": self.profile, "target": self.target,
                "format": self.format, "output": self.output, "status": self.status(strict),
                "duration": round(sum(c.duration for c in self.checks.items), 3),
                "checks": self.checks.to_json()}


def overall(runs: list[RunReport], strict: bool = False) -> str:
    st = [r.status(strict) for r in runs]
    return FAIL if FAIL in st else WARN if WARN in st else PASS


def exit_code(runs: list[RunReport], strict: bool = False) -> int:
    return 1 if overall(runs, strict) == FAIL else 0


def to_json(runs: list[RunReport], command: str, strict: bool = False) -> dict:
    items = [c for r in runs for c in r.checks.items]
    return {
        "schema": "hpcconv-report", "version": 1,
        "tool": {"name": "hpcconv", "version": __version__},
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "strict": strict, "status": overall(runs, strict), "exit_code": exit_code(runs, strict),
        "summary": {"total": len(items), **{s: sum(c.status == s for c in items) for s in (PASS, WARN, FAIL, SKIP)},
                    "duration": round(sum(c.duration for c in items), 3)},
        "runs": [r.to_json(strict) for r in runs],
    }


def write_json(path: Path, runs: list[RunReport], command: str, strict: bool = False) -> dict:
    doc = to_json(runs, command, strict)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


_BAD_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _x(s: str) -> str:
    return _BAD_XML.sub("?", s)


def _stages(checks: Checks) -> list[str]:
    seen = []
    for c in checks.items:
        if c.stage not in seen:
            seen.append(c.stage)
    return sorted(seen, key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), seen.index(s)))


def junit(runs: list[RunReport], strict: bool = False, name: str = "hpcconv") -> ET.Element:
    now = _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    host = socket.gethostname()
    root = ET.Element("testsuites", name=name)
    tot = dict(tests=0, failures=0, errors=0, skipped=0, time=0.0)
    for sid, r in enumerate(runs):
        for stage in _stages(r.checks):
            cs = [c for c in r.checks.items if c.stage == stage]
            fails = sum(c.status == FAIL or (strict and c.status == WARN) for c in cs)
            skips = sum(c.status == SKIP for c in cs)
            t = sum(c.duration for c in cs)
            suite = ET.SubElement(root, "testsuite", name=_x(f"{r.name} / {stage}"), tests=str(len(cs)),
                                  failures=str(fails), errors="0", skipped=str(skips), time=f"{t:.3f}",
                                  timestamp=now, hostname=host, id=str(sid), package=_x(f"hpcconv.{r.name}"))
            props = ET.SubElement(suite, "properties")
            for k in ("source", "dockerfile", "docker_image", "profile", "target", "format", "output"):
                v = getattr(r, k)
                if v:
                    ET.SubElement(props, "property", name=k, value=_x(str(v)))
            if not len(props):
                suite.remove(props)
            for c in cs:
                tc = ET.SubElement(suite, "testcase", name=_x(c.name), classname=_x(f"hpcconv.{r.name}.{stage}"),
                                   time=f"{c.duration:.3f}")
                if c.status == FAIL:
                    f = ET.SubElement(tc, "failure", message=_x(c.detail[:500]), type="fail")
                    f.text = _x(c.detail)
                elif c.status == WARN and strict:
                    f = ET.SubElement(tc, "failure", message=_x(c.detail[:500]), type="warning")
                    f.text = _x(c.detail)
                elif c.status == SKIP:
                    ET.SubElement(tc, "skipped", message=_x(c.detail[:500]))
                if c.status == WARN:
                    so = ET.SubElement(tc, "system-out")
                    so.text = _x("WARNING: " + c.detail)
                elif c.detail and c.status == PASS:
                    so = ET.SubElement(tc, "system-out")
                    so.text = _x(c.detail)
            tot["tests"] += len(cs)
            tot["failures"] += fails
            tot["skipped"] += skips
            tot["time"] += t
    root.set("tests", str(tot["tests"]))
    root.set("failures", str(tot["failures"]))
    root.set("errors", "0")
    root.set("disabled", "0")
    root.set("time", f"{tot['time']:.3f}")
    return root


def write_junit(path: Path, runs: list[RunReport], strict: bool = False) -> None:
    root = junit(runs, strict)
    ET.indent(root)
    Path(path).write_bytes(b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n")


def table(runs: list[RunReport], strict: bool = False, console=None) -> None:
    """The rich summary on stderr: one row per check, grouped by run, and a verdict per run."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    colours = {PASS: "green", WARN: "yellow", FAIL: "red", SKIP: "dim"}
    console = console or Console(stderr=True)
    for r in runs:
        t = Table(title=f"{r.name}: {r.status(strict).upper()}", title_justify="left", show_lines=False)
        for col in ("stage", "check", "status", "time", "detail"):
            t.add_column(col, overflow="fold")
        for c in r.checks.items:
            st = c.status if not (strict and c.status == WARN) else "warn→fail"
            t.add_row(c.stage, Text(c.name), Text(st, style=colours.get(c.status, "")), f"{c.duration:.2f}s",
                      Text(c.detail))
        console.print(t)
    items = [c for r in runs for c in r.checks.items]
    counts = ", ".join(f"{sum(c.status == s for c in items)} {s}" for s in (PASS, WARN, FAIL, SKIP))
    v = overall(runs, strict)
    console.print(Text(f"{len(runs)} run(s), {len(items)} checks: {counts} -> {v.upper()}"
                       + (" (--strict: warnings fail)" if strict and v == FAIL and not any(r.checks.failed for r in runs) else ""),
                       style=colours[v]))
