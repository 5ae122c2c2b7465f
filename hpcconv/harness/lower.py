"""Heredocs for the classic builder.

The Docker SDK's ``api.build`` drives the engine's classic builder, which does not know Dockerfile
heredocs (a BuildKit feature): ``RUN <<EOF`` fails with ``unknown instruction``. Before building,
each heredoc instruction is lowered to one classic instruction with the same effect:

* ``RUN [flags] <<EOF`` (the body is the script) and ``RUN cmd <<EOF ... `` (the body is cmd's input):
  the instruction's text exactly as BuildKit hands it to the shell (the command line, the bodies,
  the delimiters; ``<<-`` and quoted delimiters keep their meaning because the shell reads them) is
  written by ``printf`` to a temporary script that the stage's SHELL runs and removes. A body that
  starts with ``#!`` runs with its own interpreter, as BuildKit does.
* ``COPY <<EOF /path`` (file content from the Dockerfile): written with ``printf`` by a RUN
  (``--chmod``/``--chown`` applied after), variables in an unquoted body expanded with the stage's
  ARG/ENV values as BuildKit does. This needs a shell in the image (COPY would not).

The instruction count stays the same, so the builder's ``Step N/M`` still names the original line.
"""

from __future__ import annotations

import shlex

from ..dockerfile import Dockerfile, Instruction, expand, stage_env

TMP = "/tmp/.hpcconv-heredoc"


def _printf(text: str) -> str:
    """A shell word for printf's format that prints `text` exactly."""
    fmt = text.replace("\\", "\\\\").replace("%", "%%").replace("\n", "\\n")
    return "'" + fmt.replace("'", "'\\''") + "'"


def _shell(df: Dockerfile, ins: Instruction) -> list[str]:
    shell = ["/bin/sh", "-c"]
    for i in df.stages[ins.stage].instructions:
        if i is ins:
            break
        if i.cmd == "SHELL" and i.json:
            shell = i.json
    return shell


def _flags(ins: Instruction, drop: tuple[str, ...] = ()) -> str:
    return "".join(f"--{k}={v} " if v else f"--{k} " for k, v in ins.flags.items() if k not in drop)


def _run(df: Dockerfile, ins: Instruction, n: int) -> str:
    head = ins.args.strip()
    sh = _shell(df, ins)[:-1] if _shell(df, ins)[-1] == "-c" else _shell(df, ins)
    tmp = f"{TMP}-{n}"
    bare = head.startswith("<<") and len(ins.heredocs) == 1 and len(head.split()) == 1
    if bare:
        script = ins.heredocs[0].body
        if script.startswith("#!"):
            run = f"chmod 0755 {tmp} && {tmp}"
        else:
            run = f"{shlex.join(sh)} {tmp}"
    else:
        parts = [head]
        for h in ins.heredocs:   # (<<- bodies arrive with their tabs stripped: the shell finds none left)
            parts.append(h.body.rstrip("\n"))
            parts.append(h.name)
        script = "\n".join(parts) + "\n"
        run = f"{shlex.join(sh)} {tmp}"
    return f"RUN {_flags(ins)}printf {_printf(script)} > {tmp} && {run} && rm -f {tmp}"


def _copy(df: Dockerfile, ins: Instruction) -> str:
    words = ins.words()
    env = stage_env(df, df.stages[ins.stage], upto=ins)
    dst = expand(words[-1], env, df.escape) if words else "/"
    cmds = []
    for h in ins.heredocs:
        target = dst if (len(ins.heredocs) == 1 and not dst.endswith("/")) else dst.rstrip("/") + "/" + h.name
        body = expand(h.body, env, df.escape) if h.expand else h.body
        parent = target.rsplit("/", 1)[0] or "/"
        cmds.append(f"mkdir -p {shlex.quote(parent)} && printf {_printf(body)} > {shlex.quote(target)}")
        if "chmod" in ins.flags:
            cmds.append(f"chmod {shlex.quote(ins.flags['chmod'])} {shlex.quote(target)}")
        if "chown" in ins.flags:
            cmds.append(f"chown {shlex.quote(ins.flags['chown'])} {shlex.quote(target)}")
    return "RUN " + " && ".join(cmds)


def lower(df: Dockerfile, text: str) -> tuple[str, list[str]]:
    """The Dockerfile text with heredoc instructions lowered; notes say which lines changed."""
    lines = text.splitlines()
    out: list[str] = []
    notes = []
    pos = 0
    n = 0
    for ins in df.instructions:
        if not ins.heredocs or ins.cmd not in ("RUN", "COPY", "ADD"):
            continue
        out += lines[pos:ins.line - 1]
        n += 1
        out.append(_run(df, ins, n) if ins.cmd == "RUN" else _copy(df, ins))
        notes.append(f"{df.where(ins)}: {ins.cmd} heredoc lowered for the classic builder")
        pos = ins.end_line
    out += lines[pos:]
    return "\n".join(out) + "\n", notes
