"""Flatten an image's layers into one stream of rootfs entries, as the Docker engine would.

No rootfs on disk, memory bounded by metadata. Two ways, with the same result (tests compare them
on every case, and each with `docker export`):

* *Single pass* (`single_pass=True`, what `convert`, `export` and `check` use): every layer is read
  once, the top layer first (go-containerregistry's mutate.Extract order). An entry is yielded when
  no higher layer replaced, deleted (whiteout) or hid (opaque directory) it, with its content
  streamed straight from the layer; the blob digest, the expansion cap and the diff_id are checked
  as each layer is read (the output is written under a temporary name, so nothing is kept when a
  check fails at the end of a layer). A parent directory that its layer omits takes its attributes
  from the first lower layer that has it (0755 root when none does), so it may come after the
  entries below it. A hardlink whose first name a higher layer replaced gets the old content, read
  again from its layer at the end. What the top-down view cannot decide raises TwoPassNeeded and the
  caller (`pipeline.flatten_into`) starts over with two passes: a parent that a lower layer makes a
  symlink or a file (the symlink is followed, the file replaced, bottom-up), a hardlink into another
  layer or to a missing target, a hardlink header that changes its target's attributes after the
  target was yielded, HPCCONV_ALLOW_DUPLICATES. Docker-built layers have none of these.
* *Two passes* (the default of the class, used for `export -o -` and after TwoPassNeeded):

  1. *Index pass*: every layer is decompressed once and only its tar headers are read (with
     `tarread`, a forward-only header parser about 2x faster than `tarfile` here). OCI changeset
     semantics are applied in layer order to an in-memory tree (metadata only): whiteouts, opaque
     directories, type changes, implied parents, symlinked parents, hardlinks as shared inodes.
     Each regular file's inode remembers where its content lives (layer, member ordinal). Layer
     digests and `rootfs.diff_ids` are verified here. (A blob from the store whose diff_id this
     user's store recorded when it last verified it, `index-cache/<algo>/<hex>.diff_id`, is not
     hashed uncompressed again when the config names that diff_id: its blob digest, checked on
     every read, fixes the uncompressed bytes.)
  2. *Emit pass*: directories and every entry without content are yielded first (parents first),
     then the layers that hold needed content are streamed again in order and each surviving file
     is yielded when its member is reached, followed by the hardlinks to it. A layer is read only
     up to its last needed member; layers with no surviving content are not read again.

Semantics (image-spec `layer.md`, moby `pkg/archive`, checked against Docker 20.10 / overlay2 by
tests/test_flatten_docker.py):

* names: `./` and leading `/` stripped, `a/../b` cleaned lexically; a name whose `..` climbs
  above the root is refused (UnsafeInput) where Docker silently clamps it to the root;
* `.wh.NAME` deletes NAME from lower layers only (a same-layer NAME is kept, with a warning;
  Docker refuses such a layer); `.wh..wh..opq` hides every lower-layer child of its directory
  wherever it sits in the layer; other `.wh..wh.*` AUFS metadata (and `.wh..wh.plnk/` contents)
  are ignored;
* dir over dir merges (the new attributes win, children stay); anything else replaces, and a
  non-directory replacing a directory drops its subtree;
* a missing parent is created 0755 root:root; an existing lower directory keeps its attributes
  (Docker on overlay2 resets it to 0755 root:root in the merged view, containerd keeps it);
* a parent that is a symlink leading to an existing directory is followed inside the root (chroot
  semantics, `lib -> usr/lib`); Docker on overlay2 instead hides the symlink behind a new
  directory — see the tests. Any other non-directory parent (a file, a dangling or looping
  symlink) is itself replaced by a directory, with a warning, as overlay2 shows;
* hardlinks share an inode: the target is resolved from the root (leading `/` stripped), may lie
  in a lower layer (Docker on overlay2 refuses that at `docker load`; the spec allows it), keeps
  its content when the target path is later removed or overwritten, and a hardlink header's
  uid/gid (and, unless the inode is a symlink, mode and mtime) apply to the shared inode, as
  moby's createTarFile does; a missing target becomes an empty file with a warning; a hardlink
  to a directory is CorruptInput and a target above the root UnsafeInput (Docker clamps it);
* `.wh.X` followed by a directory X in one layer: X is new and empty (overlay2 merges the lower X
  back in, since the directory replaces its whiteout device without marking it opaque);
* duplicates in a layer: CorruptInput naming the layer and entry, as `docker load` refuses them
  ("duplicates of file paths not supported") and the image spec forbids them; with
  HPCCONV_ALLOW_DUPLICATES=1 the later entry wins, with a warning (what containerd/umoci do);
* sparse members (old GNU, PAX 0.0/0.1/1.0) are read expanded (Docker 20.10 refuses old GNU
  sparse); their holes count toward `max_expanded`;
* symlinks are mode 0777 (what lstat shows); xattrs come from `SCHILY.xattr.*` (and
  `LIBARCHIVE.xattr.*`) and are all kept, where `docker export` keeps only security.capability.
"""

from __future__ import annotations

import contextvars
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from .cachefiles import read_trusted, write_atomic
from .compression import CHUNK, ChunkReader, decoded_chunks
from .entries import _FROM_TAR  # entry_type_of's table, looked up inline for every member
from .entries import (BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, XATTR_PREFIX, Entry,
                      entry_type_of)
from .errors import CorruptInput, HpcconvError, UnsafeInput
from .harness.checks import FAIL, PASS, WARN, Checks
from .image import Image, Layer, OffloadedHash, VerifyingReader, hasher_for
from .progress import NULL
from .speedups import native
from .tarread import Member, TarReader

STAGE = "flatten"
WH = ".wh."
WH_META = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
WH_PLNK = ".wh..wh.plnk"
MAX_SYMLINK_HOPS = 40
MAX_WARNINGS_KEPT = 50


_INDEX_VERSION = 1
_XATTR_KEYS = (XATTR_PREFIX, "LIBARCHIVE.xattr.")


def _row(ti: Member) -> list:
    """What the index pass uses of a member, for the index cache (JSON)."""
    pax = {k: v for k, v in ti.pax_headers.items() if k.startswith(_XATTR_KEYS)}
    return [ti.name, ti.type.decode("latin-1"), ti.mode, ti.uid, ti.gid, ti.mtime, ti.size, ti.linkname,
            ti.devmajor, ti.devminor, pax]


def _read_trusted(path: Path) -> str:
    """A cache file's text, only if this user wrote it (cachefiles.read_trusted)."""
    return read_trusted(path).decode()


def _member(r: list) -> Member:
    m = Member()
    (m.name, t, m.mode, m.uid, m.gid, m.mtime, m.size, m.linkname, m.devmajor, m.devminor, pax) = r
    if not (isinstance(m.name, str) and isinstance(t, str) and isinstance(pax, dict)):
        raise ValueError("bad index row")
    m.type = t.encode("latin-1")
    m.pax_headers = pax
    m.stored = m.size
    return m


class Ino:
    """One inode of the model. Directories carry `children`; regular files with content carry
    `src` = (layer index, member ordinal)."""

    __slots__ = ("type", "mode", "uid", "gid", "mtime", "linkname", "major", "minor", "xattrs", "size",
                 "src", "children")

    def __init__(self, type_: str, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: float = 0,
                 linkname: str = "", major: int = 0, minor: int = 0, xattrs: dict | None = None,
                 size: int = 0, src: tuple[int, int] | None = None):
        self.type = type_
        self.mode, self.uid, self.gid, self.mtime = mode, uid, gid, mtime
        self.linkname, self.major, self.minor = linkname, major, minor
        self.xattrs = xattrs or {}
        self.size, self.src = size, src
        self.children: dict[str, Ino] | None = {} if type_ == DIR else None


def _implied_dir() -> Ino:
    return Ino(DIR, 0o755)


def _xattrs_of(ti: Member) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k, v in ti.pax_headers.items():
        if k.startswith(XATTR_PREFIX):
            out[k[len(XATTR_PREFIX):]] = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            import base64
            from urllib.parse import unquote_to_bytes
            name = unquote_to_bytes(k[len("LIBARCHIVE.xattr."):]).decode("utf-8", "surrogateescape")
            try:
                out.setdefault(name, base64.b64decode(v + "=" * (-len(v) % 4)))
            except ValueError:
                pass
    return out


def _in_entry(what: str, ti: Member, e: HpcconvError) -> HpcconvError:
    """`e`, raised while applying member `ti` of a layer, with the layer and the entry named."""
    return type(e)(f"{what} entry {ti.name!r}: {e.message}", hint=e.hint)


def clean_name(name: str) -> list[str]:
    """Components of a member name: `/`, `.` and empty parts dropped, `..` applied lexically.
    Raises UnsafeInput when `..` climbs above the root and CorruptInput for a NUL byte."""
    parts = name.split("/")
    if "" not in parts and "." not in parts and ".." not in parts and "\0" not in name:
        return parts                             # the common case: already clean (every member)
    if "\0" in name:
        raise CorruptInput("name contains a NUL byte")
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                raise UnsafeInput("path climbs out of the root with '..'")
            parts.pop()
            continue
        parts.append(p)
    return parts


DEFAULT_MAX_EXPANDED = 128 << 30
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """`1048576`, `512M`, `64G`, `1T` (binary units; a trailing `B`/`iB` is allowed). 0 = no limit."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 64G, 0 for no limit)") from None
    if value < 0:
        raise ValueError(f"not a size: {text!r}")
    return int(value * _UNITS[unit])


def default_max_expanded() -> int | None:
    """The cap on an image's total uncompressed layer bytes: $HPCCONV_MAX_EXPANDED (a size, 0 = no
    cap; the CLI's --max-expanded sets it), else 128 GiB. Guards against decompression bombs."""
    raw = __import__("os").environ.get("HPCCONV_MAX_EXPANDED", "")
    try:
        cap = parse_size(raw) if raw.strip() else DEFAULT_MAX_EXPANDED
    except ValueError:
        cap = DEFAULT_MAX_EXPANDED
    return cap or None


class _TooBig(CorruptInput):
    pass


_BOMB_HINT = "if the image is genuine, raise the cap with --max-expanded or HPCCONV_MAX_EXPANDED"
_BOMB_SLACK = 8 << 20


class _Count:
    """Count and hash a layer's uncompressed bytes (diff_id, decompression-bomb cap) as they pass."""

    def __init__(self, hasher, cap: int | None, done: int, what: str):
        self.h, self._cap, self.n, self._done, self._what = hasher, cap, 0, done, what
        self.extra = 0

    def count_extra(self, n: int) -> None:
        self.extra += n
        self._check()

    def _check(self) -> None:
        if self._cap is not None and self._done + self.n + self.extra > self._cap:
            raise _TooBig(f"{self._what}: expands beyond {self._cap - _BOMB_SLACK} bytes (decompression bomb?)",
                          hint=_BOMB_HINT)

    def through(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        h = self.h
        for data in chunks:
            self.n += len(data)
            self._check()
            if h is not None:
                h.update(data)
            yield data


def _progress_read(raw, task):
    """raw.read, advancing the progress bar by the compressed bytes read."""
    read, advance = raw.read, task.advance

    def progress_read(n: int) -> bytes:
        data = read(n)
        advance(len(data))
        return data
    return progress_read


def _members(stream, what: str) -> Iterator[tuple[TarReader, Member]]:
    """Yield (reader, member) for each member of an uncompressed tar stream, naming the layer and
    the last good member in errors."""
    tr = TarReader(stream)
    name = ""
    try:
        for m in tr:
            name = m.name
            yield tr, m
    except _TooBig as e:
        where = f" entry {name!r}" if name else ""
        raise CorruptInput(f"{what}{where}: {e.message.removeprefix(what + ': ')}", hint=e.hint) from None
    except CorruptInput as e:
        after = f" after entry {name!r}" if name else ""
        raise CorruptInput(f"{what}: bad tar data{after}: {e.message}") from None


# without the C module: the buffer over the prefetch thread's chunks serves the tar headers' small
# reads; content reads larger than it go straight to the prefetch buffer, so a small one costs
# nothing and holds no third copy of a 1 MiB chunk
_HEADER_BUF = 64 << 10

# How many decoded chunks (CHUNK bytes each) a layer's decoder may run ahead of the reader.
PREFETCH_DEPTH = 2
AHEAD_MAX = 32
# A consumer that holds little of the stream itself may let a layer's decoder run further ahead:
# given a layer digest, the depth for that layer now (at most AHEAD_MAX), or None for
# PREFETCH_DEPTH; asked from the decoder's thread before each chunk it queues beyond the default.
# The SquashFS writer sets it for the layers an earlier image in the block-reuse index was made
# of (emit/sqfs.py, SquashWriter.read_ahead): their blocks come back from that image at once, so
# the writer's window of jobs, which would otherwise hold decoded chunks, stays nearly empty, and
# the decoder banks chunks while the reader is slow (small files) for when it is fast again (big
# files whose blocks are reused), instead of the two taking turns.
READ_AHEAD: "contextvars.ContextVar[Callable[[str], int | None] | None]" = contextvars.ContextVar(
    "hpcconv_read_ahead", default=None)


def _ahead_of(digest: str) -> Callable[[], int | None] | None:
    """READ_AHEAD for one layer (looked up here, in the reader's context: the decoder's thread
    does not see it)."""
    ahead = READ_AHEAD.get()
    return None if ahead is None else (lambda: ahead(digest))


_Chunks = native.Chunks if native is not None else None


class _Prefetch(ChunkReader):
    """Run a chunk iterator (a layer's decoder, `compression.decoded_chunks`) in a background
    thread, a few chunks ahead (bounded memory), and read its chunks.

    Decompression (ISA-L, zstd) and hashing release the GIL, so they overlap with header parsing
    and with the consumer's work. Errors from the thread are raised in the reader."""

    _END = object()

    def __init__(self, chunks: Iterator[bytes], depth: int = PREFETCH_DEPTH, what: str = "layer",
                 ahead: Callable[[], int | None] | None = None):
        import queue
        import threading

        self._source, self._what = chunks, what
        # with `ahead` (see READ_AHEAD), the depth asked before each chunk, default `depth`
        self._depth, self._ahead = depth, ahead
        self._q: "queue.Queue" = queue.Queue(maxsize=AHEAD_MAX if ahead is not None else depth)
        self._taken = threading.Event() if ahead is not None else None
        self._stop = threading.Event()
        super().__init__(self._received())
        self._t = threading.Thread(target=self._run, name="hpcconv-prefetch", daemon=True)
        self._t.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            if self._taken is not None and self._q.qsize() >= self._depth:
                self._taken.clear()                # (before the size is read again: no wake-up lost)
                if self._q.qsize() >= (self._ahead() or self._depth):
                    self._taken.wait(0.1)
                    continue
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for data in self._source:
                if not self._put(data):
                    return
            self._put(self._END)
        except BaseException as e:              # handed to the reader
            self._q.put(e)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()                         # the generator runs (and is closed) in this thread

    def _received(self) -> Iterator[bytes]:
        """The thread's chunks, in the reader's thread; after an error, the end."""
        while True:
            item = self._q.get()
            if self._taken is not None:
                self._taken.set()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                if isinstance(item, (OSError, EOFError, ValueError)) and not isinstance(item, HpcconvError):
                    # raised where the content is read, maybe by a sink: say which layer is bad
                    raise CorruptInput(f"{self._what}: cannot read layer: {item}") from None
                raise item
            yield item

    def reader(self):
        """The file object the tar reader reads: the C module's reader straight over the chunks
        (one copy per read, none for a chunk handed on whole), else a BufferedReader over this."""
        return _Chunks(self._chunks) if _Chunks is not None else io.BufferedReader(self, _HEADER_BUF)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while self._t.is_alive():
                try:
                    self._q.get_nowait()
                except Exception:
                    self._t.join(0.05)
            super().close()


class _Unhashed:
    """_Vouched's hash: none (the download's check stands in for it)."""

    def update(self, data) -> None:
        pass


class _Vouched(VerifyingReader):
    """A layer blob read as this process downloads it (sources/registry.py, _Following), sizes
    checked as by VerifyingReader but not hashed here: the download hashes every byte it writes,
    and `vouch()` says at the end whether the bytes read here are exactly the ones it verified
    (that saves the single pass a second sha256 of the compressed layer). When they may not be
    (the download started over while they were read: a server that ignored Range, a partial file
    proven bad), TwoPassNeeded: the caller reads the layers again, in two passes, from the
    verified blobs in the store."""

    def __init__(self, raw, layer: Layer):
        super().__init__(raw, layer.digest, layer.descriptor.size, what=f"layer {layer.digest}")
        self._h = _Unhashed()

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if self._raw.changed():          # (before the bytes are handed on)
            raise TwoPassNeeded(f"{self._what} was downloaded again while it was read")
        return data

    def _check(self) -> None:
        if not self._raw.vouch():
            raise TwoPassNeeded(f"{self._what} was downloaded again while it was read")


class _Named:
    """A member's content read by the consumer (the single pass): a truncated or corrupt layer
    found there says which layer and entry. (A plain object, not an io.RawIOBase: one is made for
    every file of every layer, and the message only when an error needs it.)"""

    __slots__ = ("_inner", "_layer", "_name", "_end")

    def __init__(self, inner, layer: str, name: str, end: tuple[bytes, int] | None = None):
        self._inner, self._layer, self._name = inner, layer, name
        self._end = end         # (layer blob sha256, offset where the content ends), for provenance

    def provenance(self) -> tuple[bytes, int] | None:
        """Where the next byte read comes from: (the raw sha256 of the layer blob, its offset in the
        blob's decoded stream), the content following contiguously; None if not known. The blob's
        digest is checked as the layer is read (a mismatch fails the conversion), and decoding is a
        function of the blob, so the pair names the bytes as well as their own hash would
        (emit/sqfs.py reuses blocks by it without hashing them)."""
        if self._end is None:
            return None
        return self._end[0], self._end[1] - self._inner._left

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except CorruptInput as e:
            raise self._named(e) from None

    def read_view(self, n: int = -1):
        """As read, maybe a memoryview (see entries.reader_of): the inner reader's, no copy."""
        try:
            return self._inner.read_view(n)
        except CorruptInput as e:
            raise self._named(e) from None

    def _named(self, e: CorruptInput) -> CorruptInput:
        if e.message.startswith("layer "):
            return e
        return CorruptInput(f"{self._layer} entry {self._name!r}: {e.message}", hint=e.hint)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


class Flattener:
    def __init__(self, image: Image, reporter=NULL, max_expanded: int | None = None,
                 index_cache: "str | os.PathLike | None" = None, single_pass: bool = False):
        self.image = image
        # one top-down pass over the layers (TwoPassNeeded for what it cannot decide), or the index
        # pass and the emit pass
        self.single_pass = single_pass
        # where each layer's header index is kept, keyed by blob digest (the store's index-cache/):
        # a later flatten of a layer already indexed skips the index pass over it
        cache = index_cache if index_cache is not None else getattr(image, "index_cache", None)
        self.index_cache = Path(cache) if cache and os.environ.get("HPCCONV_INDEX_CACHE", "1") != "0" else None
        self._from_cache: set[int] = set()      # layers indexed from the cache (verified when re-read)
        self.reporter = reporter or NULL
        self.max_expanded = default_max_expanded() if max_expanded is None else (max_expanded or None)
        self._whited: set[str] = set()          # paths deleted by whiteouts/opaque dirs (hardlink checks)
        self.checks = Checks()
        self.warnings: list[str] = []
        self.stats = {"layers": len(image.layers), "members": 0, "whiteouts": 0, "opaque": 0,
                      "hardlinks": 0, "expanded_bytes": 0, "layers_reread": 0, "entries": 0,
                      "by_type": {}, "content_bytes": 0, "warnings": 0, "layers_cached": 0,
                      "diff_ids_recorded": 0}
        self.root = _implied_dir()
        self._indexed = False

    # -- helpers ---------------------------------------------------------------------------------
    def _what(self, i: int) -> str:
        layer = self.image.layers[i]
        return f"layer {i + 1}/{len(self.image.layers)} ({layer.digest[:19]})"

    def _warn(self, msg: str) -> None:
        self.stats["warnings"] += 1
        if len(self.warnings) < MAX_WARNINGS_KEPT:
            self.warnings.append(msg)
        self.reporter.log("warning", msg)

    def _open(self, i: int, verify: bool = True):
        layer: Layer = self.image.layers[i]
        raw = layer.open()
        if verify and not isinstance(raw, VerifyingReader):
            if self.single_pass and getattr(raw, "vouchable", False):
                # a download this process is making, which hashes every byte: see _Vouched
                return _Vouched(raw, layer)
            # the digest on the background hash thread: this stream is read by a layer's decoder
            raw = VerifyingReader(raw, layer.digest, layer.descriptor.size, what=f"layer {layer.digest}",
                                  offload=True)
        return raw

    def _diff_ids(self) -> list[str]:
        layers = self.image.layers
        diff_ids = self.image.config.diff_ids if self.image.config else []
        if diff_ids and len(diff_ids) != len(layers):
            raise CorruptInput(f"image config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
        return diff_ids

    # -- path resolution -------------------------------------------------------------------------
    def _walk(self, parts: list[str], create: bool, cur: "_LayerState | None") -> tuple[Ino, list[str]] | None:
        """Resolve directory components from the root. A symlink is followed (inside the root,
        like a chrooted applier) when it leads to an existing directory. With `create`, missing
        directories are made (0755 root) and a non-directory, or a symlink that leads nowhere
        useful, is replaced by a directory; without it, None is returned for such paths."""
        got = self._descend([self.root], [], parts, create, cur, [0])
        return None if got is None else (got[0][-1], got[1])

    def _descend(self, chain: list[Ino], names: list[str], parts: list[str], create: bool,
                 cur: "_LayerState | None", hops: list[int]) -> tuple[list[Ino], list[str]] | None:
        chain, names = list(chain), list(names)
        for c in parts:
            if c in ("", "."):
                continue
            if c == "..":
                if len(chain) > 1:                  # `..` at the root stays at the root
                    chain.pop()
                    names.pop()
                continue
            d = chain[-1]
            child = d.children.get(c)
            if child is not None and child.type == SYMLINK:
                hops[0] += 1
                got = None
                if hops[0] <= MAX_SYMLINK_HOPS:
                    t = child.linkname
                    start = ([self.root], []) if t.startswith("/") else (chain, names)
                    got = self._descend(start[0], start[1], t.split("/"), False, None, hops)
                if got is not None:
                    chain, names = got
                    continue
                if not create:
                    return None
                child = self._replace_parent(d, c, names, child, cur, "a symlink not leading to a directory")
            elif child is None:
                if not create:
                    return None
                child = d.children[c] = _implied_dir()
                if cur is not None:
                    cur.implied.add("/".join(names + [c]))
            elif child.type != DIR:
                if not create:
                    return None
                child = self._replace_parent(d, c, names, child, cur, f"a {child.type}")
            chain.append(child)
            names.append(c)
        return chain, names

    def _replace_parent(self, d: Ino, c: str, names: list[str], old: Ino, cur, why: str) -> Ino:
        key = "/".join(names + [c])
        if cur is not None:
            self._warn(f"{cur.what}: {key!r} is {why} but the parent of an entry; replaced by a directory")
            cur.implied.add(key)
        new = d.children[c] = _implied_dir()
        return new

    # -- index pass ------------------------------------------------------------------------------
    def index(self) -> None:
        if self._indexed:
            return
        t0 = time.monotonic()
        layers = self.image.layers
        diff_ids = self._diff_ids()
        task = self.reporter.task("flatten: index layers", total=sum(l.descriptor.size for l in layers) or None)
        for i in range(len(layers)):
            self._index_layer(i, diff_ids[i] if diff_ids else None, task)
        task.done()
        self._indexed = True
        cached = (f" ({len(self._from_cache)} indexed from the cache: verified when cached, and again when "
                  f"re-read for content)") if self._from_cache else ""
        self._layer_checks("", bool(diff_ids), cached, time.monotonic() - t0)

    def _layer_checks(self, how: str, diff_ids: bool, note: str = "", duration: float = 0.0) -> None:
        n = len(self.image.layers)
        detail = f"{n} layer(s){how}: blob digests verified"
        detail += ", diff_ids verified" if diff_ids else ", no diff_ids in the config"
        k = self.stats["diff_ids_recorded"]
        if k:
            detail += (f" ({k} layer read(s) matched by blob digest to a diff_id this user's store recorded "
                       f"when it last verified it)")
        self.checks.add(STAGE, "layer digests", PASS, detail + note, duration)
        if not n:
            self.checks.add(STAGE, "layers", WARN, "the image has no layers: its root file system is empty "
                                                   "(Docker accepts such images too)")

    def _index_layer(self, i: int, diff_id: str | None, task) -> None:
        what = self._what(i)
        if self._index_from_cache(i, diff_id, what):
            task.advance(self.image.layers[i].descriptor.size)
            return
        rows: list | None = [] if self.index_cache is not None else None
        st = _LayerState(i, what)
        before = self.stats["expanded_bytes"]
        for _tr, ti, ordinal in self._layer_members(i, diff_id, task, rows):
            try:
                self._apply(st, ti, ordinal)
            except HpcconvError as e:
                raise _in_entry(what, ti, e) from None
        if rows is not None:
            self._save_index(i, diff_id, self.stats["expanded_bytes"] - before, rows)

    def _layer_members(self, i: int, diff_id: str | None, task, rows: list | None = None
                       ) -> Iterator[tuple[TarReader, Member, int]]:
        """(reader, member, ordinal) for each member of layer i, which is read to its very end: the
        blob digest, the expansion cap and (after the last member) the diff_id are checked here.
        Errors name the layer, and the entry where one is known."""
        what = self._what(i)
        # A blob whose diff_id this store recorded as verified decodes to the same bytes again (its
        # digest is checked on this read too): the uncompressed bytes need no second hash.
        recorded = bool(diff_id) and self._diff_id_recorded(i, diff_id)
        raw = self._open(i)
        cnt = pf = None
        ti = None
        try:
            cap = self.max_expanded
            # the stream-level backstop sits a little above the cap: the prefetch thread runs ahead
            # of the headers, and the per-entry check below should speak first (it can name the entry)
            cnt = _Count(OffloadedHash(hasher_for(diff_id)) if diff_id and not recorded else None,
                         None if cap is None else cap + _BOMB_SLACK, self.stats["expanded_bytes"], what)
            # The thread decodes to the very end (compressed remainder included), so the blob digest
            # and the diff_id cover every byte even though the tar ends earlier.
            pf = _Prefetch(cnt.through(decoded_chunks(_progress_read(raw, task), what)),
                           what=what, ahead=_ahead_of(self.image.layers[i].digest))
            stream = pf.reader()
            ordinal = -1
            for tr, ti in _members(stream, what):
                ordinal += 1
                if cap is not None and self.stats["expanded_bytes"] + tr.offset + ti.size > cap:
                    # the header declares it: name the entry before reading its content
                    raise _TooBig(f"expands beyond {cap} bytes (decompression bomb?)", hint=_BOMB_HINT)
                if ti.sparse is not None and ti.size > ti.stored:
                    cnt.count_extra(ti.size - ti.stored)       # holes expand on output too
                if rows is not None:
                    rows.append(_row(ti))
                yield tr, ti, ordinal
            self.stats["members"] += ordinal + 1
            while stream.read(CHUNK):
                pass
        except _TooBig as e:
            if e.message.startswith(what):
                raise CorruptInput(e.message, hint=e.hint) from None
            where = f" entry {ti.name!r}" if ti is not None else ""
            raise CorruptInput(f"{what}{where}: {e.message}", hint=e.hint) from None
        except CorruptInput as e:
            if e.message.startswith(what):
                raise
            raise CorruptInput(f"{what}: {e.message}", hint=e.hint) from None
        except (OSError, EOFError, ValueError) as e:
            raise CorruptInput(f"{what}: cannot read layer: {e}") from None
        finally:
            for c in (pf, raw):
                try:
                    if c is not None:
                        c.close()
                except Exception:
                    pass
        if not raw.verified:
            raise CorruptInput(f"{what}: blob was not fully verified")
        self.stats["expanded_bytes"] += cnt.n + cnt.extra
        if recorded:
            self.stats["diff_ids_recorded"] += 1
        elif diff_id:
            got = f"{diff_id.split(':', 1)[0]}:{cnt.h.hexdigest()}"
            if got != diff_id:
                raise CorruptInput(f"{what}: uncompressed content {got} does not match diff_id {diff_id}")
            self._record_diff_id(i, diff_id)

    # -- index cache -----------------------------------------------------------------------------
    def _cache_file(self, i: int) -> Path | None:
        if self.index_cache is None:
            return None
        algo, _, hexd = self.image.layers[i].digest.partition(":")
        if not hexd or "/" in algo or "/" in hexd:
            return None
        return self.index_cache / algo / f"{hexd}.v{_INDEX_VERSION}.json"

    def _diff_id_file(self, i: int) -> Path | None:
        path = self._cache_file(i)
        return None if path is None else path.with_name(path.name.split(".", 1)[0] + ".diff_id")

    def _diff_id_recorded(self, i: int, diff_id: str) -> bool:
        path = self._diff_id_file(i)
        if path is None:
            return False
        try:
            return _read_trusted(path).split() == [self.image.layers[i].digest, diff_id]
        except (OSError, ValueError):
            return False

    def _record_diff_id(self, i: int, diff_id: str) -> None:
        """Note that layer i's blob decodes to diff_id (checked just now), next to its index."""
        path = self._diff_id_file(i)
        if path is not None:
            write_atomic(path, f"{self.image.layers[i].digest} {diff_id}\n")

    def _save_index(self, i: int, diff_id: str | None, expanded: int, rows: list) -> None:
        """Keep a verified layer's member headers (best effort: a cache that cannot be written is
        simply not there next time)."""
        path = self._cache_file(i)
        if path is None:
            return
        doc = {"digest": self.image.layers[i].digest, "diff_id": diff_id or "", "expanded": expanded,
               "members": rows}
        write_atomic(path, json.dumps(doc, separators=(",", ":")))

    def _index_from_cache(self, i: int, diff_id: str | None, what: str) -> bool:
        """Apply layer i from its cached header index; False when there is none (or it does not fit)."""
        path = self._cache_file(i)
        if path is None:
            return False
        try:
            doc = json.loads(_read_trusted(path))
            if doc.get("digest") != self.image.layers[i].digest or (diff_id and doc.get("diff_id") != diff_id):
                return False
            rows, expanded = doc["members"], int(doc["expanded"])
            members = [_member(r) for r in rows]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return False
        cap = self.max_expanded
        if cap is not None and self.stats["expanded_bytes"] + expanded > cap:
            raise CorruptInput(f"{what}: expands beyond {cap} bytes (decompression bomb?)", hint=_BOMB_HINT)
        st = _LayerState(i, what)
        for ordinal, ti in enumerate(members):
            try:
                self._apply(st, ti, ordinal)
            except HpcconvError as e:
                raise _in_entry(what, ti, e) from None
        self.stats["members"] += len(members)
        self.stats["expanded_bytes"] += expanded
        self.stats["layers_cached"] += 1
        self._from_cache.add(i)
        return True

    def _apply(self, st: "_LayerState", ti: Member, ordinal: int) -> None:
        kind = entry_type_of(ti)
        parts = clean_name(ti.name)
        if not parts:
            return                                   # the root itself: Docker ignores its attributes
        leaf = parts[-1]
        if parts[0] == WH_PLNK or leaf.startswith(WH_META):
            if leaf == WH_OPAQUE:
                self._opaque(st, parts[:-1])
            else:
                st.aufs += 1
            return
        if leaf.startswith(WH):
            if leaf == WH:
                self._warn(f"{st.what}: bare whiteout {ti.name!r} ignored")
                return
            self._whiteout(st, parts[:-1], leaf[len(WH):])
            return
        if kind is None:
            self._warn(f"{st.what}: entry {ti.name!r} of unsupported tar type {ti.type!r} skipped")
            return
        got = self._walk(parts[:-1], True, st)
        assert got is not None
        d, names = got
        key = "/".join(names + [leaf])
        if key in st.unpacked:
            if __import__("os").environ.get("HPCCONV_ALLOW_DUPLICATES") != "1":
                raise CorruptInput(f"{key!r} appears twice in the layer (Docker refuses such layers)",
                                   hint="HPCCONV_ALLOW_DUPLICATES=1 lets the later entry win")
            self._warn(f"{st.what}: {key!r} appears twice in the layer; the later entry wins")
        existing = d.children.get(leaf)
        xattrs = _xattrs_of(ti)
        if kind == DIR:
            if existing is not None and existing.type == DIR:
                existing.mode, existing.uid, existing.gid, existing.mtime = ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime
                existing.xattrs = xattrs
            else:
                d.children[leaf] = Ino(DIR, ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime, xattrs=xattrs)
        elif kind == HARDLINK:
            self.stats["hardlinks"] += 1
            target = self._link_target(ti.linkname)
            if target is None and self._was_whited(ti.linkname):
                # Docker refuses it (the target is not in the layer); linking to what a whiteout
                # removed would resurrect deleted content under another name
                raise UnsafeInput(f"hardlink to {ti.linkname!r}, which a whiteout deleted")
            if target is None:
                self._warn(f"{st.what}: hardlink {ti.name!r} -> {ti.linkname!r}: target missing; "
                           f"made an empty file")
                d.children[leaf] = Ino(FILE, ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime, xattrs=xattrs)
            elif target.type == DIR:
                raise CorruptInput(f"hardlink to the directory {ti.linkname!r}")
            else:
                target.uid, target.gid = ti.uid, ti.gid
                if target.type != SYMLINK:
                    target.mode, target.mtime = ti.mode & 0o7777, ti.mtime
                target.xattrs.update(xattrs)
                d.children[leaf] = target
        else:
            if kind == SYMLINK and "\0" in ti.linkname:
                raise CorruptInput(f"symlink target {ti.linkname!r} contains a NUL byte")
            size = ti.size if kind == FILE else 0
            mode = 0o777 if kind == SYMLINK else ti.mode & 0o7777      # what lstat shows on Linux
            d.children[leaf] = Ino(kind, mode, ti.uid, ti.gid, ti.mtime,
                                   linkname=ti.linkname if kind == SYMLINK else "",
                                   major=ti.devmajor, minor=ti.devminor, xattrs=xattrs, size=size,
                                   src=(st.index, ordinal) if size else None)
        st.mark(key, names)

    def _link_target(self, linkname: str) -> Ino | None:
        parts = clean_name(linkname)
        if not parts:
            return self.root
        got = self._walk(parts[:-1], False, None)
        if got is None:
            return None
        return got[0].children.get(parts[-1])

    def _was_whited(self, linkname: str) -> bool:
        try:
            parts = clean_name(linkname)
        except HpcconvError:
            return False
        return any("/".join(parts[:j]) in self._whited for j in range(len(parts), 0, -1))

    def _whiteout(self, st: "_LayerState", dparts: list[str], name: str) -> None:
        self.stats["whiteouts"] += 1
        got = self._walk(dparts, True, st)
        assert got is not None
        d, names = got
        key = "/".join(names + [name])
        if key in st.unpacked or key in st.ancestors:
            self._warn(f"{st.what}: whiteout of {key!r} which the same layer creates; whiteouts apply to "
                       f"lower layers only, kept it")
            return
        if d.children.pop(name, None) is not None:
            self._whited.add(key)

    def _opaque(self, st: "_LayerState", dparts: list[str]) -> None:
        got = self._walk(dparts, True, st)
        assert got is not None
        d, names = got
        key = "/".join(names)
        if key in st.opaque_done:
            return
        st.opaque_done.add(key)
        self.stats["opaque"] += 1
        if d.children:
            keys = (f"{key}/{n}" if key else n for n in d.children)
            self._whited.update(k for k in keys if k not in st.unpacked)
        self._prune(st, d, key)

    def _prune(self, st: "_LayerState", top: Ino, top_key: str) -> None:
        """Remove every lower-layer descendant of `top`; keep what this layer wrote."""
        todo = [(top, top_key)]
        while todo:
            d, key = todo.pop()
            for name, child in list(d.children.items()):
                ck = f"{key}/{name}" if key else name
                if ck in st.unpacked:
                    if child.type == DIR:
                        todo.append((child, ck))
                elif ck in st.ancestors and child.type == DIR:
                    # A lower directory this layer only wrote into: it is hidden too, so what
                    # remains is an implied directory holding this layer's entries.
                    child.mode, child.uid, child.gid, child.mtime, child.xattrs = 0o755, 0, 0, 0, {}
                    todo.append((child, ck))
                else:
                    del d.children[name]

    # -- emit pass -------------------------------------------------------------------------------
    def entries(self) -> Iterator[Entry]:
        if self.single_pass:
            yield from self._single_pass()
            return
        self.index()
        t0 = time.monotonic()
        by_type: dict[str, int] = {}
        n_wh = 0
        first: dict[int, str] = {}                       # id(ino) -> first path yielded / to yield
        pending: dict[int, list[str]] = {}              # content inodes: paths in walk order
        needed: dict[int, dict[int, Ino]] = {}          # layer -> ordinal -> inode

        def count(e: Entry) -> Entry:
            by_type[e.type] = by_type.get(e.type, 0) + 1
            return e

        stack: list[tuple[str, Ino]] = [("", self.root)]
        while stack:
            prefix, d = stack.pop()
            subdirs = []
            for name in sorted(d.children):
                ino = d.children[name]
                path = f"{prefix}/{name}" if prefix else name
                if name.startswith(WH):
                    n_wh += 1
                if ino.type == DIR:
                    yield count(self._entry(path, ino))
                    subdirs.append((path, ino))
                elif ino.src is not None:
                    paths = pending.get(id(ino))
                    if paths is None:
                        pending[id(ino)] = [path]
                        needed.setdefault(ino.src[0], {})[ino.src[1]] = ino
                    else:
                        paths.append(path)
                else:
                    k = id(ino)
                    if k in first:
                        yield count(self._entry(path, ino, link=first[k]))
                    else:
                        first[k] = path
                        yield count(self._entry(path, ino))
            stack.extend(reversed(subdirs))
        total = sum(ino.size for want in needed.values() for ino in want.values())
        task = self.reporter.task("flatten: stream content", total=total or None)
        for i in sorted(needed):
            for e in self._stream_layer(i, needed[i], pending):
                yield count(e)
                if e.type == FILE:
                    task.advance(e.size)
        task.done()
        self.stats["by_type"] = by_type
        self.stats["entries"] = sum(by_type.values())
        self._final_checks(n_wh, time.monotonic() - t0)

    def _entry(self, path: str, ino: Ino, link: str | None = None, reader=None) -> Entry:
        if link is not None:
            return Entry(path, HARDLINK, ino.mode, ino.uid, ino.gid, ino.mtime, 0, link, xattrs=dict(ino.xattrs))
        return Entry(path, ino.type, ino.mode, ino.uid, ino.gid, ino.mtime, ino.size if ino.type == FILE else 0,
                     ino.linkname, ino.major, ino.minor, dict(ino.xattrs),
                     reader=(reader if reader is not None else io.BytesIO(b"")) if ino.type == FILE else None)

    def _stream_layer(self, i: int, want: dict[int, Ino], pending: dict[int, list[str]]) -> Iterator[Entry]:
        what = self._what(i)
        self.stats["layers_reread"] += 1
        # Verified in full by the index pass; this pass stops at the last needed member, so a digest
        # could not be checked here anyway. Members are cross-checked (type, size) instead.
        # A layer indexed from the cache was not read in this run: it is read to the end here so that
        # its blob digest is checked after all.
        verify = i in self._from_cache
        raw = self._open(i, verify=verify)
        # provenance only for bytes this read verifies (a mismatch fails the conversion before any
        # block-reuse index is written): a span must never name unverified bytes
        blob = _blob_key(self.image.layers[i].digest) if verify else None
        pf = None
        try:
            ordinal = -1
            left = len(want)
            # decoded_chunks reads `raw` to its end, where a VerifyingReader checks the digest
            pf = _Prefetch(decoded_chunks(raw.read, what), what=what, ahead=_ahead_of(self.image.layers[i].digest))
            buffered = pf.reader()
            members = _members(buffered, what)
            while left:
                tf, ti = next(members, (None, None))
                if ti is None:
                    raise CorruptInput(f"{what}: layer ended early on second read")
                ordinal += 1
                ino = want.get(ordinal)
                if ino is None:
                    continue
                if entry_type_of(ti) != FILE or ti.size != ino.size:
                    raise CorruptInput(f"{what} entry {ti.name!r}: layer changed between reads")
                left -= 1
                paths = pending[id(ino)]
                self.stats["content_bytes"] += ino.size
                end = (blob, tf.offset + ti.size) if blob is not None and ti.sparse is None else None
                yield self._entry(paths[0], ino, reader=_Named(tf.content(ti), what, ti.name, end))
                for p in paths[1:]:
                    yield self._entry(p, ino, link=paths[0])
            if verify:
                while buffered.read(CHUNK):
                    pass
                if not raw.verified:
                    raise CorruptInput(f"{what}: blob was not fully verified")
        except (OSError, EOFError, ValueError) as e:
            raise CorruptInput(f"{what}: cannot read layer: {e}") from None
        finally:
            for c in (pf, raw):
                try:
                    if c is not None:
                        c.close()
                except Exception:
                    pass

    # -- single pass, top layer first ------------------------------------------------------------------
    def _single_pass(self) -> Iterator[Entry]:
        """Each layer read once, the top layer first; an entry is yielded when no higher layer
        replaced, deleted or hid it, so the decompression, hashing and header parsing of the index
        pass are not done twice. Same semantics as the two passes (tests run both): where the
        top-down view cannot know what applying the layers bottom-up gives (a parent that a lower
        layer makes a symlink or a file, a hardlink whose target is in another layer or was
        replaced, a hardlink that changes its target's attributes, HPCCONV_ALLOW_DUPLICATES),
        TwoPassNeeded is raised and the caller flattens again with two passes. Entries come in
        layer order, top first; a parent directory that only a lower layer (or no layer) gives
        comes after the entries below it (every sink accepts that: tar2sqfs, mksquashfs -tar, tar,
        the directory writer)."""
        t0 = time.monotonic()
        layers = self.image.layers
        diff_ids = self._diff_ids()
        if os.environ.get("HPCCONV_ALLOW_DUPLICATES") == "1":
            raise TwoPassNeeded("HPCCONV_ALLOW_DUPLICATES is set")
        td = _TopDown()
        by_type: dict[str, int] = {}
        task = self.reporter.task("flatten: read layers", total=sum(l.descriptor.size for l in layers) or None)
        try:
            for i in reversed(range(len(layers))):
                what = self._what(i)
                st = _LayerState(i, what, layers[i].digest)
                for tr, ti, ordinal in self._layer_members(i, diff_ids[i] if diff_ids else None, task):
                    try:
                        e = self._td_member(td, st, tr, ti, ordinal)
                    except HpcconvError as err:
                        raise _in_entry(what, ti, err) from None
                    if e is not None:
                        by_type[e.type] = by_type.get(e.type, 0) + 1
                        yield e
                td.next_layer(st)
            for e in self._td_relinked(td):
                by_type[e.type] = by_type.get(e.type, 0) + 1
                yield e
            for p in sorted(td.implied):
                if p not in td.seen:            # a parent no layer gave attributes to
                    by_type[DIR] = by_type.get(DIR, 0) + 1
                    yield self._entry(p, _implied_dir())
        finally:
            task.done()
        self._layer_checks(", each read once (top layer first)", bool(diff_ids))
        self.stats["by_type"] = by_type
        self.stats["entries"] = sum(by_type.values())
        self._final_checks(0, time.monotonic() - t0)

    def _td_relinked(self, td: _TopDown) -> Iterator[Entry]:
        """Inodes that live on only under hardlink names (their first name was replaced above): the
        first name gets the content, read again from its layer up to the last such member."""
        by_layer: dict[int, dict[int, Ino]] = {}
        paths: dict[int, list[str]] = {}
        for i, ino, names in td.relinked.values():
            names.sort()
            if ino.src is None:
                yield self._entry(names[0], ino)
                for p in names[1:]:
                    yield self._entry(p, ino, link=names[0])
            else:
                by_layer.setdefault(i, {})[ino.src[1]] = ino
                paths[id(ino)] = names
        for i in sorted(by_layer, reverse=True):
            yield from self._stream_layer(i, by_layer[i], paths)

    def _td_parents(self, td: _TopDown, st: "_LayerState", dparts: list[str], dkey: str, visible: bool) -> None:
        """The directories an entry (or whiteout) of this layer is written into. Each one this layer
        has not given yet has the type the layers below give it, read later: `pending` until one of
        them shows it (a non-directory there, which bottom-up application would follow or replace,
        means two passes). Also for hidden entries: through a symlink they may land elsewhere. Only
        a visible entry's parents are yielded (as implied directories, when no layer gives them)."""
        done = st.parents_ok if visible else st.parents_seen
        if dkey in done:
            return
        p = ""
        for c in dparts:
            p = f"{p}/{c}" if p else c
            if p in st.nondirs:
                raise TwoPassNeeded(f"{st.what}: {p!r} is not a directory but a later entry of the same "
                                    f"layer is written into it")
            if p not in st.dirs:
                td.pending[p] = st.index
                if visible:
                    td.implied.add(p)
        done.add(dkey)

    def _td_member(self, td: _TopDown, st: "_LayerState", tr: TarReader, ti: Member,
                   ordinal: int) -> Entry | None:
        kind = _FROM_TAR.get(ti.type)
        parts = clean_name(ti.name)
        if not parts:
            return None                              # the root itself: Docker ignores its attributes
        leaf = parts[-1]
        dparts = parts[:-1]
        dkey = "/".join(dparts)
        if parts[0] == WH_PLNK or leaf.startswith(WH_META):
            if leaf == WH_OPAQUE:
                if dkey not in st.opaque_done:
                    st.opaque_done.add(dkey)
                    self.stats["opaque"] += 1
                    hidden = (td.parent_hidden(dparts[:-1], "/".join(dparts[:-1])) or dkey in td.gone
                              if dparts else False)
                    self._td_parents(td, st, dparts, dkey, not hidden)
                    if not hidden:
                        st.new_opq.add(dkey)
            else:
                st.aufs += 1
            return None
        if leaf.startswith(WH):
            if leaf == WH:
                self._warn(f"{st.what}: bare whiteout {ti.name!r} ignored")
                return None
            self.stats["whiteouts"] += 1
            hidden = td.parent_hidden(dparts, dkey)
            self._td_parents(td, st, dparts, dkey, not hidden)
            if hidden:
                return None                          # nothing below it is visible anyway
            name = leaf[len(WH):]
            key = f"{dkey}/{name}" if dkey else name
            if key in st.unpacked or key in st.ancestors:
                self._warn(f"{st.what}: whiteout of {key!r} which the same layer creates; whiteouts apply to "
                           f"lower layers only, kept it")
            else:
                st.new_gone.add(key)
            return None
        if kind is None:
            self._warn(f"{st.what}: entry {ti.name!r} of unsupported tar type {ti.type!r} skipped")
            return None
        key = f"{dkey}/{leaf}" if dkey else leaf
        if key in st.unpacked:
            raise CorruptInput(f"{key!r} appears twice in the layer (Docker refuses such layers)",
                               hint="HPCCONV_ALLOW_DUPLICATES=1 lets the later entry win")
        hidden = td.parent_hidden(dparts, dkey) or key in td.gone
        if dparts:
            self._td_parents(td, st, dparts, dkey, not hidden)
        if kind != DIR and key in st.ancestors:
            raise TwoPassNeeded(f"{st.what}: {key!r} replaces a directory the same layer wrote into")
        pend = td.pending.get(key)
        if pend is not None and pend > st.index:
            # hidden or not: what a higher layer wrote into it went where this entry led
            if kind != DIR:
                raise TwoPassNeeded(f"{st.what}: {key!r} is a {kind}, and a higher layer writes into it")
            del td.pending[key]
        st.mark(key, dparts, dkey)
        xattrs = _xattrs_of(ti) if ti.pax_headers else {}
        if kind == DIR:
            st.dirs.add(key)
            if hidden or key in td.seen:
                return None
            td.seen.add(key)
            return Entry(key, DIR, ti.mode & 0o7777, ti.uid, ti.gid, ti.mtime, 0, "", 0, 0, xattrs)
        st.nondirs.add(key)
        st.new_gone.add(key)
        if kind == HARDLINK:
            self.stats["hardlinks"] += 1
            tparts = clean_name(ti.linkname)
            tkey = "/".join(tparts)
            target = st.links.get(tkey)
            if target is not None:
                canon, tkind, uid, gid, mode, mtime, txattrs = target
                if (uid, gid) != (ti.uid, ti.gid) or any(txattrs.get(k) != v for k, v in xattrs.items()) \
                        or (tkind != SYMLINK and (mode, mtime) != (ti.mode & 0o7777, ti.mtime)):
                    raise TwoPassNeeded(f"{st.what}: hardlink {key!r} changes the attributes of {ti.linkname!r}, "
                                        f"which is already yielded")
                st.links[key] = target
                if hidden or key in td.seen:
                    return None
                td.seen.add(key)
                return Entry(key, HARDLINK, mode, uid, gid, mtime, 0, canon, xattrs=dict(txattrs))
            ino = st.shadowed.get(tkey)
            if ino is not None:
                # the target's name is replaced or deleted by a higher layer; the inode lives on under
                # this one: yielded at the end, its content read again from this layer (as moby's
                # createTarFile, the link's owner, mode and mtime apply to the inode)
                ino.uid, ino.gid = ti.uid, ti.gid
                if ino.type != SYMLINK:
                    ino.mode, ino.mtime = ti.mode & 0o7777, ti.mtime
                ino.xattrs.update(xattrs)
                st.shadowed[key] = ino
                if not (hidden or key in td.seen):
                    td.seen.add(key)
                    td.relinked.setdefault(id(ino), (st.index, ino, []))[2].append(key)
                return None
            if not tparts or tkey in st.dirs:
                raise CorruptInput(f"hardlink to the directory {ti.linkname!r}")
            raise TwoPassNeeded(f"{st.what}: hardlink {key!r} -> {ti.linkname!r}: the target is not an "
                                f"earlier entry of the same layer")
        if kind == SYMLINK and "\0" in ti.linkname:
            raise CorruptInput(f"symlink target {ti.linkname!r} contains a NUL byte")
        mode = 0o777 if kind == SYMLINK else ti.mode & 0o7777       # what lstat shows on Linux
        if hidden or key in td.seen:
            # a later hardlink of this layer may still need it
            size = ti.size if kind == FILE else 0
            st.shadowed[key] = Ino(kind, mode, ti.uid, ti.gid, ti.mtime,
                                   linkname=ti.linkname if kind == SYMLINK else "", major=ti.devmajor,
                                   minor=ti.devminor, xattrs=dict(xattrs), size=size,
                                   src=(st.index, ordinal) if size else None)
            return None
        td.seen.add(key)
        st.links[key] = (key, kind, ti.uid, ti.gid, mode, ti.mtime, xattrs)
        if kind == FILE:
            size = ti.size
            self.stats["content_bytes"] += size
            if size:
                # the content's place in the decoded layer (contiguous unless the member is sparse)
                end = (st.blob, tr.offset + size) if st.blob is not None and ti.sparse is None else None
                reader = _Named(tr.content(ti), st.what, ti.name, end)
            else:
                reader = io.BytesIO(b"")
            return Entry(key, FILE, mode, ti.uid, ti.gid, ti.mtime, size, "", ti.devmajor, ti.devminor,
                         dict(xattrs), reader=reader)
        return Entry(key, kind, mode, ti.uid, ti.gid, ti.mtime, 0, ti.linkname if kind == SYMLINK else "",
                     ti.devmajor, ti.devminor, dict(xattrs))

    def _final_checks(self, n_wh: int, duration: float) -> None:
        s = self.stats
        self.checks.add(STAGE, "whiteouts", FAIL if n_wh else PASS,
                        f"{s['whiteouts']} whiteout(s) and {s['opaque']} opaque dir(s) applied; "
                        f"{n_wh} whiteout name(s) left in the output")
        self.checks.add(STAGE, "paths inside root", PASS, "every entry is relative to the root, no '..'")
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(s["by_type"].items()))
        self.checks.add(STAGE, "entries", PASS,
                        f"{s['entries']} entries ({kinds}) from {s['members']} layer members; "
                        f"{s['layers_reread']} of {s['layers']} layer(s) re-read for content", duration)
        if s["warnings"]:
            more = f" (+{s['warnings'] - len(self.warnings)} more)" if s["warnings"] > len(self.warnings) else ""
            self.checks.add(STAGE, "repairs", WARN, "; ".join(self.warnings[:5]) + more)


class TwoPassNeeded(BaseException):
    """The single top-down pass met a layer whose effect it cannot decide from above (a parent that a
    lower layer makes a symlink, a hardlink into another layer, ...): flatten again with two passes.
    Raised before the entry concerned is yielded, but after others were: the consumer must start
    over (`pipeline.flatten_into` does). A BaseException, so that no `except Exception` between the
    flattener and the consumer's caller turns it into an error."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _TopDown:
    """What the layers above the current one decided, for the single top-down pass."""

    __slots__ = ("seen", "gone", "opq", "pending", "implied", "hcache", "relinked")

    def __init__(self):
        self.seen: set[str] = set()          # paths a higher layer (or this one) gave an entry
        self.gone: set[str] = set()          # deleted for lower layers: whiteouts, non-directories
        self.opq: set[str] = set()           # directories whose lower-layer children are hidden
        self.pending: dict[str, int] = {}    # implied parent -> lowest layer that wrote under it
        self.implied: set[str] = set()       # every parent some layer wrote under
        self.hcache: dict[str, bool] = {}    # parent_hidden, for the current layer
        self.relinked: dict[int, tuple] = {} # id(ino) -> (layer, ino, hardlink names yielded at the end)

    def parent_hidden(self, dparts: list[str], dkey: str) -> bool:
        """Whether everything below the directory `dkey` is hidden from the current layer: the
        directory or one of its ancestors was deleted or made opaque above."""
        v = self.hcache.get(dkey)
        if v is not None:
            return v
        if not self.gone and not self.opq:
            return False
        v = "" in self.opq
        p = ""
        for c in dparts:
            p = f"{p}/{c}" if p else c
            got = self.hcache.get(p)
            if got is None:
                got = self.hcache[p] = v or p in self.gone or p in self.opq
            v = got
        return v

    def next_layer(self, st: "_LayerState") -> None:
        if st.new_gone or st.new_opq:
            self.gone |= st.new_gone
            self.opq |= st.new_opq
            self.hcache = {}


def _blob_key(digest: str) -> bytes | None:
    """A layer blob's sha256 as bytes (content provenance, see _Named), if it is a sha256 digest."""
    algo, _, hexd = digest.partition(":")
    try:
        return bytes.fromhex(hexd) if algo == "sha256" and len(hexd) == 64 else None
    except ValueError:
        return None


class _LayerState:
    """Per-layer bookkeeping: paths this layer wrote, their ancestors, implied dirs, opaque dirs."""

    __slots__ = ("index", "what", "blob", "unpacked", "ancestors", "implied", "opaque_done", "aufs",
                 "dirs", "nondirs", "links", "shadowed", "parents_ok", "parents_seen", "new_gone", "new_opq")

    def __init__(self, index: int, what: str, digest: str = ""):
        self.index, self.what = index, what
        # the blob's sha256 as bytes (content provenance, see _Named), if it is a sha256 digest
        self.blob = _blob_key(digest)
        self.unpacked: set[str] = set()
        self.ancestors: set[str] = set()
        self.implied: set[str] = set()
        self.opaque_done: set[str] = set()
        self.aufs = 0
        # the single top-down pass only
        self.dirs: set[str] = set()              # directories this layer has given so far
        self.nondirs: set[str] = set()           # everything else it has given
        self.links: dict[str, tuple] = {}        # yielded non-directories: hardlink targets
        self.shadowed: dict[str, Ino] = {}       # the others, for hardlinks to them
        self.parents_ok: set[str] = set()        # parent paths already checked (visible entries)
        self.parents_seen: set[str] = set()      # the same, for hidden ones
        self.new_gone: set[str] = set()          # what this layer deletes for the layers below
        self.new_opq: set[str] = set()

    def mark(self, key: str, names: list[str], parent: str | None = None) -> None:
        """`key` given by this layer, its parent directories (`names`, joined: `parent`) below it."""
        self.unpacked.add(key)
        if not names or parent in self.ancestors:
            return                               # (the common case: a sibling came first)
        for j in range(len(names), 0, -1):
            a = "/".join(names[:j])
            if a in self.ancestors:
                break
            self.ancestors.add(a)
