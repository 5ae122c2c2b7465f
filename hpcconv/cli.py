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
):
    G.quiet, G.json, G.verbose = quiet, json_out, verbose


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
    gzip = "gzip"
    zstd = "zstd"


# shared options ----------------------------------------------------------------------------------------
PlatformOpt = typer.Option(None, "--platform", help="OS/ARCH[/VARIANT] to pick from a multi-arch image, e.g. linux/arm64.")
InsecureOpt = typer.Option(False, "--insecure", help="Allow plain HTTP (and unverified TLS) for the registry named in SOURCE, and only for it.")
CaCertOpt = typer.Option(None, "--ca-cert", help="PEM bundle of extra CAs for registry TLS (also: SSL_CERT_FILE).")
StoreOpt = typer.Option(None, "--store", help="Blob store directory (default $HPCCONV_STORE or ~/.cache/hpcconv/store).")
UserOpt = typer.Option(None, "--username", help="Registry user; the password comes from $HPCCONV_PASSWORD or --password-stdin.")
PassStdinOpt = typer.Option(False, "--password-stdin", help="Read the registry password from standard input.")


def _reporter():
    from .progress import Reporter

    return Reporter(enabled=not (G.quiet or G.json))


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
    must stay copyable and paths may hold brackets)."""
    if G.json:
        typer.echo(json.dumps(result, indent=2, sort_keys=True))
    elif not G.quiet:
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
):
    """Show platforms, layers and configuration of an image."""
    from .sources import open_source

    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img = open_source(source, opts)
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
    _emit_result(result, human)


@app.command()
def export(
    source: str = typer.Argument(..., help="Image to flatten."),
    output: Path = typer.Option(..., "-o", "--output", help="Tar file to write (`-` for stdout)."),
    raw: bool = typer.Option(False, "--raw", help="The flattened rootfs as is, with no profile rewrites."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
):
    """Write the flattened root filesystem of an image as a tar archive."""
    from .emit.sinks import write_tar
    from .flatten import Flattener
    from .sources import open_source

    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img = open_source(source, opts)
        flat = Flattener(img, reporter=rep)
        n = write_tar(flat.entries(), None if str(output) == "-" else output, compression=None, reporter=rep)
    _emit_result({"command": "export", "source": source, "digest": img.digest, "output": str(output),
                  "entries": n, "checks": flat.checks.to_json()},
                 [f"wrote {output} ({n} entries)"] if str(output) != "-" else [])


@app.command()
def convert(
    source: str = typer.Argument(..., help="Image to convert: docker://…, docker-daemon:…, docker-archive:…, oci:…"),
    target: Target = typer.Option(Target.charliecloud, "--target", "-t", help="Image format the site runs."),
    fmt: Optional[Format] = typer.Option(None, "--format", help="charliecloud: dir, tar or squashfs (default squashfs); singularity: sif (default) or sandbox; shifter: squashfs."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file or directory."),
    compression: Compression = typer.Option(Compression.gzip, "--compression", help="gzip (widest compatibility) or zstd (fast)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Architecture profile of the target site."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the checks as JSON to this file."),
    platform: Optional[str] = PlatformOpt,
    insecure: bool = InsecureOpt,
    ca_cert: Optional[Path] = CaCertOpt,
    store: Optional[Path] = StoreOpt,
    username: Optional[str] = UserOpt,
    password_stdin: bool = PassStdinOpt,
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
):
    """Convert an image for an HPC container runtime."""
    from .flatten import Flattener
    from .sources import open_source

    default_fmt, allowed = TARGET_FORMATS[target.value]
    fmt_name = fmt.value if fmt else default_fmt
    if fmt_name not in allowed:
        raise UsageError(f"--format {fmt_name} is not a {target.value} format", hint=f"use {' or '.join(allowed)}")
    if profile:
        raise UsageError("architecture profiles are not implemented yet")
    rep = _reporter()
    with rep.running():
        opts = _source_options(source, platform, insecure, ca_cert, store, username, password_stdin, rep)
        img = open_source(source, opts)
        flat = Flattener(img, reporter=rep)
        if target is Target.charliecloud:
            from .emit import charliecloud as emitter
        elif target is Target.singularity:
            from .emit import singularity as emitter
        else:
            from .emit import shifter as emitter

        res = emitter.emit(flat.entries(), img, output, fmt=fmt_name, compression=compression.value,
                           reporter=rep, force=force)
    checks = flat.checks
    checks.extend(res.checks)
    result = {"command": "convert", "source": source, "digest": img.digest, "platform": str(img.platform),
              "target": target.value, "format": fmt_name, "output": str(output),
              "checks": checks.to_json(), "changes": res.changes, "run": res.run_hint}
    if target is Target.shifter:
        result.update({"shifter_id": res.image_id, "files": [str(res.squashfs), str(res.meta)], "note": res.note})
    if report:
        report.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    _checks_table(checks)
    human = [f"wrote {output}"]
    if res.changes:
        human.append(f"{sum(c.get('count', 1) for c in res.changes)} fix-ups for {target.value.capitalize()} "
                     "(see --json for the list)")
    human.append(f"run it with: {res.run_hint}")
    _emit_result(result, human)
    if target is Target.shifter and not (G.quiet or G.json):
        typer.echo(res.note)  # plain, unwrapped: it holds commands to copy
    if checks.failed:
        raise typer.Exit(1)


from .profiles_cli import app as _profiles_app  # noqa: E402  (sub-app: hpcconv profiles list|show)

app.add_typer(_profiles_app, name="profiles")


def main() -> None:
    try:
        app(standalone_mode=False)
    except HpcconvError as e:
        msg = f"hpcconv: error: {e.message}"
        if e.hint:
            msg += f" (hint: {e.hint})"
        print(msg, file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("hpcconv: interrupted", file=sys.stderr)
        sys.exit(130)
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
    main()
