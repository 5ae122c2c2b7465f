"""`hpcconv store verify|gc`: look after the shared blob store (logic in store_maint.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Check and clean the blob store ($HPCCONV_STORE or --store).")

StoreOpt = typer.Option(None, "--store", help="Blob store directory (default $HPCCONV_STORE or ~/.cache/hpcconv/store).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON result on stdout.")


def _json_wanted(ctx: typer.Context, local: bool) -> bool:
    """--json after `store CMD`, or the global one (read from the root context: under
    `python -m hpcconv.cli` the cli module's globals live in __main__, not hpcconv.cli)."""
    return local or bool(ctx.find_root().params.get("json_out"))


def _open(store: Optional[Path]):
    from .store import Store, default_store_path

    path = store or default_store_path()
    if not (Path(path) / "blobs").is_dir():
        from .errors import UsageError

        raise UsageError(f"{path} is not an hpcconv store", hint="pass --store or set HPCCONV_STORE")
    return Store.open(path)


@app.command()
def verify(ctx: typer.Context, store: Optional[Path] = StoreOpt, json_out: bool = JsonOpt):
    """Re-hash every blob and check every reference's manifests, configs and layers (exit 4 on a problem)."""
    from .store_maint import verify as run

    st = _open(store)
    rep = run(st)
    if _json_wanted(ctx, json_out):
        typer.echo(json.dumps({"command": "store verify", "store": str(st.root), **rep.to_json()}, indent=2,
                              sort_keys=True))
    else:
        for p in rep.problems:
            typer.echo(f"problem: {p}", err=True)
        state = "clean" if not rep.problems else f"{len(rep.problems)} problem(s)"
        typer.echo(f"store {st.root}: {rep.blobs} blobs ({rep.bytes} bytes), {rep.refs} references, "
                   f"{rep.partials} partial downloads: {state}")
    if rep.problems:
        raise typer.Exit(4)


@app.command()
def gc(
    ctx: typer.Context,
    store: Optional[Path] = StoreOpt,
    grace: float = typer.Option(600.0, "--grace", help="Keep unreferenced blobs and temporaries younger than this many seconds."),
    partial_grace: float = typer.Option(86400.0, "--partial-grace", help="Keep unclaimed partial downloads (for a resume) younger than this many seconds."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only say what would be removed."),
    json_out: bool = JsonOpt,
):
    """Remove blobs no reference (and no running hpcconv process) needs; reclaim dead processes' leftovers."""
    from .store_maint import gc as run

    st = _open(store)
    rep = run(st, grace=grace, partial_grace=partial_grace, dry_run=dry_run)
    if _json_wanted(ctx, json_out):
        typer.echo(json.dumps({"command": "store gc", "store": str(st.root), **rep.to_json()}, indent=2,
                              sort_keys=True))
    else:
        verb = "would remove" if dry_run else "removed"
        typer.echo(f"{verb} {len(rep.removed)} blobs ({rep.freed} bytes), {rep.partials_removed} partial downloads, "
                   f"{rep.temps_removed} temporaries, {rep.stale_leases} stale leases; kept {rep.kept_leased} "
                   f"blobs in use by {rep.live_leases} running process(es) and {rep.kept_young} younger than "
                   f"{grace:.0f} s")
