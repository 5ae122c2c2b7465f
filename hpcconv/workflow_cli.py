"""Commands of the Dockerfile front end and the staged test harness (registered in cli.py):

    hpcconv build    CONTEXT [-f Dockerfile] [-t TAG] [--build-arg K=V] --target T[:FMT] [--profile P] -o OUTDIR
    hpcconv lint     Dockerfile [--profile P]
    hpcconv test     IMAGE [--profile P] [--run 'CMD']
    hpcconv launcher --runtime charliecloud|singularity|shifter --profile P IMAGE [-- CMD...]
    hpcconv recipe   translate Dockerfile --to singularity-def [-o FILE]
    hpcconv recipe   run FILE.toml|DIR -o OUTDIR

and ``hpcconv convert path/to/Dockerfile`` (cli.convert hands it to :func:`convert_dockerfile`).
Reports: ``--report FILE.json`` (hpcconv/schemas/report.schema.json), ``--junit FILE.xml``; exit 1
when a check fails (``--strict``: or warns).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import UsageError

TargetOpt = typer.Option(["charliecloud"], "--target", help="charliecloud, singularity or shifter, optionally :FORMAT "
                         "(charliecloud:dir|tar|squashfs, singularity:sif|sandbox); repeatable.")
ProfileOpt = typer.Option([], "--profile", help="Site profile to lint against and convert for; repeatable.")
TestOpt = typer.Option([], "--test", help="A shell command that must exit 0 in the Docker image and in every converted "
                       "image; repeatable.")
TestsFromOpt = typer.Option(None, "--tests-from", help="TOML file with [[tests]] tables (run, expect, exit_code).")
ReportOpt = typer.Option(None, "--report", help="Write the JSON report (hpcconv/schemas/report.schema.json) here.")
JunitOpt = typer.Option(None, "--junit", help="Write a JUnit XML report (for GitLab CI / Jenkins) here.")
StrictOpt = typer.Option(False, "--strict", help="Warnings fail (exit 1), in the exit status and the reports.")
BuildArgOpt = typer.Option([], "--build-arg", help="K=V for ARG K; repeatable.")


def _cli():
    """The cli module, whose G holds the global options (`python -m hpcconv.cli` hands over to the
    imported hpcconv.cli too, so there is one copy of that state)."""
    from . import cli

    return cli


def _g():
    return _cli().G


def _echo_err(line: str) -> None:
    if not _g().quiet:
        print(line, file=sys.stderr, flush=True)


def parse_build_args(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it or it.startswith("="):
            raise UsageError(f"--build-arg {it!r} is not K=V")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def parse_targets(items: list[str]) -> list[tuple[str, str]]:
    from .recipes import TARGETS

    out = []
    for it in items:
        tgt, _, fmt = it.partition(":")
        if tgt not in TARGETS:
            raise UsageError(f"unknown target {tgt!r}", hint="charliecloud, singularity or shifter")
        fmt = fmt or TARGETS[tgt][0]
        if fmt not in TARGETS[tgt]:
            raise UsageError(f"{tgt} has no format {fmt!r}", hint=" or ".join(TARGETS[tgt]))
        if (tgt, fmt) not in out:
            out.append((tgt, fmt))
    return out


def user_tests(cmds: list[str], tests_from: Optional[Path]):
    from .harness.run import UserTest

    tests = [UserTest(c) for c in cmds]
    if tests_from is not None:
        import tomllib

        try:
            data = tomllib.loads(tests_from.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read tests from {tests_from}: {e}") from None
        tests += [UserTest.from_dict(t, f"{tests_from}: tests[{i}]") for i, t in enumerate(data.get("tests", []))]
    return tests


def _profiles(names: list[str]):
    from .profiles import load_profile

    return [load_profile(n) for n in names] or [None]


def _opts(store: Optional[Path] = None):
    from .sources import SourceOptions

    return SourceOptions(store_path=str(store) if store else None, reporter=_cli()._reporter())


def finish(runs, command: str, report: Optional[Path], junit: Optional[Path], strict: bool) -> None:
    from .harness import report as rpt

    g = _g()
    if report:
        doc = rpt.write_json(report, runs, command, strict)
    else:
        doc = rpt.to_json(runs, command, strict)
    if junit:
        rpt.write_junit(junit, runs, strict)
    if g.json:
        import json

        typer.echo(json.dumps(doc, indent=2))
    elif not g.quiet:
        rpt.table(runs, strict)
        for r in runs:   # plain lines: paths and commands to copy
            if r.output and r.target and command != "test" and Path(r.output).exists():
                line = f"wrote {r.output}"
                if r.profile:
                    rt = {"charliecloud": "charliecloud", "singularity": "singularity", "shifter": "shifter"}[r.target]
                    line += f"  (job script: hpcconv launcher --runtime {rt} --profile {r.profile} {r.output})"
                print(line, file=sys.stderr)
        for p in (report, junit):
            if p:
                print(f"report: {p}", file=sys.stderr)
    code = rpt.exit_code(runs, strict)
    if code:
        raise typer.Exit(code)


def _tag_for(context: Path, dockerfile: Optional[Path]) -> str:
    base = (context.resolve().name or "image").lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip(".-_") or "image"
    return f"hpcconv-build/{base}:latest"


def build_and_convert(context: Path, dockerfile: Optional[Path], tag: Optional[str], build_args: dict[str, str],
                      stage: Optional[str], jobs: list[tuple], tests, *, lint: bool = True, run: bool = True,
                      compression: str = "auto", force: bool = False, no_cache: bool = False,
                      name: Optional[str] = None, store: Optional[Path] = None,
                      platform: Optional[str] = None) -> list:
    """Lint (per profile), build once, test in Docker, then each job (profile, target, fmt, output).
    Returns the RunReports: one for the build, one per job."""
    from .harness.report import RunReport
    from .harness.workflow import build_image, convert_and_test, lint_checks

    dockerfile = Path(dockerfile) if dockerfile else Path(context) / "Dockerfile"
    tag = tag or _tag_for(Path(context), dockerfile)
    name = name or tag.rsplit("/", 1)[-1].split(":")[0]
    brep = RunReport(f"{name} build", dockerfile=str(dockerfile), docker_image=tag)
    profiles = []
    for prof, *_ in jobs:
        if prof not in profiles:
            profiles.append(prof)
    lints = {}
    if lint:
        for prof in profiles:
            lints[prof.name if prof else None] = lint_checks(dockerfile, prof, Path(context), build_args)
        if None in lints:
            brep.checks.extend(lints[None])
    log = None if (_g().quiet or _g().json) else (lambda ln: print(ln, file=sys.stderr, flush=True))
    if platform is None:
        # every profile on one foreign architecture: build for it (RUN steps through qemu-user binfmt)
        from .harness.run import host_arch

        archs = {p.oci_arch for p in profiles if p is not None}
        if len(archs) == 1 and next(iter(archs)) != host_arch():
            platform = f"linux/{next(iter(archs))}"
            brep.checks.add("build", "build platform", "pass", f"{platform} for "
                            + ", ".join(p.name for p in profiles if p) + f" (this host is {host_arch()}: RUN steps "
                            "and Docker-side tests are emulated through qemu-user binfmt)")
    built = build_image(Path(context), dockerfile, tag, build_args, stage, tests, log, no_cache=no_cache,
                        platform=platform)
    brep.checks.extend(built.checks)
    runs = [brep]
    if not built.ok:
        return runs
    for prof, target, fmt, output in jobs:
        label = f"{name} {target}" + (f":{fmt}" if fmt else "") + (f" @ {prof.name}" if prof else "")
        rep = convert_and_test(f"docker-daemon:{tag}", _opts(store), target, output, fmt, prof,
                               compression=compression, tests=tests, docker_results=built.docker_results, run=run,
                               force=force, name=label)
        rep.dockerfile, rep.docker_image = str(dockerfile), tag
        if prof is not None and prof.name in lints:
            rep.checks.items[0:0] = lints[prof.name].items
        runs.append(rep)
    return runs


def build(
    context: Path = typer.Argument(..., help="Build context directory."),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Dockerfile (default CONTEXT/Dockerfile)."),
    tag: Optional[str] = typer.Option(None, "-t", "--tag", help="Engine tag of the build (default hpcconv-build/CONTEXT:latest)."),
    build_arg: List[str] = BuildArgOpt,
    stage: Optional[str] = typer.Option(None, "--stage", help="Build this Dockerfile stage (docker build --target)."),
    platform: Optional[str] = typer.Option(None, "--platform", help="docker build --platform (default: the profiles' architecture when it is not this host's)."),
    target: List[str] = TargetOpt,
    profile: List[str] = ProfileOpt,
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the converted images (created)."),
    test: List[str] = TestOpt,
    tests_from: Optional[Path] = TestsFromOpt,
    report: Optional[Path] = ReportOpt,
    junit: Optional[Path] = JunitOpt,
    strict: bool = StrictOpt,
    no_lint: bool = typer.Option(False, "--no-lint", help="Skip the HPC lint of the Dockerfile."),
    no_run: bool = typer.Option(False, "--no-run", help="Convert and validate, but do not run the images."),
    no_cache: bool = typer.Option(False, "--no-cache", help="docker build --no-cache."),
    compression: str = typer.Option("auto", "--compression", help="auto, gzip or zstd (squashfs/tar)."),
    force: bool = typer.Option(False, "--force", help="Replace outputs that exist."),
    store: Optional[Path] = typer.Option(None, "--store", help="Blob store directory."),
):
    """Build a Dockerfile with the Docker engine (log streamed), lint it for HPC, convert and test the result."""
    targets = parse_targets(target)
    profs = _profiles(profile)
    tests = user_tests(test, tests_from)
    if output.exists() and not output.is_dir():
        raise UsageError(f"-o {output} exists and is not a directory", hint="build writes one image per target into a directory")
    output.mkdir(parents=True, exist_ok=True)
    from .harness.workflow import output_path

    tag_ = tag or _tag_for(context, file)
    stem = tag_.rsplit("/", 1)[-1].split(":")[0]
    jobs = [(p, t, f, output_path(output, stem + (f"-{p.name}" if p and len(profs) > 1 else ""), t, f))
            for p in profs for t, f in targets]
    runs = build_and_convert(context, file, tag_, parse_build_args(build_arg), stage, jobs, tests, lint=not no_lint,
                             run=not no_run, compression=compression, force=force, no_cache=no_cache, store=store,
                             platform=platform)
    finish(runs, "build", report, junit, strict)


def convert_dockerfile(dockerfile: str, target: str, fmt: str, output: Path, compression: str,
                       profile: Optional[str], report: Optional[Path], force: bool, tests: list[str] = (),
                       junit: Optional[Path] = None, strict: bool = False, no_test: bool = False) -> None:
    """``hpcconv convert path/to/Dockerfile``: build it (its directory is the context), then convert."""
    p = Path(dockerfile)
    if p.is_dir():
        context, df = p, p / "Dockerfile"
    else:
        context, df = p.parent, p
    profs = _profiles([profile] if profile else [])
    jobs = [(profs[0], target, fmt, output)]
    runs = build_and_convert(context, df, None, {}, None, jobs, user_tests(list(tests), None), compression=compression,
                             force=force, run=not no_test)
    finish(runs, "convert", report, junit, strict)


def lint_cmd(
    dockerfile: Path = typer.Argument(..., help="Dockerfile to check."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Site profile to check it against."),
    build_arg: List[str] = BuildArgOpt,
    context: Optional[Path] = typer.Option(None, "--context", help="Build context (default: the Dockerfile's directory), to read entrypoint scripts."),
    strict: bool = StrictOpt,
    report: Optional[Path] = ReportOpt,
    junit: Optional[Path] = JunitOpt,
):
    """HPC lint of a Dockerfile (what HPC runtimes ignore, $HOME writes, root entrypoints, MPI/fabric/GPU fit)."""
    from .harness.report import RunReport
    from .harness.workflow import lint_checks

    prof = _profiles([profile] if profile else [])[0]
    rep = RunReport(f"lint {dockerfile.name}" + (f" @ {prof.name}" if prof else ""), dockerfile=str(dockerfile),
                    profile=prof.name if prof else None)
    rep.checks.extend(lint_checks(dockerfile, prof, context or dockerfile.parent, parse_build_args(build_arg)))
    finish([rep], "lint", report, junit, strict)


def test(
    image: Path = typer.Argument(..., help="A SIF, Charliecloud image (dir, tar, squashfs) or Shifter pair (dir, .squashfs or .meta)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Site profile: the image's architecture must match it."),
    run: List[str] = typer.Option([], "--run", "--test", help="A shell command that must exit 0 in the image; repeatable."),
    run_image: List[str] = typer.Option([], "--run-image", help="ARGS for the image's ENTRYPOINT (replacing CMD; '' = CMD), run as "
                                        "each runtime runs an image; must exit 0; repeatable."),
    tests_from: Optional[Path] = TestsFromOpt,
    arch: Optional[str] = typer.Option(None, "--arch", help="The image's architecture (amd64, arm64) when the file does not say (SIF does)."),
    bind: List[str] = typer.Option([], "-b", "--bind", help="HOST[:CONTAINER] to bind for the run stage (e.g. the site's MPI "
                                   "library directory at the profile's mpi.lib_dirs target); repeatable."),
    report: Optional[Path] = ReportOpt,
    junit: Optional[Path] = JunitOpt,
    strict: bool = StrictOpt,
):
    """Validate an emitted image and run it (smoke run + tests) with the runtimes on this host."""
    from .harness.workflow import test_image

    prof = _profiles([profile] if profile else [])[0]
    binds = []
    for b in bind:
        src, _, dst = b.partition(":")
        if not src.startswith("/") or (dst and not dst.startswith("/")):
            raise UsageError(f"--bind {b!r}: HOST[:CONTAINER] with absolute paths")
        if not Path(src).exists():
            raise UsageError(f"--bind {b!r}: {src} does not exist on this host")
        binds.append((src, dst or src))
    from .harness.run import UserTest

    tests = user_tests(run, tests_from) + [UserTest(a, entrypoint=True) for a in run_image]
    rep = test_image(image, tests, prof, arch or (prof.oci_arch if prof else None), binds=binds)
    finish([rep], "test", report, junit, strict)


def launcher(
    image: str = typer.Argument(..., help="The converted image (path; Shifter: the id, dir or .squashfs)."),
    runtime: str = typer.Option(..., "--runtime", help="charliecloud, singularity (apptainer) or shifter."),
    profile: str = typer.Option(..., "--profile", help="Site profile whose binds, MPI and environment to use."),
    command: List[str] = typer.Argument(None, help="Command to run in the image (default: the script's arguments)."),
    job_name: str = typer.Option("hpcconv", "--job-name"),
    nodes: int = typer.Option(1, "--nodes"),
    ntasks_per_node: int = typer.Option(1, "--ntasks-per-node"),
    time_limit: str = typer.Option("01:00:00", "--time"),
    account: Optional[str] = typer.Option(None, "--account"),
    partition: Optional[str] = typer.Option(None, "--partition"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the script here (default stdout)."),
):
    """Print an sbatch script that runs IMAGE at the profile's site (binds, host MPI, environment, srun --mpi)."""
    from . import launcher as L

    prof = _profiles([profile])[0]
    text = L.script(runtime, prof, L.default_image_ref(runtime, image), list(command or []), job_name, nodes,
                    ntasks_per_node, time_limit, account, partition)
    if output:
        output.write_text(text)
        output.chmod(0o755)
    else:
        typer.echo(text, nl=False)


recipe_app = typer.Typer(no_args_is_help=True, help="Recipes: translate a Dockerfile, run conversion recipes.")


@recipe_app.command("translate")
def translate_cmd(
    dockerfile: Path = typer.Argument(..., help="Dockerfile to translate."),
    to: str = typer.Option("singularity-def", "--to", help="Output recipe format: singularity-def (Apptainer definition file)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here (default stdout)."),
    build_arg: List[str] = BuildArgOpt,
):
    """Write an Apptainer definition file from a Dockerfile (warnings on stderr name what cannot be translated)."""
    from .dockerfile import load
    from .translate import translate

    if to not in ("singularity-def", "apptainer-def"):
        raise UsageError(f"--to {to}: unknown recipe format", hint="singularity-def")
    t = translate(load(dockerfile), parse_build_args(build_arg))
    if output:
        output.write_text(t.text)
    else:
        typer.echo(t.text, nl=False)
    for w in t.warnings:
        print(f"hpcconv: warning: {w}", file=sys.stderr)


@recipe_app.command("run")
def recipe_run(
    path: Path = typer.Argument(..., help="A recipe (*.toml) or a directory of them."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory for the images: OUT/RECIPE/PROFILE/..."),
    profile: List[str] = typer.Option([], "--profile", help="Use these profiles instead of the recipes' own."),
    build_arg: List[str] = typer.Option([], "--build-arg", help="K=V overriding the recipes' build_args; repeatable."),
    report: Optional[Path] = ReportOpt,
    junit: Optional[Path] = JunitOpt,
    strict: bool = StrictOpt,
    no_run: bool = typer.Option(False, "--no-run", help="Convert and validate, but do not run."),
    force: bool = typer.Option(True, "--force/--no-force", help="Replace earlier outputs (default)."),
    store: Optional[Path] = typer.Option(None, "--store", help="Blob store directory."),
):
    """Convert every (image, profile, target) of the recipes, test each in Docker and after conversion; one report."""
    from . import recipes as R
    from .harness.report import RunReport
    from .harness.run import docker_tests
    from .harness.workflow import convert_and_test, output_path

    overrides = parse_build_args(build_arg)
    runs = []
    for rc in R.find(path):
        profs = _profiles(profile or [p for p in rc.profiles if p])
        base = output / rc.name
        jobs = []
        for p in profs:
            d = base / (p.name if p else "default")
            d.mkdir(parents=True, exist_ok=True)
            for t, f in R.site_targets(rc.targets, p):
                jobs.append((p, t, f, output_path(d, rc.name, t, f)))
        if rc.dockerfile is not None:
            _echo_err(f"== recipe {rc.name}: building {rc.dockerfile}")
            runs += build_and_convert(rc.context, rc.dockerfile, rc.tag, {**rc.build_args, **overrides}, None, jobs,
                                      rc.tests, run=not no_run, force=force, name=rc.name, store=store,
                                      platform=rc.platform)
            continue
        _echo_err(f"== recipe {rc.name}: {rc.source}")
        docker_results = None
        if rc.tests:
            ref = rc.source.split(":", 1)[1] if rc.source.startswith("docker-daemon:") else \
                rc.source[len("docker://"):] if rc.source.startswith("docker://") else None
            if ref:
                c, docker_results = docker_tests(ref, rc.tests)
                r0 = RunReport(f"{rc.name} docker", source=rc.source, docker_image=ref)
                r0.checks.extend(c)
                runs.append(r0)
        for p, t, f, out in jobs:
            opts = _opts(store)
            if rc.platform:
                from dataclasses import replace

                from .image import Platform

                opts = replace(opts, platform=Platform.parse(rc.platform))
            runs.append(convert_and_test(rc.source, opts, t, out, f, p, tests=rc.tests,
                                         docker_results=docker_results, run=not no_run, force=force,
                                         name=f"{rc.name} {t}:{f}" + (f" @ {p.name}" if p else "")))
    finish(runs, "recipe run", report, junit, strict)


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("lint")(lint_cmd)
    app.command("test")(test)
    app.command("launcher")(launcher)
    app.add_typer(recipe_app, name="recipe")


def convert_harness(source: str, target: str, fmt: str, output: Path, out, prof, tests: list[str],
                    run: bool):
    """`hpcconv convert ... --test/--junit`: the pipeline's checks, then emit validation and (unless
    --no-test) the run stage, the tests also in Docker for a docker-daemon: source. A RunReport."""
    from .harness.images import from_output, validate
    from .harness.report import RunReport
    from .harness.run import UserTest, docker_tests, run_stage

    rep = RunReport(f"{source} -> {target}" + (f" @ {prof.name}" if prof else ""), source=source,
                    profile=prof.name if prof else None, target=target, format=fmt, output=str(output))
    rep.checks.extend(out.checks)
    if out.emit is None:
        return rep
    uts = [UserTest(t) for t in tests]
    emitted = from_output(target, fmt, Path(output), out.emit, out.image.platform.architecture, out.image.config)
    rep.checks.extend(validate(emitted))
    if run and not any(c.stage == "emit" and c.name.startswith("valid:") and c.status == "fail" for c in rep.checks.items):
        results = None
        if uts and source.startswith("docker-daemon:"):
            c, results = docker_tests(source.split(":", 1)[1], uts)
            rep.checks.extend(c)
        rep.checks.extend(run_stage(emitted, uts, results))
    return rep


def write_reports(rep, command: str, report: Optional[Path], junit: Optional[Path], strict: bool) -> None:
    from .harness import report as rpt

    if report:
        rpt.write_json(report, [rep], command, strict)
    if junit:
        rpt.write_junit(junit, [rep], strict)
