"""The build stage: ``docker build`` through the Docker SDK's low-level API, the log streamed live.

The classic builder's stream is read as it comes (``decode=True``): ``stream`` lines go to the log
callback, ``Step N/M : INSTR`` lines say which instruction runs, and an ``error``/``errorDetail`` chunk
ends the build. A failure names the step, the Dockerfile line it came from (the N-th instruction) and
the last lines of its output. Builds use ``network_mode="host"`` (the test engine has no bridge).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SourceError, UsageError
from .checks import FAIL, PASS, Checks

STAGE = "build"
STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")


@dataclass
class BuildResult:
    tag: str
    image_id: str | None
    checks: Checks
    log: list[str] = field(default_factory=list)
    failed_step: str | None = None

    @property
    def ok(self) -> bool:
        return self.image_id is not None


def client():
    """A Docker SDK client that answers, or SourceError (exit 3)."""
    from ..sources.daemon import _client

    return _client()


def _instruction_line(dockerfile: Path | None, step: int) -> str | None:
    """`Dockerfile:L` of the step-th instruction (the classic builder numbers every instruction, FROM
    included; global ARGs before the first FROM too)."""
    if dockerfile is None:
        return None
    try:
        from ..dockerfile import load

        df = load(dockerfile)
    except Exception:
        return None
    if 1 <= step <= len(df.instructions):
        return df.where(df.instructions[step - 1])
    return None


def _lower_heredocs(df_path: Path, checks: Checks) -> Path | None:
    """A copy of the Dockerfile with heredocs lowered for the classic builder (outside the context:
    the SDK sends it along), or None when there are none."""
    import tempfile

    from ..dockerfile import load
    from .lower import lower

    try:
        df = load(df_path)
    except UsageError:
        return None          # the engine reports the syntax error itself, with its own words
    if not any(i.heredocs for i in df.instructions):
        return None
    text, notes = lower(df, df_path.read_text(errors="replace"))
    fd, name = tempfile.mkstemp(prefix="hpcconv-Dockerfile-")
    with open(fd, "w") as f:
        f.write(text)
    checks.add(STAGE, "heredocs", PASS, "; ".join(notes))
    return Path(name)


def build(context: Path, dockerfile: Path | None, tag: str, build_args: dict[str, str] | None = None,
          target: str | None = None, log: Callable[[str], None] | None = None, pull: bool = False,
          no_cache: bool = False, platform: str | None = None) -> BuildResult:
    """Build `context` (with `dockerfile`, default CONTEXT/Dockerfile) into `tag`."""
    import docker.errors

    context = Path(context)
    if not context.is_dir():
        raise UsageError(f"build context {context} is not a directory")
    df_path = Path(dockerfile) if dockerfile else context / "Dockerfile"
    if not df_path.is_file():
        raise UsageError(f"no Dockerfile at {df_path}", hint="name it with -f")
    try:
        rel = str(df_path.resolve().relative_to(context.resolve()))
    except ValueError:
        rel = str(df_path.resolve())   # outside the context: the SDK adds it to the context it sends
    cl = client()
    checks = Checks()
    lowered = _lower_heredocs(df_path, checks)
    if lowered is not None:
        rel = str(lowered)
    lines: list[str] = []
    step = None
    err = None
    image_id = None
    t0 = time.monotonic()
    kwargs = dict(path=str(context), dockerfile=rel, tag=tag, buildargs=build_args or {}, decode=True,
                  network_mode="host", rm=True, forcerm=True, pull=pull, nocache=no_cache)
    if target:
        kwargs["target"] = target
    if platform:
        kwargs["platform"] = platform
    partial = ""
    try:
        for chunk in cl.api.build(**kwargs):
            if "stream" in chunk:
                partial += chunk["stream"]
                while "\n" in partial:
                    ln, partial = partial.split("\n", 1)
                    lines.append(ln)
                    m = STEP.match(ln)
                    if m:
                        step = (int(m.group(1)), int(m.group(2)), m.group(3))
                    if log:
                        log(ln)
            if "aux" in chunk and isinstance(chunk["aux"], dict) and chunk["aux"].get("ID"):
                image_id = chunk["aux"]["ID"]
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("errorDetail") or {}
                err = (detail.get("message") or chunk.get("error") or "build failed").strip()
                if log:
                    log("ERROR: " + err)
                break
    except docker.errors.APIError as e:
        err = str(e.explanation or e)
    except docker.errors.DockerException as e:
        raise SourceError(f"the Docker engine failed during the build: {str(e)[:200]}") from None
    except (ConnectionError, OSError) as e:
        raise SourceError(f"lost the connection to the Docker engine during the build: {e}") from None
    if lowered is not None:
        lowered.unlink(missing_ok=True)
    if partial and log:
        log(partial)
        lines.append(partial)
    dt = time.monotonic() - t0
    if err is None and image_id is None:
        try:
            image_id = cl.api.inspect_image(tag)["Id"]
        except Exception:
            err = "the engine reported no image"
    if err is not None:
        where = ""
        failed = None
        if step:
            at = _instruction_line(df_path, step[0])
            failed = f"step {step[0]}/{step[1]}: {step[2]}"
            where = f" at {failed}" + (f" ({at})" if at else "")
        tail = [ln for ln in lines[-8:] if ln.strip() and not STEP.match(ln)]
        checks.add(STAGE, "docker build", FAIL, f"failed{where}: {err}"
                   + (" | last output: " + " / ".join(t.strip() for t in tail[-4:]) if tail else ""), dt)
        return BuildResult(tag, None, checks, lines, failed)
    checks.add(STAGE, "docker build", PASS, f"{tag} {image_id[:19]} ({step[1] if step else '?'} steps)", dt)
    return BuildResult(tag, image_id, checks, lines)
