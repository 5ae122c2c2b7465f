"""Dockerfile -> Apptainer definition file (``hpcconv recipe translate --to singularity-def``).

For centres that rebuild from recipes (``apptainer build app.sif app.def``, run from the build
context so relative ``%files`` sources resolve). Mapping:

* each FROM stage -> a ``Bootstrap: docker`` / ``From:`` header (``Stage: NAME`` for multi-stage files;
  ``COPY --from=STAGE`` -> ``%files from STAGE``; an image name in ``--from`` cannot be translated);
* COPY/ADD of context files -> ``%files`` (``ADD`` of a URL or a local tar archive -> a ``%post`` step
  or a warning: Apptainer neither downloads nor unpacks in ``%files``); ``--chown``/``--chmod`` -> a
  ``chown``/``chmod`` in ``%post``. Apptainer copies every ``%files`` entry *before* ``%post`` runs: when
  a COPY follows a RUN that it depends on, the order changes (warned);
* RUN -> ``%post`` lines, in order, with WORKDIR as ``mkdir -p`` + ``cd``, ENV as ``export`` (so later
  RUNs see it), ARG as a shell variable with its default (or the ``--build-arg`` value), heredocs kept,
  exec form quoted, ``SHELL`` -> ``%post -c SHELL`` when it is the only one;
* ENV -> ``%environment`` (exported); LABEL -> ``%labels``; ENTRYPOINT/CMD -> ``%runscript``
  (``apptainer run IMG ARGS`` = ENTRYPOINT + ARGS, or ENTRYPOINT + CMD without ARGS, as Docker), the
  final WORKDIR applied there;
* EXPOSE, VOLUME, HEALTHCHECK, USER, STOPSIGNAL, ONBUILD, RUN --mount: no equivalent: a comment in the
  file and a warning.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from .dockerfile import Dockerfile, Instruction, Stage, expand, parse_kv, stage_env

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@dataclass
class Translation:
    text: str
    warnings: list[str] = field(default_factory=list)


def _q(s: str) -> str:
    return shlex.quote(s)


def _dq(s: str) -> str:
    """A double-quoted shell word that keeps $VAR references (Docker ENV values may use them)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'


class _Stage:
    def __init__(self, df: Dockerfile, st: Stage, build_args: dict[str, str], warn):
        self.df, self.st, self.build_args, self.warn = df, st, build_args, warn
        self.files: list[str] = []
        self.files_from: dict[str, list[str]] = {}
        self.post: list[str] = []
        self.environment: list[str] = []
        self.labels: list[tuple[str, str]] = []
        self.entrypoint: list[str] | None = None
        self.cmd: list[str] | None = None
        self.cmd_shell = False
        self.workdir = "/"
        self.shell: list[str] | None = None
        self.ran = False

    def _where(self, ins: Instruction) -> str:
        return self.df.where(ins)

    def translate(self) -> None:
        for ins in self.st.instructions:
            getattr(self, "_" + ins.cmd.lower(), self._other)(ins)

    # instructions --------------------------------------------------------------------------------
    def _from(self, ins):
        pass

    def _other(self, ins):
        self.warn(f"{self._where(ins)}: {ins.cmd} has no Apptainer equivalent: left out")
        self.post.append(f"# {self._where(ins)}: {ins.cmd} {ins.value} (not translated)")

    def _expose(self, ins):
        self._other(ins)

    def _volume(self, ins):
        self.warn(f"{self._where(ins)}: VOLUME has no Apptainer equivalent: bind the path at run time (--bind)")
        for w in ins.json if ins.json is not None else ins.args.split():
            self.post.append(f"mkdir -p {_q(w)}   # VOLUME: bind a host directory here at run time")

    def _healthcheck(self, ins):
        self._other(ins)

    def _stopsignal(self, ins):
        self._other(ins)

    def _onbuild(self, ins):
        self._other(ins)

    def _maintainer(self, ins):
        self.labels.append(("maintainer", ins.args))

    def _user(self, ins):
        self.warn(f"{self._where(ins)}: USER {ins.args} is ignored: Apptainer runs as the calling user")
        self.post.append(f"# {self._where(ins)}: USER {ins.args} (Apptainer runs as the calling user)")

    def _shell(self, ins):
        if ins.json:
            self.shell = ins.json
            if self.ran:
                self.warn(f"{self._where(ins)}: SHELL after a RUN: %post uses one shell for every step")

    def _arg(self, ins):
        for k, v in parse_kv(ins.args, "ARG"):
            if k in self.build_args:
                self.post.append(f"{k}={_q(self.build_args[k])}")
            elif v is not None:
                self.post.append(f'{k}="${{{k}:-{v}}}"')
            elif k in self.df.global_args and self.df.global_args[k] is not None:
                self.post.append(f"{k}={_q(self.df.global_args[k] or '')}")

    def _env(self, ins):
        for k, v in parse_kv(ins.args, "ENV"):
            v = v or ""
            self.post.append(f"export {k}={_dq(v)}")
            self.environment.append(f"export {k}={_dq(v)}")

    def _label(self, ins):
        for k, v in parse_kv(ins.args, "LABEL"):
            self.labels.append((k, v or ""))

    def _workdir(self, ins):
        env = stage_env(self.df, self.st, self.build_args, ins)
        d = expand(ins.args.strip(), env, self.df.escape)
        if not d.startswith("/"):
            d = self.workdir.rstrip("/") + "/" + d
        self.workdir = d
        self.post.append(f"mkdir -p {_q(d)} && cd {_q(d)}")

    def _run(self, ins):
        self.ran = True
        if any(k in ins.flags for k in ("mount", "network", "security")):
            self.warn(f"{self._where(ins)}: RUN --{next(k for k in ins.flags)} has no Apptainer equivalent: "
                      "the step runs without it")
        self.post.append(f"# {self._where(ins)}")
        if ins.heredocs:
            # `RUN <<EOF` runs the body as a script; `RUN cmd <<EOF` feeds it to cmd
            head = ins.args.strip()
            if head.startswith("<<") and len(ins.heredocs) == 1 and head.split()[0].lstrip("<-'\"").strip("'\"") == ins.heredocs[0].name:
                self.post.append(ins.heredocs[0].body.rstrip("\n"))
            else:
                self.post.append(head)
                for h in ins.heredocs:
                    self.post.append(h.body.rstrip("\n"))
                    self.post.append(h.name)
            return
        if ins.json is not None:
            self.post.append(shlex.join(ins.json))
        else:
            self.post.append(ins.args)

    def _copy(self, ins, add: bool = False):
        env = stage_env(self.df, self.st, self.build_args, ins)
        if ins.heredocs:
            words = ins.words()
            dst = expand(words[-1], env, self.df.escape) if words else "/"
            for h in ins.heredocs:
                target = dst if len(ins.heredocs) == 1 and not dst.endswith("/") else dst.rstrip("/") + "/" + h.name
                self.post.append(f"mkdir -p {_q(target.rsplit('/', 1)[0] or '/')}")
                self.post.append(f"cat > {_q(target)} <<'{h.name}'\n{h.body.rstrip(chr(10))}\n{h.name}")
            return
        words = [expand(w, env, self.df.escape) for w in (ins.json if ins.json is not None else ins.words())]
        if len(words) < 2:
            self.warn(f"{self._where(ins)}: {ins.cmd} without a destination: left out")
            return
        srcs, dst = words[:-1], words[-1]
        if not dst.startswith("/"):
            dst = self.workdir.rstrip("/") + "/" + dst
        src_stage = ins.flags.get("from")
        if src_stage is not None and self.df.stage_named(src_stage) is None:
            self.warn(f"{self._where(ins)}: COPY --from={src_stage} names an image, not a stage: add a stage "
                      f"'FROM {src_stage} AS x' by hand; left out")
            return
        if self.ran:
            self.warn(f"{self._where(ins)}: {ins.cmd} after a RUN: Apptainer copies %files before %post runs, "
                      "so earlier RUN steps see these files already (and cannot create what they overwrite)")
        for s in srcs:
            if add and (s.startswith("http://") or s.startswith("https://")):
                target = dst if not dst.endswith("/") else dst + s.rsplit("/", 1)[-1]
                self.post.append(f"# {self._where(ins)}: ADD {s}")
                self.post.append(f"mkdir -p {_q(target.rsplit('/', 1)[0] or '/')} && "
                                 f"curl -fsSL -o {_q(target)} {_q(s)}")
                self.warn(f"{self._where(ins)}: ADD of a URL becomes a curl download in %post (curl must be in "
                          "the image)")
                continue
            if add and s.endswith(ARCHIVE_SUFFIXES):
                tmp = f"/tmp/hpcconv-add-{abs(hash(s)) % 10**8}-" + s.rsplit("/", 1)[-1]
                self.files.append(f"{s} {tmp}")
                self.post.append(f"mkdir -p {_q(dst)} && tar -xf {_q(tmp)} -C {_q(dst)} && rm -f {_q(tmp)}")
                self.warn(f"{self._where(ins)}: ADD of a tar archive: copied by %files and unpacked in %post")
                continue
            target = dst if (len(srcs) == 1 and not dst.endswith("/")) else dst.rstrip("/") + "/"
            line = f"{s} {target}"
            if src_stage is not None:
                st = self.df.stage_named(src_stage)
                self.files_from.setdefault(st.name or f"stage{st.index}", []).append(line)
            else:
                self.files.append(line)
        if "chown" in ins.flags:
            self.post.append(f"chown -R {_q(ins.flags['chown'])} {_q(dst)}   # {ins.cmd} --chown")
        if "chmod" in ins.flags:
            self.post.append(f"chmod -R {_q(ins.flags['chmod'])} {_q(dst)}   # {ins.cmd} --chmod")

    def _add(self, ins):
        self._copy(ins, add=True)

    def _entrypoint(self, ins):
        self.entrypoint = ins.json if ins.json is not None else ["/bin/sh", "-c", ins.args]

    def _cmd(self, ins):
        self.cmd = ins.json if ins.json is not None else ["/bin/sh", "-c", ins.args]

    # output ----------------------------------------------------------------------------------------
    def runscript(self) -> list[str]:
        ep, cmd = self.entrypoint, self.cmd
        if ep is None and cmd is None:
            return []
        lines = []
        if self.workdir != "/":
            lines.append(f"cd {_q(self.workdir)}")
        if ep:
            lines.append(f"if [ $# -gt 0 ]; then exec {shlex.join(ep)} \"$@\"; fi")
            lines.append(f"exec {shlex.join(ep + (cmd or []))}")
        else:
            lines.append('if [ $# -gt 0 ]; then exec "$@"; fi')
            lines.append(f"exec {shlex.join(cmd)}")
        return lines


def translate(df: Dockerfile, build_args: dict[str, str] | None = None) -> Translation:
    build_args = build_args or {}
    warnings: list[str] = []
    out: list[str] = [f"# Apptainer definition file written by hpcconv from {df.path}",
                      "# Build it from the Docker build context: apptainer build image.sif THIS_FILE", ""]
    needed = {df.final.index}
    for st in reversed(df.stages):   # stages the final one copies from, transitively
        if st.index in needed:
            for ins in st.instructions:
                if ins.cmd == "COPY" and "from" in ins.flags:
                    s = df.stage_named(ins.flags["from"])
                    if s is not None:
                        needed.add(s.index)
            b = df.stage_named(st.base)
            if b is not None:
                needed.add(b.index)
    stages = [s for s in df.stages if s.index in needed]
    multi = len(stages) > 1
    for st in stages:
        t = _Stage(df, st, build_args, warnings.append)
        t.translate()
        base = df.stage_named(st.base)
        if base is not None and base.index != st.index:
            warnings.append(f"{df.where(st.instructions[0])}: FROM {st.base} builds on an earlier stage: "
                            "Apptainer cannot; its steps are not repeated (build that stage as its own image)")
        from_ins = st.instructions[0]
        if "$" in st.base:
            warnings.append(f"{df.where(from_ins)}: FROM {st.base}: variables left unexpanded")
        out.append("Bootstrap: docker")
        out.append(f"From: {st.base}")
        if multi:
            out.append(f"Stage: {st.name or f'stage{st.index}'}")
        if st.platform:
            warnings.append(f"{df.where(from_ins)}: FROM --platform={st.platform}: use apptainer build --arch")
        out.append("")
        if t.files:
            out.append("%files")
            out += [f"    {f}" for f in t.files]
            out.append("")
        for name, lines in t.files_from.items():
            out.append(f"%files from {name}")
            out += [f"    {f}" for f in lines]
            out.append("")
        if t.post:
            shell = t.shell
            if shell and shell[-1] == "-c":
                shell = shell[:-1]
            out.append("%post" + (f" -c {' '.join(shell)}" if shell and shell != ["/bin/sh"] else ""))
            out.append("set -e")
            out += t.post    # not indented: heredoc bodies and delimiters must stay as written
            out.append("")
        if st.index == df.final.index:
            if t.environment:
                out.append("%environment")
                out += [f"    {e}" for e in t.environment]
                out.append("")
            rs = t.runscript()
            if rs:
                out.append("%runscript")
                out += [f"    {x}" for x in rs]
                out.append("")
            if t.labels:
                out.append("%labels")
                out += [f"    {k} {v}" for k, v in t.labels]
                out.append("")
    return Translation("\n".join(out).rstrip("\n") + "\n", warnings)
