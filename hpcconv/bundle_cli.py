"""`hpcconv bundle create|verify|import|diff|repair|keygen` and `hpcconv push` (kept out of cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Offline bundles for air-gapped centres: create, verify, import, diff, repair, keygen.")

KeyOpt = typer.Option(None, "--key", help="Trusted Ed25519 public key (PEM); repeat to trust several (default: "
                                          "$HPCCONV_BUNDLE_KEY). With a key, an unsigned or differently signed "
                                          "bundle is refused.")


def _cli(ctx: typer.Context):
    """cli.py's helpers, with its globals synced from the root context (under `python -m hpcconv.cli`
    the module running is __main__, a different copy from the `hpcconv.cli` imported here)."""
    from . import cli

    p = ctx.find_root().params
    cli.G.quiet, cli.G.json, cli.G.verbose = bool(p.get("quiet")), bool(p.get("json_out")), p.get("verbose") or 0
    return cli


def _platforms(platform: list[str] | None, profile: list[str] | None):
    from .image import Platform

    out = []
    for p in platform or []:
        out += [Platform.parse(x) for x in p.split(",") if x.strip()]
    for name in profile or []:
        from .profiles import load_profile

        out.append(load_profile(name).platform)
    return out or None


def _make_opts(source_opts):
    import dataclasses

    def make(platform):
        return dataclasses.replace(source_opts, platform=platform)

    return make


def _keys(key):
    """--key files, else $HPCCONV_BUNDLE_KEY (os.pathsep-separated): the keys a bundle must be signed with."""
    import os

    from .bundle.fmt import load_public_key

    paths = list(key or []) or [Path(k) for k in os.environ.get("HPCCONV_BUNDLE_KEY", "").split(os.pathsep) if k]
    return [load_public_key(k) for k in paths]


def _warn(C, rep, res: dict) -> None:
    """Warnings the library logged (e.g. a registry unreachable and a bundle-imported tag used):
    in the JSON result, and on stderr for humans."""
    warnings = [m for level, m in rep.messages if level == "warning"]
    if warnings:
        res.setdefault("warnings", []).extend(w for w in warnings if w not in res.get("warnings", []))
        if not (C.G.quiet or C.G.json):
            for w in warnings:
                typer.echo(f"warning: {w}", err=True)


def _fail_json(C, e, command: str) -> None:
    if C.G.json:
        C._emit_result({"command": command, "ok": False,
                        "problems": [{"item": i, "problem": m} for i, m in getattr(e, "problems", [])]
                        or [{"item": "", "problem": e.message}]}, [])


@app.command()
def create(
    ctx: typer.Context,
    sources: List[str] = typer.Argument(..., help="Images to carry: docker://…, oci:…, docker-archive:…, docker-daemon:…, bundle:…"),
    output: Path = typer.Option(..., "-o", "--output", help="NAME.hpcbundle to write (with --split: NAME.hpcbundle.part000…)."),
    platform: Optional[List[str]] = typer.Option(None, "--platform", help="Platform(s) to carry from multi-arch images (repeat or comma-separate); default: all."),
    profile: Optional[List[str]] = typer.Option(None, "--profile", help="Carry the platform of this site profile (repeatable)."),
    include_outputs: Optional[Path] = typer.Option(None, "--include-outputs", help="Also carry the converted images in this directory."),
    with_tool: bool = typer.Option(False, "--with-tool", help="Also carry a wheelhouse of hpcconv and its dependencies plus an install script."),
    tool_python: Optional[str] = typer.Option(None, "--tool-python", help="Target Python version for --with-tool (default: this one, e.g. 3.11)."),
    tool_platform: Optional[List[str]] = typer.Option(None, "--tool-platform", help="Target wheel platform tag(s) for --with-tool (default: this machine's, or the --profile's arch)."),
    split: Optional[str] = typer.Option(None, "--split", help="Write numbered parts of at most SIZE (e.g. 700M, 4.7GB; `fat32` = 4 GiB - 1) plus part000, the part list."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Ed25519 private key (from `hpcconv bundle keygen`) to sign with."),
    parity: bool = typer.Option(False, "--parity", help="With --split: also write NAME.hpcbundle.parity, from which any one lost or damaged part is rebuilt (`bundle repair`)."),
    since: Optional[List[Path]] = typer.Option(None, "--since", help="Incremental: leave out the blobs this earlier bundle (or its part000) carried. Repeatable."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle of that name (and all its parts)."),
    tmpdir: Optional[Path] = typer.Option(None, "--tmpdir", help="Scratch space for compressed members (default: next to the output)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP / unverified TLS for the registries named in SOURCES."),
    ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="PEM bundle of extra CAs for registry TLS."),
    store: Optional[Path] = typer.Option(None, "--store", help="Blob store directory."),
    username: Optional[str] = typer.Option(None, "--username", help="Registry user; password from $HPCCONV_PASSWORD or --password-stdin."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the registry password from standard input."),
):
    """Write an offline bundle of images (one file or numbered parts) with a manifest of sha256s."""
    from .bundle.create import CreateSpec, create as do_create, parse_size

    C = _cli(ctx)
    plats = _platforms(platform, profile)
    tool = None
    if with_tool:
        from .bundle.tool import ToolSpec

        tool = ToolSpec.for_target(tool_python, tool_platform, plats)
    rep = C._reporter()
    with rep.running():
        opts = C._source_options(sources[0], None, insecure, ca_cert, store, username, password_stdin, rep)
        spec = CreateSpec(sources=list(sources), out=output, platforms=plats, since=list(since or []),
                          outputs=include_outputs, tool=tool, split=parse_size(split) if split else None,
                          key=sign, force=force, tmpdir=tmpdir, parity=parity)
        res = do_create(spec, _make_opts(opts), rep)
    human = [f"wrote {f}" for f in res["files"]]
    human.append(f"bundle id {res['id']}, manifest sha256 {res['manifest_sha256']}"
                 + (f", signed by {res['signed_by']}" if res["signed_by"] else ", unsigned"))
    for i in res["images"]:
        human.append(f"  {i['ref']} {i['digest']} ({', '.join(i['platforms'])})")
    human.append(f"{res['blobs']} blobs carried, {res['requires']} left to the base bundle(s), {res['bytes']} bytes")
    _warn(C, rep, res)
    C._emit_result(res, human)


@app.command()
def verify(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="NAME.hpcbundle, or any of its parts."),
    key: Optional[List[Path]] = KeyOpt,
):
    """Check every part on its own, the signature, every member's sha256 and every blob's digest (exit 4 on any problem)."""
    from .bundle.reader import verify as do_verify
    from .errors import CorruptInput

    C = _cli(ctx)
    keys = _keys(key)
    rep = C._reporter()
    try:
        with rep.running():
            res = do_verify(path, keys, rep)
    except CorruptInput as e:
        _fail_json(C, e, "bundle verify")
        raise
    res.update({"command": "bundle verify", "ok": True})
    _warn(C, rep, res)
    C._emit_result(res, _describe(res, "OK", bool(keys)))


def _describe(res: dict, verdict: str, trusted: bool) -> list[str]:
    sig = "unsigned"
    if res.get("signed_by"):
        sig = f"signed by {res['signed_by']}" + ("" if trusted else " (not checked against a trusted key: pass --key)")
    out = [f"{res['bundle']}: {verdict} (id {res['id']}, created {res['created']}, {sig})"]
    if res.get("split"):
        out.append(f"  {res['parts']} parts, each matching its sha256 in part000")
    for i in res["images"]:
        out.append(f"  {i['ref']} {i['digest']} ({', '.join(i['platforms'])})")
    out.append(f"  {res['blobs']} blobs" + (f", incremental: needs {res['requires']} blobs from "
                                            + ", ".join(b.get('name') or b.get('id') for b in res['base'])
                                            if res['requires'] else ""))
    if res.get("outputs"):
        out.append("  outputs: " + ", ".join(res["outputs"]))
    if res.get("tool_target"):
        t = res["tool_target"]
        out.append(f"  tool/: hpcconv wheelhouse for Python {t['python']} on {t['platforms'][0]} "
                   "(install with: sh tool/install.sh VENV)")
    return out


@app.command("import")
def import_(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="NAME.hpcbundle, or any of its parts."),
    key: Optional[List[Path]] = KeyOpt,
    store: Optional[Path] = typer.Option(None, "--store", help="Blob store directory."),
    outputs: Optional[Path] = typer.Option(None, "--outputs", help="Also write the bundle's converted images into this directory."),
):
    """Verify a bundle, then add its images to the store (idempotent; safe to re-run after an interruption)."""
    from .bundle.importer import import_bundle
    from .errors import CorruptInput

    C = _cli(ctx)
    keys = _keys(key)
    rep = C._reporter()
    try:
        with rep.running():
            res = import_bundle(path, str(store) if store else None, keys, rep, outputs)
    except CorruptInput as e:
        _fail_json(C, e, "bundle import")
        raise
    human = _describe(res, "imported", bool(keys))
    human.append(f"  into {res['store']} ({res['blobs_written']} new blobs)")
    human += [f"  wrote {p}" for p in res["outputs_extracted"]]
    if res["images"]:
        human.append(f"convert offline with: hpcconv convert {res['images'][0]['ref']} ... "
                     f"(or bundle:{res['bundle']})")
    _warn(C, rep, res)
    C._emit_result(res, human)


@app.command()
def diff(
    ctx: typer.Context,
    old: Path = typer.Argument(..., help="The bundle the centre already has (or its part000)."),
    new: Path = typer.Argument(..., help="The newer full bundle."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write an incremental bundle: NEW without OLD's blobs."),
    split: Optional[str] = typer.Option(None, "--split", help="With -o: parts of at most SIZE."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="With -o: Ed25519 private key to sign with."),
    force: bool = typer.Option(False, "--force", help="With -o: replace an existing bundle."),
):
    """What NEW carries that OLD does not (images, blobs, bytes); with -o, the incremental bundle itself."""
    from .bundle.diff import diff as do_diff

    C = _cli(ctx)
    rep = C._reporter()
    with rep.running():
        res = do_diff(old, new, output, split, sign, force, rep)
    human = [f"{res['new']} against {res['old']}:"]
    for i in res["images"]:
        human.append(f"  {i['status']:9} {i['ref']} {i.get('digest', '')}")
    human.append(f"  {len(res['added_blobs'])} blobs ({res['added_bytes']} bytes) new, "
                 f"{res['shared_blobs']} shared, {len(res['removed_blobs'])} no longer used")
    if output:
        human += [f"wrote {f}" for f in res["files"]]
    _warn(C, rep, res)
    C._emit_result(res, human)


@app.command()
def repair(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="NAME.hpcbundle (split, made with --parity), or any of its parts."),
    key: Optional[List[Path]] = KeyOpt,
):
    """Rebuild the one missing or damaged part of a split bundle from its parity part (no re-sending)."""
    from .bundle.parity import repair as do_repair
    from .errors import CorruptInput

    C = _cli(ctx)
    rep = C._reporter()
    try:
        with rep.running():
            res = do_repair(path, _keys(key), rep)
    except CorruptInput as e:
        _fail_json(C, e, "bundle repair")
        raise
    C._emit_result(res, [f"rebuilt {p} (matches its sha256 in part000)" for p in res["rebuilt"]]
                   or [f"{res['bundle']}: every part is intact, nothing to rebuild"])


@app.command()
def keygen(
    ctx: typer.Context,
    name: Path = typer.Argument(..., help="Writes NAME.key (private, mode 0600) and NAME.pub."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
):
    """Make an Ed25519 key pair for signing bundles (PEM; the .pub goes to the centre)."""
    from .bundle.fmt import generate_keys

    C = _cli(ctx)
    priv, pub = Path(f"{name}.key"), Path(f"{name}.pub")
    kid = generate_keys(priv, pub, force)
    C._emit_result({"command": "bundle keygen", "private_key": str(priv), "public_key": str(pub), "key_id": kid},
                   [f"wrote {priv} (keep it secret) and {pub} (give it to the centre); key id {kid}"])


def push(
    ctx: typer.Context,
    source: str = typer.Argument(..., help="Image to publish: a reference in the store, bundle:PATH, oci:DIR…"),
    dest: str = typer.Argument(..., help="docker://SITE-REGISTRY/REPO:TAG"),
    platform: Optional[List[str]] = typer.Option(None, "--platform", help="Push only these platforms of a multi-arch image."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP / unverified TLS for the destination (and source) registry."),
    ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="PEM bundle of extra CAs for registry TLS."),
    store: Optional[Path] = typer.Option(None, "--store", help="Blob store directory."),
    username: Optional[str] = typer.Option(None, "--username", help="Destination registry user; password from $HPCCONV_PASSWORD or --password-stdin."),
    password_stdin: bool = typer.Option(False, "--password-stdin", help="Read the registry password from standard input."),
):
    """Publish an image (all its carried platforms) to a registry, e.g. a centre's local one after import."""
    from .bundle.collect import collect
    from .registry.push import push_plan

    C = _cli(ctx)
    rep = C._reporter()
    with rep.running():
        opts = C._source_options(source, None, insecure, ca_cert, store, username, password_stdin, rep)
        plan = collect(source, _platforms(platform, None), _make_opts(opts))
        res = push_plan(plan, dest, opts, rep)
    own = list(res["warnings"])
    _warn(C, rep, res)
    C._emit_result(res, [f"pushed {source} to {res['dest']} {res['digest']} "
                         f"({', '.join(res['platforms'])}; {res['uploaded']} blobs uploaded, "
                         f"{res['existing']} already there)"] + [f"warning: {w}" for w in own])
