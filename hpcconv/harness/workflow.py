"""The staged workflow the commands share: lint -> build -> (Docker tests) -> convert (pull, flatten,
rewrite, emit through :mod:`hpcconv.pipeline`) -> emit validation -> run (smoke + user tests).

Every function returns checks; :class:`~hpcconv.harness.report.RunReport` collects them per
(image, profile, target). The CLI (``workflow_cli.py``) and ``recipe run`` only call these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..progress import NULL
from .checks import FAIL, PASS, SKIP, Checks
from .report import RunReport
from .run import UserTest, docker_tests, run_stage

EXT = {("charliecloud", "squashfs"): ".sqfs", ("charliecloud", "tar"): ".tar.gz", ("charliecloud", "dir"): "",
       ("singularity", "sif"): ".sif", ("singularity", "sandbox"): ".sandbox", ("shifter", "squashfs"): ".shifter"}
DEFAULT_FMT = {"charliecloud": "squashfs", "singularity": "sif", "shifter": "squashfs"}


@dataclass
class Built:
    """The Dockerfile side: lint (per profile), the build, the Docker-side user tests."""

    tag: str | None
    dockerfile: Path | None
    checks: Checks = field(default_factory=Checks)
    docker_results: dict[int, tuple[bool, str]] | None = None

    @property
    def ok(self) -> bool:
        return self.tag is not None and not any(c.stage == "build" and c.name == "docker build" and c.status == FAIL
                                                for c in self.checks.items)


def lint_checks(dockerfile: Path, profile, context: Path | None, build_args: dict[str, str]) -> Checks:
    from ..dockerfile import load
    from ..lint import lint

    return lint(load(dockerfile), profile, context, build_args)


def build_image(context: Path, dockerfile: Path | None, tag: str, build_args: dict[str, str], target: str | None,
                tests: list[UserTest], log: Callable[[str], None] | None, no_cache: bool = False,
                platform: str | None = None) -> Built:
    from .build import build

    res = build(context, dockerfile, tag, build_args, target, log, no_cache=no_cache, platform=platform)
    b = Built(tag if res.ok else None, Path(dockerfile) if dockerfile else Path(context) / "Dockerfile", res.checks)
    if res.ok and tests:
        c, results = docker_tests(tag, tests)
        b.checks.extend(c)
        b.docker_results = results
    return b


def output_path(out_dir: Path, stem: str, target: str, fmt: str) -> Path:
    return Path(out_dir) / f"{stem}{EXT[(target, fmt)]}"


def convert_and_test(source: str, opts, target: str, output: Path, fmt: str | None, profile, *,
                     compression: str = "auto", tests: list[UserTest] = (), docker_results=None,
                     run: bool = True, reporter=NULL, force: bool = False, name: str | None = None) -> RunReport:
    """One (image, profile, target): pipeline.convert, then emit validation, then the run stage."""
    from .. import pipeline
    from ..errors import HpcconvError
    from .images import from_output, validate

    fmt = fmt or DEFAULT_FMT[target]
    rep = RunReport(name or f"{source} -> {target}" + (f" @ {profile.name}" if profile else ""), source=source,
                    profile=profile.name if profile else None, target=target, format=fmt, output=str(output))
    t0 = time.monotonic()
    try:
        out = pipeline.convert(source, opts, target, Path(output), fmt, compression, profile, reporter, force)
    except HpcconvError as e:
        stage = "pull" if e.exit_code == 3 else "emit"
        rep.checks.add(stage, "convert", FAIL, e.message + (f" (hint: {e.hint})" if e.hint else ""),
                       time.monotonic() - t0)
        return rep
    dt = time.monotonic() - t0
    img = out.image
    rep.checks.add("pull", "source", PASS, f"{source} {img.digest} ({img.platform}, {len(img.layers)} layers)")
    # stage names of the pipeline's checks: the platform check is the manifest/platform match of the pull
    for c in out.checks.items:
        if c.name == "platform":
            c = replace(c, stage="pull")
        rep.checks.items.append(c)
    if out.emit is None:
        rep.checks.add("run", "run", SKIP, "nothing was converted (see the failed checks)")
        return rep
    rep.checks.add("emit", "convert", PASS, f"wrote {output} in {dt:.1f} s", dt)
    emitted = from_output(target, fmt, Path(output), out.emit, img.platform.architecture, img.config)
    rep.checks.extend(validate(emitted))
    if any(c.stage == "emit" and c.name.startswith("valid:") and c.status == FAIL for c in rep.checks.items):
        rep.checks.add("run", "run", SKIP, "the emitted image is not valid: not run")
        return rep
    if run:
        rep.checks.extend(run_stage(emitted, list(tests), docker_results))
    return rep


def test_image(path: Path, tests: list[UserTest], profile=None, arch: str | None = None, run: bool = True,
               name: str | None = None, binds: list[tuple[str, str]] = ()) -> RunReport:
    """``hpcconv test``: emit validation and the run stage on an existing image."""
    from .images import detect, validate

    e = detect(Path(path), arch)
    e.binds = list(binds)
    rep = RunReport(name or str(path), output=str(path), profile=profile.name if profile else None,
                    target={"charliecloud": "charliecloud", "sif": "singularity", "sandbox": "singularity",
                            "shifter": "shifter"}[e.kind], format=e.fmt)
    rep.checks.extend(validate(e))
    if profile is not None and e.arch:
        want = profile.oci_arch
        rep.checks.add("pull", "platform", PASS if e.arch == want else FAIL,
                       f"image is {e.arch}, {profile.name} runs {want}")
    # an unknown architecture (squashfs, dir, tar without --arch/--profile) runs natively; a foreign binary
    # then fails with an exec format error unless binfmt_misc handles it
    if any(c.status == FAIL and c.stage == "emit" for c in rep.checks.items):
        rep.checks.add("run", "run", SKIP, "the image is not valid: not run")
        return rep
    if run:
        rep.checks.extend(run_stage(e, tests))
    return rep
