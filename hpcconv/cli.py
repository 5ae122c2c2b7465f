"""The `hpcconv` command line: a thin typer shell over the library.

Imports of heavy modules happen inside the commands so that `hpcconv --help` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

if len(sys.argv) < 2 or "--help" in sys.argv[1:]:
    # plain click help: typer's rich help imports rich.markdown & co (~0.1-0.2 s), which would put
    # `hpcconv --help` over its 0.3 s start-up budget (issue 7)
    os.environ.setdefault("TYPER_USE_RICH", "0")

import typer

from . import __version__
from .errors import HpcconvError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn Docker/OCI images into images HPC centres run (Charliecloud, SIF, Shifter).")


@dataclass
class Globals:
    quiet: bool = False
    json: bool = False
    verbose: int = 0
    reporter: object = None   # the running command's Reporter: its warnings go into the result


G = Globals()


def _version(value: bool):
    if value:
        typer.echo(f"hpcconv {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or summaries; errors only."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON result on stdout."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    max_expanded: Optional[str] = typer.Option(None, "--max-expanded", metavar="SIZE", help="Refuse images whose layers expand beyond SIZE in all (decompression bombs): e.g. 64G, 0 = no cap. Default $HPCCONV_MAX_EXPANDED or 128G."),
    timeout: Optional[float] = typer.Option(None, "--timeout", metavar="SECONDS", help="Registry read timeout: a connection silent this long is dropped and resumed (default $HPCCONV_READ_TIMEOUT or 120). Slow transfers: HPCCONV_MIN_RATE/HPCCONV_SLOW_TIMEOUT."),
):
    G.quiet, G.json, G.verbose = quiet, json_out, verbose
    if max_expanded is not None:
        from .flatten import parse_size

        try:
            os.environ["HPCCONV_MAX_EXPANDED"] = str(parse_size(max_expanded))
        except ValueError as e:
            raise UsageError(f"--max-expanded: {e}") from None
    if timeout is not None:
        if timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        os.environ["HPCCONV_READ_TIMEOUT"] = str(timeout)


class Target(str, Enum):
    charliecloud = "charliecloud"
    singularity = "singularity"
    shifter = "shifter"


class Format(str, Enum):
    dir = "dir"
    tar = "tar"
    squashfs = "squashfs"
    sif = "sif"
    sandbox = "sandbox"


TARGET_FORMATS = {"charliecloud": ("squashfs", ("dir", "tar", "squashfs")),
                  "singularity": ("sif", ("sif", "sandbox")),
                  "shifter": ("squashfs", ("squashfs",))}


class Compression(str, Enum):
    auto = "auto"
    gzip = "gzip"
    zstd = "zstd"


# shared options ----------------------------------------------------------------------------------------
PlatformOpt = typer.Option(None, "--platform", help="OS/ARCH or OS/ARCH/VARIANT to pick from a multi-arch image, e.g. linux/arm64.")
InsecureOpt = typer.Option(False, "--insecure", help="Allow plain HTTP (and unverified TLS) for the registry named in SOURCE, and only for it.")
CaCertOpt = typer.Option(None, "--ca-cert", help="PEM bundle of extra CAs for registry TLS (also: SSL_CERT_FILE).")
StoreOpt = typer.Option(None, "--store", help="Blob store directory (default $HPCCONV_STORE or ~/.cache/hpcconv/store).")
UserOpt = typer.Option(None, "--username", help="Registry user; the password comes from $HPCCONV_PASSWORD or --password-stdin.")
PassStdinOpt = typer.Option(False, "--password-stdin", help="Read the registry password from standard input.")


def _reporter():
    from .progress import Reporter

    G.reporter = Reporter(enabled=not (G.quiet or G.json))
    return G.reporter


def _source_options(source: str, platform: Optional[str], insecure: bool, ca_cert: Optional[Path],
                    store: Optional[Path], username: Optional[str], password_stdin: bool, reporter):
    from .image import Platform
    from .sources import SourceOptions

    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif os.environ.get("HPCCONV_PASSWORD"):
        password = os.environ["HPCCONV_PASSWORD"]
    if password and not username:
        username = os.environ.get("HPCCONV_USERNAME")
        if not username:
            raise UsageError("a password was given but no user name", hint="add --username or set HPCCONV_USERNAME")
    if ca_cert is not None and not ca_cert.is_file():
        raise UsageError(f"CA bundle {ca_cert} does not exist")
    return SourceOptions(
        platform=Platform.parse(platform) if platform else None,
        insecure=insecure,
        ca_cert=str(ca_cert) if ca_cert else None,
        store_path=str(store) if store else None,
        username=username,
        password=password,
        reporter=reporter,
    )


def _emit_result(result: dict, human: list[str]) -> None:
    """JSON on stdout with --json; otherwise plain lines (no markup, no wrapping: commands in them
    must stay copyable and paths may hold brackets). Warnings the library logged on the running
    command's reporter go into the result and, for humans, to stderr."""
    warnings = [m for level, m in (G.reporter.messages if G.reporter else []) if level == "warning"]
    if warnings:
        result.setdefault("warnings", []).extend(w for w in warnings if w not in result["warnings"])
    if G.json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    elif not G.quiet:
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
        for line in human:
            typer.echo(line)


def _checks_table(checks) -> None:
    if G.quiet or G.json or not checks.items:
        return
    from rich.console import Console
    from rich.table import Table

    colours = {"pass": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
    t = Table(title="checks", show_lines=False)
    for col in ("stage", "check", "status", "detail"):
        t.add_column(col)
    for c in checks.items:
        t.add_row(c.stage, c.name, f"[{colours.get(c.status, 'white')}]{c.status}[/]", c.detail)
    Console(stderr=True).print(t)


# commands ----------------------------------------------------------------------------------------------
@app.command()
def pull(
    source: str = typer.Argument(..., help="Image to fetch into the store, e.g. docker://REGISTRY/REPO:TAG."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
):
    """Fetch an image's manifest, config and layers into the content-addressed store."""
    from .sources import open_source

    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img = open_source(source, opts)
    _emit_result(
        {"command": "pull", "source": source, "digest": img.digest, "platform": str(img.platform),
         "layers": [{"digest": l.digest, "size": l.descriptor.size, "mediaType": l.media_type} for l in img.layers]},
        [f"pulled {source} {img.digest} ({img.platform}, {len(img.layers)} layers)"])


@app.command()
def inspect(
    source: str = typer.Argument(..., help="Image to describe."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
    config_only: bool = typer.Option(False, "--config-only", help="Only manifest and config: do not read the layers."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON result on stdout."),
):
    """Show platforms, layers, configuration and what is inside (arch, ISA level, glibc, MPI, fabrics, GPU)."""
    G.json = G.json or json_out
    from .sources import open_source

    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img = open_source(source, opts)
        inside = None
        if not config_only:
            from .pipeline import scan

            inside = scan(img, rep).facts()
    cfg = img.config
    result = {
        "command": "inspect", "source": source, "digest": img.digest, "mediaType": img.manifest.media_type,
        "platform": str(img.platform),
        "platforms": [str(p) for p in img.index.platforms()] if img.index else [str(img.platform)],
        "layers": [{"digest": l.digest, "size": l.descriptor.size, "mediaType": l.media_type} for l in img.layers],
        "config": {"Env": cfg.env, "Entrypoint": cfg.entrypoint, "Cmd": cfg.cmd, "WorkingDir": cfg.workdir,
                   "Labels": cfg.labels, "User": str(cfg.config.get("User") or "")},
    }
    human = [f"{source} {img.digest}", f"platform: {img.platform}"]
    if img.index:
        human.append("platforms in index: " + ", ".join(result["platforms"]))
    human += [f"layer {i + 1}: {l.digest} {l.descriptor.size} B {l.media_type}" for i, l in enumerate(img.layers)]
    human += [f"entrypoint: {cfg.entrypoint}", f"cmd: {cfg.cmd}", f"workdir: {cfg.workdir or '/'}",
              "env: " + " ".join(cfg.env)]
    if inside is not None:
        from .render import inside_lines

        result["inside"] = inside
        human += inside_lines(inside)
    _emit_result(result, human)


@app.command()
def export(
    source: str = typer.Argument(..., help="Image to flatten."),
    output: Path = typer.Option(..., "-o", "--output", help="Tar file to write (`-` for stdout)."),
    raw: bool = typer.Option(False, "--raw", help="The flattened rootfs as is, with no profile rewrites."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Prepare the rootfs for this site profile (not with --raw)."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
):
    """Write the flattened root filesystem of an image as a tar archive."""
    from . import pipeline

    prof = _load_profile(profile) if profile and not raw else None
    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img, n, checks, changes = pipeline.export(source, opts, None if str(output) == "-" else output,
                                                  profile=prof, raw=raw, reporter=rep)
    _checks_table(checks)
    fail = next((c for c in checks.items if c.name == "platform" and c.status == "fail"), None)
    _emit_result({"command": "export", "source": source, "digest": img.digest, "output": str(output),
                  "entries": n, "checks": checks.to_json(), "changes": changes},
                 ([f"not exported: {fail.detail}"] if str(output) != "-" else []) if fail else
                 [f"wrote {output} ({n} entries)"] if str(output) != "-" else [])
    if checks.failed:
        raise typer.Exit(1)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Image to convert: docker://…, docker-daemon:…, docker-archive:…, oci:…"),
    target: Target = typer.Option(Target.charliecloud, "--target", "-t", help="Image format the site runs."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="charliecloud: dir, tar or squashfs (default squashfs); singularity: sif (default) or sandbox; shifter: squashfs."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file or directory."),
    compression: Compression = typer.Option(Compression.auto, "--compression", help="squashfs/tar compression: auto (the first the --profile site mounts, else gzip), gzip (widest compatibility) or zstd (fast)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Architecture profile of the target site."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report (schema: hpcconv/schemas/report.schema.json) to this file."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    test: list[str] = typer.Option([], "--test", help="Validate the output and run it (ch-run, apptainer...): a smoke run, then this shell command, which must exit 0; repeatable."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Validate and run the output, and write a JUnit XML report here."),
    no_test: bool = typer.Option(False, "--no-test", help="With --test/--junit: validate the output but do not run it."),
    strict: bool = typer.Option(False, "--strict", help="Warnings fail (exit 1)."),
):
    """Convert an image for an HPC container runtime (adapted to a site with --profile)."""
    from . import pipeline

    default_fmt, allowed = TARGET_FORMATS[target.value]
    fmt_name = fmt.value if fmt else default_fmt
    if fmt_name not in allowed:
        raise UsageError(f"--format {fmt_name} is not a {target.value} format", hint=f"use {' or '.join(allowed)}")
    from .dockerfile import looks_like_dockerfile

    if "://" not in source and looks_like_dockerfile(Path(source)):   # a Dockerfile: build, then convert
        from .workflow_cli import convert_dockerfile

        return convert_dockerfile(source, target.value, fmt_name, output, compression.value, profile, report, force,
                                  test, junit, strict, no_test)
    prof = _load_profile(profile) if profile else None
    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        out = pipeline.convert(source, opts, target.value, output, fmt_name, compression.value, prof, rep, force)
    img, checks, res = out.image, out.checks, out.emit
    if res is None:   # the image's platform cannot run at the site: nothing was read or written
        _checks_table(checks)
        fail = next(c for c in checks.items if c.status == "fail")
        _emit_result({"command": "convert", "source": source, "digest": img.digest, "platform": str(img.platform),
                      "profile": prof.name, "target": target.value, "checks": checks.to_json(), "changes": []},
                     [f"not converted: {fail.detail}"])
        raise typer.Exit(1)
    result = {"command": "convert", "source": source, "digest": img.digest, "platform": str(img.platform),
              "target": target.value, "format": fmt_name, "output": str(output), "compression": out.compression,
              "profile": prof.name if prof else None,
              "checks": checks.to_json(), "changes": out.changes, "run": res.run_hint, "site_run": out.site_run}
    if target is Target.shifter:
        result.update({"shifter_id": res.image_id, "files": [str(res.squashfs), str(res.meta)], "note": res.note})
    if report or junit or test or strict:   # the harness: emit validation, run stage, v1 report / JUnit
        from .workflow_cli import convert_harness, write_reports

        hrep = convert_harness(source, target.value, fmt_name, output, out, prof, test, bool(test or junit) and not no_test)
        checks = hrep.checks
        result["checks"] = checks.to_json()
        write_reports(hrep, "convert", report, junit, strict)
    _checks_table(checks)
    human = [f"wrote {output}"]
    if out.changes:
        human.append(f"{sum(c.get('count', 1) for c in out.changes)} changes for "
                     f"{target.value.capitalize() + (' at ' + prof.name if prof else '')} (see --json for the list)")
    if checks.failed:
        human.append("some checks failed: the image will not run as is" + (f" at {prof.name}" if prof else ""))
    human.append(f"run it with: {res.run_hint}")
    if out.site_run:
        human.append(f"at {prof.name}: {out.site_run}")
    _emit_result(result, human)
    if target is Target.shifter and not (G.quiet or G.json):
        typer.echo(res.note)  # plain, unwrapped: it holds commands to copy
    if checks.failed or (strict and checks.warned):
        raise typer.Exit(1)


@app.command()
def check(
    source: str = typer.Argument(..., help="Image to judge."),
    profile: str = typer.Option(..., "--profile", help="Site profile, or 'all' for a table of every site profile."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON result on stdout."),
):
    """Will this image run well at that site? A verdict per check, without converting (exit 1 on a fail)."""
    G.json = G.json or json_out
    from . import pipeline
    from .render import check_all_lines, check_lines

    rep = _reporter()
    if profile == "all":
        with rep.running():
            opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
            rows, img = pipeline.check_all(source, opts, rep)
        _emit_result({"command": "check", "source": source, "digest": img.digest, "profile": "all",
                      "profiles": rows}, check_all_lines(rows))
        if not any(r["verdict"] != "fail" for r in rows):
            raise typer.Exit(1)
        return
    prof = _load_profile(profile)
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img, pc = pipeline.open_for_profile(source, opts, prof)
        checks = pipeline.Checks()
        checks.items.append(pc)
        if pc.status != "fail":
            prep = pipeline.prepare(img, prof)
            sc = pipeline.scan(img, rep, extra_passes=[prep.prepare])
            checks.extend(sc.flatten_checks)
            checks.extend(sc.judge(prof))
    v = pipeline.verdict(checks)
    _emit_result({"command": "check", "source": source, "digest": img.digest, "platform": str(img.platform),
                  "profile": prof.name, "verdict": v, "checks": checks.to_json(),
                  "changes_on_convert": prep.changes if pc.status != "fail" else []},
                 check_lines(checks, prof.name, v))
    if checks.failed:
        raise typer.Exit(1)


def _load_profile(name: str):
    from .pipeline import load_target_profile

    return load_target_profile(name)


from .profiles_cli import app as _profiles_app  # noqa: E402  (sub-app: hpcconv profiles list|show)

app.add_typer(_profiles_app, name="profiles")

from .bundle_cli import app as _bundle_app, push as _push  # noqa: E402  (hpcconv bundle …, hpcconv push)

app.add_typer(_bundle_app, name="bundle")
app.command("push")(_push)

from .workflow_cli import register as _register_workflow  # noqa: E402  (build, lint, test, launcher, recipe)

_register_workflow(app)

from .store_cli import app as _store_app  # noqa: E402  (hpcconv store verify|gc)

app.add_typer(_store_app, name="store")


def _exit_now(code: int) -> None:
    import threading

    if threading.active_count() == 1:
        sys.exit(code)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def main() -> None:
    import gc
    import signal

    # A conversion makes a few container objects per tar member (~260 000 for a 44 000-file image)
    # and keeps most of them (the image's directory tree) to the end: with the default thresholds
    # the collector ran ~400 times and walked the growing tree in each older-generation pass,
    # ~5 % of the main thread. Nothing in the streaming path relies on cycles being collected
    # soon; the modules already imported are frozen so that no pass walks them again.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    # A conversion's worker threads (a layer's decoder, the hash thread, the compressor pool) run C
    # code without the GIL but need it for a moment between calls; while the main thread runs
    # Python, each such moment waited up to the switch interval (5 ms by default, against ~10 ms
    # of work per 8 MiB chunk then). 1 ms, interleaved runs on 2 cores: warm -3.8 %, cold -2.5 %.
    sys.setswitchinterval(0.001)

    from .interrupts import PENDING, Terminated, interrupt, on_signal

    with __import__("contextlib").suppress(ValueError):       # not in the main thread: leave it
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
            signal.signal(sig, on_signal)
    try:
        rc = app(standalone_mode=False)   # click returns (not raises) a typer.Exit's code in this mode
        if PENDING and rc == 130:         # typer turned our KeyboardInterrupt into Exit(130) after unwinding
            raise interrupt(PENDING[0])
        if isinstance(rc, int) and rc:
            _exit_now(rc)                 # downloads stopped by the failure may still sit in a read
    except HpcconvError as e:
        msg = f"hpcconv: error: {e.message}"
        if e.hint:
            msg += f" (hint: {e.hint})"
        print(msg, file=sys.stderr)
        _exit_now(e.exit_code)
    except KeyboardInterrupt as e:
        # the stack has unwound (temporary outputs removed, child tools killed); a download thread
        # still blocked in a read must not hold the exit up, so leave without joining threads
        signal.setitimer(signal.ITIMER_REAL, 0)
        term = isinstance(e, Terminated) or PENDING[:1] == [signal.SIGTERM]
        print("hpcconv: terminated" if term else "hpcconv: interrupted", file=sys.stderr)
        _exit_now(143 if term else 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("hpcconv: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors (typer vendors click, so match by shape)
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code or 2)
        if isinstance(e, BrokenPipeError):
            sys.exit(1)
        raise


if __name__ == "__main__":
    # `python -m hpcconv.cli` runs this file as __main__, a second copy of the module: hand over to
    # the imported `hpcconv.cli` so that sub-apps reading its globals (--json, --quiet) see one state.
    from hpcconv import cli as _cli

    _cli.main()
