"""Issue 8 fuzz targets (hypothesis), bounded so that CI spends a few seconds on them.

* the tar merge: random layer stacks built from a small, nasty alphabet (`..`, `/`, whiteouts,
  opaque markers, symlinks, hardlinks, devices, duplicates) -> flatten either refuses with a
  typed error (exit 3/4) or yields a stream that keeps the entry contract (clean relative names,
  parents first, no duplicates, hardlinks after their targets, no whiteout names left);
* the tar header reader: valid tars with random bytes flipped, and random bytes -> CorruptInput,
  never another exception;
* manifest/index/config/descriptor/digest/reference/platform parsers on random JSON and text ->
  a result or a typed HpcconvError.

HPCCONV_FUZZ_EXAMPLES raises the example count for a longer local run (default 60 per target).
No example database is written (the examples are derandomized: CI runs are reproducible).
"""

from __future__ import annotations

import io
import json
import os

import pytest

try:
    import hypothesis  # noqa: F401  (availability check)
except ImportError:                     # installed with .[test]; CI must not pass by skipping
    if os.environ.get("HPCCONV_REQUIRE_ALL") == "1":
        raise
    pytest.skip("hypothesis is not installed (pip install -e .[test])", allow_module_level=True)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flattools import check_contract, image_from_built  # noqa: E402
from hpcconv.errors import HpcconvError  # noqa: E402
from hpcconv.flatten import Flattener  # noqa: E402
from ocitools import T, build_image, make_tar  # noqa: E402

N = int(os.environ.get("HPCCONV_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

PARTS = ["a", "b", "lib", "..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh..wh.plnk", "c d", "é"]
names = st.lists(st.sampled_from(PARTS), min_size=1, max_size=4).map(
    lambda ps: "/".join(ps)) | st.sampled_from(["/", "/a", "//a//b", "a/", "../..", "/etc/passwd"])
members = st.builds(
    lambda name, kind, link, data, mode: T(name, kind, data=data if kind == "file" else b"", link=link,
                                           mode=mode, major=1, minor=3),
    names, st.sampled_from(["file", "dir", "sym", "hard", "char", "fifo"]), names,
    st.sampled_from([b"", b"x", b"hello" * 50]), st.sampled_from([0o644, 0o755, 0o4755, 0o000, 0o1777]))
layers = st.lists(st.lists(members, min_size=0, max_size=8), min_size=1, max_size=4)


def _flatten(stack):
    img = build_image([make_tar(ls) for ls in stack], compression="none")
    flat = Flattener(image_from_built(img))
    return list(flat.entries())


@FUZZ
@given(layers)
def test_fuzz_tar_merge(stack):
    os.environ.pop("HPCCONV_ALLOW_DUPLICATES", None)
    try:
        entries = _flatten(stack)
    except HpcconvError as e:
        assert e.exit_code in (3, 4) and "\n" not in e.message
        return
    seen: set = set()
    for e in entries:
        check_contract(e, seen)
        # a whiteout is never emitted; a `.wh.X` name survives only as a directory some member
        # used as a parent component (Docker's applier makes such a plain directory too; the
        # flatten checks report it)
        if e.path.rsplit("/", 1)[-1].startswith(".wh."):
            assert e.type == "dir" and any(f"{e.path}/" in "/".join(p for p in m.name.split("/") if p not in ("", "."))
                                           + "/" for ls in stack for m in ls), e.path


def _valid_tar() -> bytes:
    return make_tar([T("d", "dir"), T("d/f", data=b"content" * 100), T("l", "sym", link="d/f"),
                     T("h", "hard", link="d/f"), T("p" * 150, data=b"long", pax={"comment": "x"})])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_tar_reader_flipped_bytes(flips):
    from hpcconv.errors import CorruptInput
    from hpcconv.tarread import TarReader

    data = bytearray(_valid_tar())
    for pos, x in flips:
        data[pos % len(data)] ^= x
    try:
        tr = TarReader(io.BytesIO(bytes(data)))
        for m in tr:
            tr.content(m).read()
    except CorruptInput:
        pass


@FUZZ
@given(st.binary(min_size=0, max_size=3000))
def test_fuzz_tar_reader_random_bytes(blob):
    from hpcconv.errors import CorruptInput
    from hpcconv.tarread import TarReader

    try:
        for m in TarReader(io.BytesIO(blob)):
            pass
    except CorruptInput:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.text(max_size=20)
    | st.sampled_from(["sha256:" + "a" * 64, "sha512:" + "b" * 128, "sha256:xyz", "md5:00", "blake3:" + "c" * 64,
                       "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json"]),
    lambda children: st.lists(children, min_size=1, max_size=4) | st.dictionaries(
        st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size",
                         "platform", "architecture", "os", "variant", "rootfs", "diff_ids", "annotations",
                         "urls", "history", "Env", "Cmd", "Entrypoint"]), children, min_size=1, max_size=6),
    max_leaves=25)


@FUZZ
@given(json_values, st.sampled_from(["", "application/vnd.oci.image.manifest.v1+json",
                                     "application/vnd.oci.image.index.v1+json",
                                     "application/vnd.docker.distribution.manifest.v1+json"]))
def test_fuzz_manifest_parsers(value, ctype):
    from hpcconv.image import Descriptor, ImageConfig, Index, Manifest

    raw = json.dumps(value).encode()
    for parse in (lambda: Manifest.parse(raw, ctype), lambda: Index.parse(raw, ctype),
                  lambda: ImageConfig.parse(raw), lambda: Descriptor.from_json(value)):
        try:
            parse()
        except HpcconvError as e:
            assert e.exit_code in (2, 3, 4)


@FUZZ
@given(st.text(max_size=120) | st.sampled_from(["docker.io/library/alpine:3", "a/b@sha256:" + "0" * 64,
                                                 "localhost:5000/x:y", "UPPER/case", "a//b", ":tag", "x@md5:1"]))
def test_fuzz_reference_digest_platform_parsers(text):
    from hpcconv.image import Platform, check_digest
    from hpcconv.reference import parse

    for f in (parse, check_digest, Platform.parse):
        try:
            f(text)
        except HpcconvError as e:
            assert e.exit_code in (2, 3, 4)
