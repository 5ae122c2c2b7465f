"""Orchestration shared by the commands (and the test harness): source -> flatten -> rewrite passes ->
emitter, returning checks. The CLI only parses options and renders what these functions return.

* :func:`open_for_profile` opens a source for a profile: the manifest entry is the profile's platform
  (unless the user named one); a single-arch image of another architecture, or an index without the
  site's platform, becomes a failed ``platform`` check before any layer is read (the source is
  re-opened without a platform to say what the image is).
* :func:`scan` runs one flatten pass through the detection passes (``inspect``, ``check``,
  ``check --profile all``: ``finish(profile)`` per profile on the same runner).
* :func:`convert` and :func:`export` put the detection passes and, with a profile, the preparation
  pass (``rewrite/prepare.py``) between flatten and the sink, in the same single pass.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import HpcconvError, SourceError
from .harness.checks import FAIL, Check, Checks
from .image import Image
from .progress import NULL

EMITTERS = {"charliecloud": "charliecloud", "singularity": "singularity", "shifter": "shifter"}
# which site runtimes (profiles.RUNTIMES) run each target's output
RUNTIMES = {"charliecloud": ("charliecloud",), "singularity": ("singularity", "apptainer"), "shifter": ("shifter",)}


def _available(img: Image):
    return img.index.platforms() if img.index else None


def open_for_profile(source: str, opts, profile) -> tuple[Image, Check | None]:
    """Open SOURCE for PROFILE. Returns the image and the platform check (None without a profile)."""
    from .rewrite.platform import check_platform
    from .sources import open_source

    if profile is None:
        return open_source(source, opts), None
    if opts.platform is not None:
        img = open_source(source, opts)
        return img, check_platform(img.platform, profile, _available(img))
    try:
        img = open_source(source, replace(opts, platform=profile.platform))
    except SourceError as first:
        # what is the image, then? (an index is re-read from the store; no layer is read)
        try:
            other = open_source(source, replace(opts, platform=None))
        except HpcconvError:
            raise first from None
        c = check_platform(other.platform, profile, _available(other))
        if c.status != FAIL:
            _stop_downloads(other)
            raise first
        return other, c
    return img, check_platform(img.platform, profile, _available(img))


@dataclass
class Scan:
    image: Image
    runner: object               # rewrite.base.PassRunner, after the pass
    flatten_checks: Checks

    def facts(self) -> dict:
        return self.runner.facts()

    def judge(self, profile) -> Checks:
        return self.runner.finish(profile)


@contextmanager
def downloads_of(img: Image):
    """Around the use of an image whose layers may still be downloading (SourceOptions.stream_layers):
    at the end the rest is waited for (and the tag recorded); on an error or Ctrl-C they stop."""
    bg = img.downloads
    try:
        yield img
    except BaseException:
        if bg is not None:
            bg.abort()
        raise
    if bg is not None:
        bg.finish()


def _stop_downloads(img: Image) -> None:
    """The image will not be read (it does not fit the site, or it was only opened to say what it
    is): the layers still downloading are not needed."""
    if img.downloads is not None:
        img.downloads.abort()


def flatten_into(image: Image, reporter, consume, single_pass: bool = True):
    """Flatten `image` and hand the Flattener to `consume` (which reads `entries()` and builds its
    own passes and output), returning (flattener, what consume returned).

    The flatten reads each layer once, top layer first; for the rare image whose layers that order
    cannot decide (flatten.TwoPassNeeded) consume runs again on the two-pass flatten, so it must
    leave nothing behind when an exception goes through it (the sinks write under temporary names)
    and start from scratch on each call. HPCCONV_FLATTEN_PASSES=2 always uses two passes."""
    from .flatten import Flattener, TwoPassNeeded

    why = None
    if single_pass and os.environ.get("HPCCONV_FLATTEN_PASSES", "1") != "2":
        flat = Flattener(image, reporter=reporter, single_pass=True)
        try:
            return flat, consume(flat)
        except TwoPassNeeded as e:
            why = f"{e.reason}; reading the layers again, in two passes"
            reporter.log("info", f"flatten: {why}")
    flat = Flattener(image, reporter=reporter)
    if why:
        flat.checks.add("flatten", "single pass", "skip", why)
    return flat, consume(flat)


def scan(image: Image, reporter=NULL, extra_passes=()) -> Scan:
    """One flatten pass through every detection pass (no profile needed: judge later)."""
    from .rewrite import default_passes
    from .rewrite.base import PassRunner

    def consume(flat):
        runner = PassRunner(default_passes(image.config.env) + list(extra_passes), elf_cache=elf_cache_of(image))
        runner.run(flat.entries())
        return runner

    flat, runner = flatten_into(image, reporter, consume)
    if runner.elf_cache is not None:
        runner.elf_cache.save()              # every layer was read to its end and verified
    return Scan(image, runner, flat.checks)


def elf_cache_of(image: Image):
    """The store's ELF findings by content provenance (rewrite/elfcache.py) for an image pulled
    through the store; None otherwise or with HPCCONV_ELF_CACHE=0."""
    if not getattr(image, "index_cache", None) or os.environ.get("HPCCONV_ELF_CACHE", "1") == "0":
        return None
    from .rewrite.elfcache import ElfCache

    return ElfCache(image.index_cache)


def verdict(checks: Checks) -> str:
    return "fail" if checks.failed else ("warn" if checks.warned else "pass")


@dataclass
class Prepared:
    """An image made ready for a profile: the modified image (config) and the stream transform."""

    image: Image
    runner: object
    prepare: object | None
    checks: Checks = field(default_factory=Checks)

    @property
    def changes(self) -> list[dict]:
        return self.prepare.changes if self.prepare is not None else []

    def finish(self) -> Checks:
        c = Checks()
        c.extend(self.checks)
        c.extend(self.runner.finish())
        return c


def prepare(image: Image, profile, target: str | None = None) -> Prepared:
    """Detection passes always; with a profile, the preparation pass and the config copy with its Env."""
    from .rewrite import default_passes
    from .rewrite.base import PassRunner
    from .rewrite.prepare import PreparePass, make_plan, prepared_image

    passes = default_passes(image.config.env)
    prep = None
    cache = elf_cache_of(image)
    if profile is not None:
        plan = make_plan(profile, target)
        image, notes = prepared_image(image, plan)
        prep = PreparePass(profile, plan, notes)
        passes.append(prep)
    return Prepared(image, PassRunner(passes, profile, elf_cache=cache), prep)


@dataclass
class ConvertOutcome:
    image: Image                 # the prepared image (its config is what was written)
    checks: Checks
    changes: list[dict]
    emit: object | None          # the emitter's result; None when the platform check failed
    compression: str
    site_run: str | None = None  # the run line at the site: binds and launcher from the profile


def convert(source: str, opts, target: str, output: Path, fmt: str, compression: str = "auto",
            profile=None, reporter=NULL, force: bool = False) -> ConvertOutcome:
    """source -> flatten -> passes -> emitter. A wrong platform stops before any layer is read."""
    # layers still downloading are read as they arrive
    img, pc = open_for_profile(source, replace(opts, stream_layers=True), profile)
    with downloads_of(img):
        return _convert(img, pc, target, output, fmt, compression, profile, reporter, force)


def _convert(img: Image, pc, target: str, output: Path, fmt: str, compression: str, profile, reporter,
             force: bool) -> ConvertOutcome:
    import importlib

    from .rewrite.prepare import choose_compression

    checks = Checks()
    if pc is not None:
        checks.items.append(pc)
        if pc.status == FAIL:
            _stop_downloads(img)
            return ConvertOutcome(img, checks, [], None, compression)
    if fmt in ("squashfs", "sif"):
        comp, cc = choose_compression(compression, profile)
        if cc is not None:
            checks.items.append(cc)
    else:   # a tar's compression is not the site's business (ch-convert reads gzip and zstd)
        comp = "gzip" if compression == "auto" else compression
    if profile is not None and profile.site.runtimes:
        allowed = RUNTIMES[target]
        ok = [r for r in profile.site.runtimes if r in allowed]
        checks.add("prepare", "prepare.runtime", "pass" if ok else "warn",
                   f"{profile.name} runs {', '.join(profile.site.runtimes)}" + (
                       f"; {target} output fits {ok[0]}" if ok else
                       f"; it does not list {' or '.join(allowed)}: convert with the --target the site runs"))
    emitter = importlib.import_module(f".emit.{EMITTERS[target]}", __package__)

    from .emit.sinks import block_reuse_in

    # an image pulled through the store: SquashFS blocks of earlier conversions are reused (emit/sqfs.py)
    reuse = Path(img.index_cache).parent / "block-reuse" if getattr(img, "index_cache", None) else None

    def consume(flat):
        prep = prepare(img, profile, target)
        with block_reuse_in(reuse, [layer.digest for layer in img.layers]):
            res = emitter.emit(prep.runner.transform(flat.entries()), prep.image, output, fmt=fmt,
                               compression=comp, reporter=reporter, force=force)
        return prep, res

    flat, (prep, res) = flatten_into(img, reporter, consume)
    if prep.runner.elf_cache is not None:
        prep.runner.elf_cache.save()         # every layer was read to its end and verified
    checks.extend(flat.checks)
    checks.extend(prep.finish())
    checks.extend(res.checks)
    return ConvertOutcome(prep.image, checks, prep.changes + list(res.changes), res, comp,
                          site_run_hint(profile, target, res.run_hint))


def export(source: str, opts, output: Path | None, profile=None, raw: bool = False, reporter=NULL,
           force: bool = False) -> tuple[Image, int, Checks, list[dict]]:
    """The flattened rootfs as a tar; with a profile (and not raw), prepared for it. The environment
    part of a preparation cannot live in a rootfs tar and is reported instead."""
    img, pc = open_for_profile(source, replace(opts, stream_layers=True), None if raw else profile)
    with downloads_of(img):
        return _export(img, pc, output, profile, raw, reporter)


def _export(img: Image, pc, output: Path | None, profile, raw: bool, reporter
            ) -> tuple[Image, int, Checks, list[dict]]:
    from .emit.sinks import write_tar

    checks = Checks()
    if pc is not None:
        checks.items.append(pc)
        if pc.status == FAIL:
            _stop_downloads(img)
            return img, 0, checks, []
    # what went to stdout cannot be taken back: two passes there
    single = output is not None
    if raw or profile is None:
        flat, n = flatten_into(img, reporter, lambda flat: write_tar(flat.entries(), output, compression=None,
                                                                        reporter=reporter), single)
        checks.extend(flat.checks)
        return img, n, checks, []

    def consume(flat):
        prep = prepare(img, profile)
        return prep, write_tar(prep.runner.transform(flat.entries()), output, compression=None, reporter=reporter)

    flat, (prep, n) = flatten_into(img, reporter, consume, single)
    checks.extend(flat.checks)
    checks.extend(prep.finish())
    if prep.prepare.env_notes:
        checks.add("prepare", "prepare.env", "warn",
                   "a rootfs tar carries no image config: set these at run time (or convert instead): "
                   + "; ".join(prep.prepare.env_notes))
        checks.items[:] = [c for c in checks.items if not (c.name == "prepare.env" and c.status == "pass")]
    return img, n, checks, prep.changes


HOST_MPI_PLACEHOLDER = "HOST_MPI_LIBDIR"


def site_run_hint(profile, target: str, hint: str) -> str | None:
    """The emitter's run line with the profile's binds and launcher: the host MPI directory bound at
    the first ``mpi.lib_dirs`` target (HOST_MPI_LIBDIR when the profile does not know the host path;
    HOST_MPI_DEPDIR for a further directory, such as the MPI's dependencies, outside the first),
    ``mpi.binds`` and ``site.binds``; ``srun --mpi=`` with the profile's first PMI. None when the target
    has no bind syntax here (Shifter: the site's modules do it)."""
    import shlex

    from .rewrite.prepare import _SO_FILE, bind_target

    if profile is None or target == "shifter":
        return None
    pairs: list[tuple[str, str]] = []
    if profile.mpi.mode == "host" and profile.mpi.lib_dirs:
        first = profile.mpi.lib_dirs[0]
        known = [b.split(":")[0] for b in profile.mpi.binds if bind_target(b) == first]
        pairs.append((known[0] if known else HOST_MPI_PLACEHOLDER, first))
        for i, d in enumerate(profile.mpi.lib_dirs[1:]):
            if not d.startswith(first.rstrip("/") + "/") and not [b for b in profile.mpi.binds if bind_target(b) == d]:
                pairs.append((f"HOST_MPI_DEPDIR{i + 1 if i else ''}", d))
    for spec in list(profile.mpi.binds) + list(profile.site.binds):
        src, dst = spec.split(":")[0], bind_target(spec)
        if (src, dst) in pairs or any(d == dst for _, d in pairs):
            continue
        if target == "charliecloud" and _SO_FILE.search(dst.rsplit("/", 1)[-1]):
            continue   # ch-run binds onto existing targets only; a file target is not in the image
        pairs.append((src, dst))
    if not pairs and not profile.mpi.pmi:
        return None
    srun = f"srun --mpi={profile.mpi.pmi[0]} " if profile.mpi.pmi else ""
    words = hint.split(" ", 1)
    if target == "charliecloud" and hint.startswith("ch-run "):
        binds = " ".join(f"-b {shlex.quote(s if s == d else f'{s}:{d}')}" for s, d in pairs)
        return f"{srun}ch-run {binds} {words[1]}".replace("  ", " ")
    if target == "singularity" and hint.startswith("apptainer run "):
        binds = ",".join(s if s == d else f"{s}:{d}" for s, d in pairs)
        return f"{srun}apptainer run --bind {shlex.quote(binds)} {hint.split(' ', 2)[2]}" if binds else srun + hint
    return None


def load_target_profile(name: str):
    """A profile to check or convert for: a site or generic one (a fragment only describes a part)."""
    from .errors import ProfileError
    from .profiles import load_profile

    prof = load_profile(name)
    if prof.kind == "fragment":
        raise ProfileError(f"profile {prof.name} is a fragment (a building block for 'extends'), not a machine",
                           hint="use a site or generic profile (hpcconv profiles list), or write one that extends it")
    return prof


def site_profiles() -> list:
    from .profiles import list_profiles

    return [p for p in list_profiles() if p.kind == "site"]


def check_all(source: str, opts, reporter=NULL) -> tuple[list[dict], Image]:
    """Judge one image against every site profile: one flatten pass per platform the profiles need
    (a single-arch image: one pass), ``finish(profile)`` per profile."""
    from .rewrite.platform import check_platform
    from .sources import open_source

    profiles = site_profiles()
    first = open_source(source, opts)
    scans: dict[str, Scan | None] = {}
    rows = []
    for prof in profiles:
        if opts.platform is None and first.index is not None:
            key = str(prof.platform)
            if key not in scans:
                try:
                    img = first if first.platform.matches(prof.platform) else \
                        open_source(source, replace(opts, platform=prof.platform))
                except SourceError:
                    img = None
                scans[key] = scan(img, reporter) if img is not None else None
            sc = scans[key]
        else:
            key = str(first.platform)
            if key not in scans:
                scans[key] = scan(first, reporter)
            sc = scans[key]
        checks = Checks()
        target = sc.image if sc is not None else first
        pc = check_platform(target.platform, prof, _available(first))
        checks.items.append(pc)
        if pc.status != FAIL and sc is not None:
            checks.extend(sc.judge(prof))
        rows.append({"profile": prof.name, "description": prof.description, "verdict": verdict(checks),
                     "platform": str(target.platform),
                     "fails": [f"{c.name}: {c.detail}" for c in checks.items if c.status == FAIL],
                     "warns": [f"{c.name}: {c.detail}" for c in checks.items if c.status == "warn"],
                     "checks": checks.to_json()})
    return rows, first
