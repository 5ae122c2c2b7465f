"""A Dockerfile parser for linting and translation (not for building: the engine builds).

What it understands, as BuildKit's frontend does:

* parser directives at the top (``# escape=`` (backslash or backtick), ``# syntax=``);
* comments, blank lines, line continuations with the escape character (comment lines inside a
  continued instruction are dropped, as Docker does);
* heredocs (``RUN <<EOF``, ``<<-EOF`` strips leading tabs, quoted delimiters ``<<'EOF'`` / ``<<"EOF"``,
  several per instruction), kept as :class:`Heredoc` bodies;
* JSON (exec) form vs shell form for RUN/CMD/ENTRYPOINT/SHELL (an invalid JSON array is shell form);
* flags (``--from=``, ``--chown=``, ``--platform=``, ``--mount=`` ...);
* stages (``FROM image AS name``), with ARG/ENV expansion (``$V``, ``${V}``, ``${V:-w}``, ``${V:+w}``,
  ``${V-w}``, ``${V+w}``) for the instructions where Docker expands them.

Every instruction keeps the line number it starts on, so lint findings and translation warnings can
name it.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

DIRECTIVE = re.compile(r"^#\s*([a-zA-Z][a-zA-Z0-9_-]*)\s*=\s*(.*?)\s*$")
HEREDOC = re.compile(r"<<(-?)\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
# instructions whose arguments Docker expands with the build's ARG/ENV values
EXPANDED = {"ADD", "COPY", "ENV", "EXPOSE", "FROM", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR", "ARG",
            "ONBUILD"}
EXEC_FORM = {"RUN", "CMD", "ENTRYPOINT", "SHELL", "HEALTHCHECK"}


@dataclass
class Heredoc:
    name: str
    body: str
    expand: bool          # an unquoted delimiter: the shell expands the body
    strip_tabs: bool


@dataclass
class Instruction:
    cmd: str                      # upper case: RUN, COPY, ...
    value: str                    # the arguments as written (continuations joined, flags included)
    line: int                     # 1-based line the instruction starts on
    end_line: int
    flags: dict[str, str] = field(default_factory=dict)
    args: str = ""                # value without the leading --flags
    json: list[str] | None = None  # exec form, when the arguments are a JSON array of strings
    heredocs: list[Heredoc] = field(default_factory=list)
    stage: int = 0                # index of the FROM stage this instruction belongs to
    original: str = ""            # the source text (with continuations)

    @property
    def shell(self) -> str:
        """The command as one shell string (exec form joined with shell quoting)."""
        return shlex.join(self.json) if self.json is not None else self.args

    def words(self) -> list[str]:
        if self.json is not None:
            return list(self.json)
        try:
            return shlex.split(self.args, posix=True)
        except ValueError:
            return self.args.split()


@dataclass
class Stage:
    index: int
    base: str                     # the FROM image as written (expanded with the global ARGs)
    name: str | None
    platform: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    path: str
    instructions: list[Instruction]
    stages: list[Stage]
    global_args: dict[str, str | None]
    escape: str = "\\"
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage_named(self, name: str) -> Stage | None:
        for s in self.stages:
            if s.name and s.name.lower() == name.lower():
                return s
        if name.isdigit() and int(name) < len(self.stages):
            return self.stages[int(name)]
        return None

    def where(self, ins: Instruction) -> str:
        return f"{Path(self.path).name}:{ins.line}"


# expansion --------------------------------------------------------------------------------------------
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(text: str, env: dict[str, str | None], escape: str = "\\") -> str:
    """Docker's word expansion for ``$V``/``${V}``/``${V:-w}``/``${V:+w}`` (unknown names become '')."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == escape and i + 1 < len(text) and text[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if c == "'":            # single quotes: no expansion (as the shell-lexer Docker uses)
            j = text.find("'", i + 1)
            j = len(text) if j < 0 else j + 1
            out.append(text[i:j])
            i = j
            continue
        if c == "$":
            m = _VAR.match(text, i)
            if m:
                name = m.group(1) or m.group(4)
                op, word = m.group(2), m.group(3) or ""
                val = env.get(name)
                if op in (":-", "-"):
                    if (val is None) or (op == ":-" and val == ""):
                        val = expand(word, env, escape)
                elif op in (":+", "+"):
                    val = expand(word, env, escape) if (val is not None and (op == "+" or val != "")) else ""
                out.append(val or "")
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_kv(args: str, cmd: str) -> list[tuple[str, str | None]]:
    """ENV/LABEL/ARG key=value pairs (quotes removed), or the legacy ``ENV KEY value`` form."""
    try:
        words = shlex.split(args, posix=True)
    except ValueError:
        words = args.split()
    if not words:
        return []
    if cmd == "ENV" and "=" not in words[0]:
        parts = args.strip().split(None, 1)
        return [(parts[0], parts[1] if len(parts) > 1 else "")]
    pairs: list[tuple[str, str | None]] = []
    for w in words:
        if "=" in w:
            k, v = w.split("=", 1)
            pairs.append((k, v))
        else:
            pairs.append((w, None))
    return pairs


# parsing ----------------------------------------------------------------------------------------------
def _split_flags(value: str) -> tuple[dict[str, str], str]:
    flags: dict[str, str] = {}
    rest = value.lstrip()
    while rest.startswith("--"):
        m = re.match(r"--([A-Za-z0-9-]+)(?:=(\"[^\"]*\"|\S*))?\s*", rest)
        if not m:
            break
        v = m.group(2) or ""
        flags[m.group(1)] = v.strip('"')
        rest = rest[m.end():]
    return flags, rest


def _json_form(args: str) -> list[str] | None:
    s = args.strip()
    if not s.startswith("["):
        return None
    try:
        v = json.loads(s)
    except ValueError:
        return None
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return v
    return None


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    lines = text.splitlines()
    escape = "\\"
    directives: dict[str, str] = {}
    i = 0
    # parser directives: only before any other line, comment or instruction
    while i < len(lines):
        m = DIRECTIVE.match(lines[i].strip())
        if not m or m.group(1).lower() in directives:
            break
        directives[m.group(1).lower()] = m.group(2)
        i += 1
    if directives.get("escape") in ("`", "\\"):
        escape = directives["escape"]
    instructions: list[Instruction] = []
    n = len(lines)
    while i < n:
        raw = lines[i]
        s = raw.strip()
        if not s or s.startswith("#"):
            i += 1
            continue
        start = i
        parts = []
        original = [raw]
        cur = raw
        while True:
            t = cur.rstrip()
            if t.endswith(escape):
                parts.append(t[:-1])
                i += 1
                # skip comment and empty lines inside a continuation
                while i < n and (lines[i].strip().startswith("#") or not lines[i].strip()):
                    original.append(lines[i])
                    i += 1
                if i >= n:
                    break
                cur = lines[i]
                original.append(cur)
                continue
            parts.append(cur)
            i += 1
            break
        joined = " ".join(p.strip() for p in parts)
        word, _, value = joined.partition(" ")
        cmd = word.upper()
        value = value.strip()
        heredocs: list[Heredoc] = []
        if cmd in ("RUN", "COPY", "ADD") and "<<" in value:
            for m in HEREDOC.finditer(value):
                strip_tabs, quote, name = m.group(1) == "-", m.group(2), m.group(3)
                body = []
                while i < n:
                    ln = lines[i]
                    original.append(ln)
                    i += 1
                    cmp = ln.lstrip("\t") if strip_tabs else ln
                    if cmp == name:
                        break
                    body.append(cmp)
                else:
                    raise UsageError(f"{path}:{start + 1}: heredoc <<{name} is not terminated")
                heredocs.append(Heredoc(name, "\n".join(body) + "\n", expand=not quote, strip_tabs=strip_tabs))
        flags, args = _split_flags(value) if cmd in ("RUN", "COPY", "ADD", "FROM", "HEALTHCHECK") else ({}, value)
        ins = Instruction(cmd, value, start + 1, i, flags, args, heredocs=heredocs, original="\n".join(original))
        if cmd in EXEC_FORM and not heredocs:
            h_args = args
            if cmd == "HEALTHCHECK":
                h_args = re.sub(r"^\s*CMD\s+", "", args, flags=re.I)
            ins.json = _json_form(h_args)
        instructions.append(ins)
    return _stages(instructions, path, escape, directives)


def _stages(instructions: list[Instruction], path: str, escape: str, directives: dict) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if not stages and ins.cmd == "ARG":
            for k, v in parse_kv(ins.args, "ARG"):
                global_args[k] = expand(v, global_args, escape) if v is not None else None
            continue
        if ins.cmd == "FROM":
            words = ins.args.split()
            base = expand(words[0], global_args, escape) if words else ""
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            plat = expand(ins.flags["platform"], global_args, escape) if "platform" in ins.flags else None
            stages.append(Stage(len(stages), base, name, plat, ins.line))
        if not stages:
            if ins.cmd in ("ARG",):
                continue
            raise UsageError(f"{path}:{ins.line}: {ins.cmd} before the first FROM",
                             hint="a Dockerfile starts with FROM (only ARG and parser directives may come first)")
        ins.stage = len(stages) - 1
        stages[-1].instructions.append(ins)
    if not stages:
        raise UsageError(f"{path}: no FROM instruction", hint="is this a Dockerfile?")
    return Dockerfile(path, instructions, stages, global_args, escape, directives)


def load(path: Path | str) -> Dockerfile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UsageError(f"cannot read {p}: {e.strerror}") from None
    return parse(text, str(p))


def stage_env(df: Dockerfile, stage: Stage, build_args: dict[str, str] | None = None,
              upto: Instruction | None = None) -> dict[str, str | None]:
    """ARG/ENV values in effect in `stage` (before `upto`, or at its end). Build args override defaults
    of declared ARGs, as ``docker build --build-arg`` does."""
    build_args = build_args or {}
    env: dict[str, str | None] = {}
    for ins in stage.instructions:
        if ins is upto:
            break
        if ins.cmd == "ARG":
            for k, v in parse_kv(ins.args, "ARG"):
                if k in build_args:
                    env[k] = build_args[k]
                elif v is not None:
                    env[k] = expand(v, env, df.escape)
                elif k in df.global_args:
                    env[k] = build_args.get(k, df.global_args[k])
                else:
                    env.setdefault(k, None)
        elif ins.cmd == "ENV":
            for k, v in parse_kv(ins.args, "ENV"):
                env[k] = expand(v or "", env, df.escape)
    return env


def looks_like_dockerfile(path: Path) -> bool:
    """A path given where an image SOURCE is expected that is a Dockerfile (or a dir holding one)."""
    if path.is_dir():
        return (path / "Dockerfile").is_file()
    if not path.is_file():
        return False
    name = path.name.lower()
    if name == "dockerfile" or name.startswith("dockerfile.") or name.endswith(".dockerfile") or name == "containerfile":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    for ln in head.splitlines():
        s = ln.strip()
        if not s or s.startswith("#"):
            continue
        return s.split()[0].upper() in ("FROM", "ARG")
    return False
