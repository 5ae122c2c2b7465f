"""`hpcconv profiles list|show`: the profile sub-commands (kept out of cli.py; imports stay light)."""

from __future__ import annotations

import json

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Architecture/site profiles: list them, show one resolved.")

COLUMNS = ("name", "arch", "level", "fabric", "gpu", "mpi", "confidence")


def _want_json(ctx: typer.Context, flag: bool) -> bool:
    """--json on the sub-command, or the global `hpcconv --json`."""
    return flag or bool(ctx.find_root().params.get("json_out"))


@app.command("list")
def list_(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="A JSON array of profile summaries on stdout."),
    all_: bool = typer.Option(False, "--all", help="Include fragments (profiles meant only for `extends`)."),
):
    """List site and generic profiles: name, arch, ISA level or target, fabric, GPU, MPI, confidence."""
    from .profiles import list_profiles

    rows = [p.summary() | {"path": str(p.path)} for p in list_profiles(include_fragments=all_)]
    if _want_json(ctx, json_out):
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False, box=None, pad_edge=False)
    cols = COLUMNS + (("kind",) if all_ else ())
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    Console(highlight=False, width=200).print(t)


@app.command()
def show(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Profile name (file stem) or path to a .toml file."),
    json_out: bool = typer.Option(False, "--json", help="The resolved profile as JSON."),
):
    """Print a profile with its `extends` resolved (TOML, or JSON with --json)."""
    from .profiles import load_profile, to_toml

    p = load_profile(name)
    if _want_json(ctx, json_out):
        typer.echo(json.dumps(p.to_json(), indent=2, sort_keys=True))
        return
    head = [f"# profile {p.name} ({p.kind}) from {p.path}", "# resolved from: " + " -> ".join(p.chain)]
    if p.unknowns:
        head.append("# unknown at this site: " + ", ".join(p.unknowns))
    typer.echo("\n".join(head) + "\n" + to_toml(p.data))
