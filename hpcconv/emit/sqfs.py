"""hpcconv's own SquashFS 4.0 writer: an entry stream (entries.py) straight into an image.

Why not only `tar2sqfs`: piping the stream as a tar into it costs a tar header per entry, a copy of
every byte through a pipe and tar2sqfs's own parsing, and it cannot reuse anything of an earlier
image. Here the content goes from the layer reader to the compressor threads with no copy but the
block cut, only the metadata (about 100 bytes an entry) is built in Python, and the compressed
blocks of earlier images are reused (`BlockReuse`). The external tools stay available
(HPCCONV_SQUASHFS_BUILDER=external, and for xz/lz4/lzo).

Layout (as the kernel's fs/squashfs and squashfs-tools read it; https://dr-emann.github.io/squashfs/):
superblock (96 bytes), compressor options, data and fragment blocks, inode table, directory table,
fragment table (metadata blocks, then their index), id table (same), xattr key/value blocks, xattr
id table and its header; the whole padded to 4 KiB. The kernel checks that order (each table must
end before the next starts), so it is kept.

* Data: each file's content is cut into `block_size` blocks, compressed on `jobs` threads
  (zstandard and zlib release the GIL) and written in stream order. A block that does not shrink is
  stored raw (bit 24 of its size); an all-zero full block is a hole (size 0, nothing written).
  Files smaller than one block go into shared fragment blocks; a bigger file's last partial block
  is a short block of its own (mksquashfs's default, not -always-use-fragments). Small files are
  hashed on the pool in batches and packed into fragments in stream order (a fragment also ends
  after a file whose hash says so, see FRAGMENT_CUT, so reuse survives added files); a
  fragment block is written right after the batch that filled it, so the image never depends on
  which thread finished first (byte-reproducible, like tar2sqfs's).
* Duplicates (the DUPLICATES flag): a file whose blocks (the content key of each uncompressed
  block, `key_of`) equal an earlier file's points at those and its own copy is cut off the end of
  the output again; a small file whose content equals an earlier one's shares its fragment.
* Metadata: inodes are written children first, so every directory's listing can name its entries'
  inode positions; inode numbers are given in that same order beforehand, so a directory can name
  its parent's. Directory entries are sorted by name bytes; a run of entries shares one header while
  it stays within 256 entries, one inode metadata block and +-32767 inode numbers. Extended inodes
  where the basic ones cannot hold the value (xattrs, hard links, sparse files, large sizes and
  offsets, directories whose listing is over 64 KiB). The compressor level is recorded in the
  compressor options, as mksquashfs and tar2sqfs do (`unsquashfs -s` shows it).
* Stream semantics as the other sinks: a directory met again (or after its children) only sets its
  attributes (tar2sqfs does that for a directory it made implicitly and refuses one named twice);
  parents the stream never names are made 0755 root:root with time 0; a
  hardlink names an earlier entry (not a directory); any other repeated path is an error.
  xattrs outside user./trusted./security. are dropped by the caller (`sinks._sqfs_entries`).

What it does not write: an NFS export table and directory indexes (a lookup in a huge directory
scans its listing), as tar2sqfs by default.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from ..cachefiles import read_trusted, write_atomic
from ..entries import BLOCK, CHAR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry, provenance_of, raw, read_full, reader_of
from ..errors import CorruptInput, UsageError
from ..flatten import READ_AHEAD
from ..speedups import native
from .sinks import cores

SUPERBLOCK = struct.Struct("<IIIIIHHHHHHQQQQQQQQ")
assert SUPERBLOCK.size == 96
MAGIC = 0x73717368
COMPRESSORS = {"gzip": 1, "zstd": 6}
META_SIZE = 8192
NO_INDEX = 0xFFFFFFFF
NO_TABLE = 0xFFFFFFFFFFFFFFFF
RAW_BLOCK = 1 << 24
RAW_META = 0x8000
FLAG_DUPLICATES = 0x0040
FLAG_NO_XATTRS = 0x0200
FLAG_COMPRESSOR_OPTIONS = 0x0400
DEFAULT_LEVELS = {"gzip": 9, "zstd": 15}
PAD = 4096
# Jobs for the pool: up to GROUP blocks of a file, small files of BATCH blocks' worth. Every job is
# a GIL re-take for a pool thread, up to a switch interval while the main thread runs Python: fewer,
# bigger jobs measured cold 11.8-12.3 s against 13.0-14.1 s (benchmark image, 2 vCPUs).
GROUP = 4
BATCH = 4
# A fragment block also ends after a small file whose key starts with a multiple of FRAGMENT_CUT
# (1 in 128 files): where fragments end then depends on the files themselves, not only on
# everything before them, so after a changed or added small file the packing falls back into step
# with an earlier image's within a few blocks and the rest of its fragment blocks can be reused
# (with "full" as the only rule, that happens by chance when file sizes vary, but never when they
# are alike: one file added shifts every later fragment). On the benchmark image: 705 fragment
# blocks instead of 533, an image 0.13 % bigger.
FRAGMENT_CUT = 128

try:
    from blake3 import blake3 as _blake3
except ImportError:             # (a platform without its wheel: sha256, and indexes of their own)
    _blake3 = None
# Content keys: what dedup and block reuse find blocks and small files by, and the digest that checks
# a block read back from an earlier image. Any collision-resistant hash serves (the keys never leave
# this writer and its reuse indexes, whose directory names the hash: settings_name); BLAKE3 hashes a
# 1 MiB block ~4x faster than sha256 with SHA-NI (7 against 1.8 GB/s a core here), which was a fifth
# of the pool's time on a cold conversion. The layer digests and diff_ids stay sha256 (OCI's).
KEY_HASH = "blake3" if _blake3 is not None else "sha256"


def key_of(data) -> bytes:
    """The 32-byte content key of `data` (bytes-like)."""
    if _blake3 is not None:
        return _blake3(data).digest()
    return hashlib.sha256(data).digest()

# inode types (basic; the extended one is basic + 7)
T_DIR, T_FILE, T_SYMLINK, T_BLOCK, T_CHAR, T_FIFO, T_SOCKET = 1, 2, 3, 4, 5, 6, 7
_TYPES = {DIR: T_DIR, FILE: T_FILE, SYMLINK: T_SYMLINK, BLOCK: T_BLOCK, CHAR: T_CHAR, FIFO: T_FIFO}
_XATTR_PREFIXES = ((b"user.", 0), (b"trusted.", 1), (b"security.", 2))

_INODE_HEAD = struct.Struct("<HHHHII")
_DIR_BASIC = struct.Struct("<IIHHI")
_DIR_EXT = struct.Struct("<IIIIHHI")
_FILE_BASIC = struct.Struct("<IIII")
_FILE_EXT = struct.Struct("<QQQIIII")
_DIR_HEADER = struct.Struct("<III")
_DIR_ENTRY = struct.Struct("<HhHH")


def compressor(name: str, level: int | None):
    """A thread-safe `compress(bytes) -> bytes` for SquashFS blocks (zlib streams for "gzip", as the
    kernel's and mksquashfs's gzip compressor use; zstd frames)."""
    if name == "gzip":
        lvl = 9 if level is None else level
        return lambda data: zlib.compress(data, lvl)
    if name == "zstd":
        import zstandard

        local = threading.local()
        lvl = 15 if level is None else level

        def compress(data):
            c = getattr(local, "c", None)
            if c is None:
                c = local.c = zstandard.ZstdCompressor(level=lvl)
            return c.compress(data)
        return compress
    raise ValueError(f"hpcconv's SquashFS writer has no {name} compressor")


_native_tables = native.sqfs_tables if native is not None else None
_sync_range = getattr(native, "sync_range", None)
FLUSH_STEP = 16 << 20


def _start_writeback(fd: int, offset: int, n: int) -> None:
    """Start the write-back of a range (a hint: errors show at the caller's fsync, if anywhere)."""
    with contextlib.suppress(OSError):
        _sync_range(fd, offset, n)


class _Meta:
    """Metadata blocks: 8 KiB of uncompressed bytes each, behind a 2-byte length."""

    def __init__(self, compress):
        self.compress = compress
        self.out = bytearray()
        self.buf = bytearray()
        self.starts: list[int] = []

    def ref(self) -> int:
        """Where the next byte goes: (start of its block in this table << 16) | offset in the block."""
        return (len(self.out) << 16) | len(self.buf)

    def add(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= META_SIZE:
            self._flush(META_SIZE)

    def _flush(self, n: int) -> None:
        chunk = bytes(self.buf[:n])
        del self.buf[:n]
        self.starts.append(len(self.out))
        packed = self.compress(chunk)
        if len(packed) < len(chunk):
            self.out += struct.pack("<H", len(packed)) + packed
        else:
            self.out += struct.pack("<H", len(chunk) | RAW_META) + chunk

    def finish(self) -> bytes:
        if self.buf:
            self._flush(len(self.buf))
        return bytes(self.out)


class _Node:
    __slots__ = ("type", "mode", "uid", "gid", "mtime", "xattrs", "nlink", "children", "size", "start",
                 "blocks", "frag", "sparse", "target", "rdev", "ref", "number", "digests", "pdigests", "spans")

    def __init__(self, t: int, e: Entry | None):
        self.type = t
        self.nlink = 1
        self.children: dict[bytes, _Node] | None = {} if t == T_DIR else None
        self.size = 0
        self.start = 0
        self.blocks: list[int] | None = None
        self.frag = (NO_INDEX, 0)
        self.sparse = 0
        self.target = b""
        self.rdev = 0
        self.ref = 0
        self.number = 0
        self.digests: list[bytes] | None = None
        self.pdigests: list[bytes | None] | None = None
        if e is None:
            self.mode, self.uid, self.gid, self.mtime, self.xattrs = 0o755, 0, 0, 0, None
        else:
            self.set_attrs(e)

    def set_attrs(self, e: Entry) -> None:
        if not (0 <= e.uid <= 0xFFFFFFFF and 0 <= e.gid <= 0xFFFFFFFF):
            raise CorruptInput(f"entry {e.path!r} has an owner id SquashFS cannot store ({e.uid}:{e.gid})")
        self.mode = e.mode & 0o7777
        self.uid, self.gid = e.uid, e.gid
        self.mtime = min(max(int(e.mtime), 0), 0xFFFFFFFF)
        self.xattrs = e.xattrs or None


def _hashes(batch: list[tuple[_Node, bytes, bytes | None, bytes | None]]) -> tuple[int, list[bytes], None, None, bool]:
    return 0, [key if key is not None else key_of(data) for _, data, _, key in batch], None, None, False


_SPAN = struct.Struct("<QQ")
_ZERO_KEY = b"\0" * 32


def _span(blob: bytes, offset: int, length: int) -> bytes:
    """The key of `length` bytes at `offset` of a layer blob's decoded stream (blob: its sha256)."""
    return blob + _SPAN.pack(offset, length)


def _read_exact(read, n: int, path: str) -> bytes:
    data = read_full(read, n)
    if len(data) < n:
        raise CorruptInput(f"content of {path} ended {n - len(data)} bytes early")
    return data


class SquashWriter:
    """Write a SquashFS image into `fd` at `base` (0 for a plain image, the partition offset in a
    SIF). `add(entry)` for each entry of the stream, then `finish()`; on error `abort()`."""

    def __init__(self, fd: int, base: int = 0, *, compression: str = "zstd", level: int | None = None,
                 block_size: int = 1 << 20, jobs: int | None = None, mod_time: int = 0,
                 root_mtime: int = 0, clamp_mtime: int | None = None, progress=None,
                 reuse: "BlockReuse | None" = None, flush_behind: bool = False):
        if block_size & (block_size - 1) or not 4096 <= block_size <= 1 << 20:
            raise UsageError(f"SquashFS block size must be a power of 2 from 4 KiB to 1 MiB, not {block_size}")
        self.fd, self.base = fd, base
        self.comp_id = COMPRESSORS[compression]
        self.compress = compressor(compression, level)
        # the level, as mksquashfs and tar2sqfs record it (unsquashfs -s shows it), in an uncompressed
        # metadata block after the superblock: gzip level, window 15, no strategies; zstd level
        level = DEFAULT_LEVELS[compression] if level is None else level
        opts = struct.pack("<IHH", level, 15, 0) if compression == "gzip" else struct.pack("<I", level)
        self.options = struct.pack("<H", len(opts) | RAW_META) + opts
        self.block_size = block_size
        self.jobs = jobs or cores()
        self.pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="sqfs")
        self.window = 2 * self.jobs + 2           # jobs in flight (memory: up to GROUP blocks each)
        self.pending: deque = deque()
        self.in_flight = 0
        self.mod_time = mod_time
        self.clamp = clamp_mtime
        self.root = _Node(T_DIR, None)
        self.root.mtime = root_mtime
        self.nodes: dict[str, _Node] = {"": self.root}
        self.pos = SUPERBLOCK.size + len(self.options)   # relative to base
        self.zero = bytes(block_size)
        self.runs: dict[bytes, tuple[int, list[int], int]] = {}   # block-run digest -> (start, sizes, sparse)
        self.tails: dict[bytes, tuple[int, int]] = {}             # small file's key -> fragment
        self.batch: list[tuple[_Node, bytes, bytes | None, bytes | None]] = []   # small files not yet hashed
        self.batch_bytes = 0
        self.frag_parts: list[bytes] = []                          # the fragment block being filled
        self.frag_len = 0
        self.frags: list[tuple[int, int] | None] = []             # fragment index -> (start, size field)
        self.frag_new: list = []                                   # fragment jobs to queue next
        self.count = 0
        self.progress = progress or (lambda n: None)
        self.reuse = reuse
        self.records: list[bytes] = []                             # what a later run may reuse
        # where content came from (a span of a layer, see _span) -> its key, from earlier images'
        # indexes: a block or small file whose span is known needs no hashing; and what this image adds
        self.known: dict[bytes, bytes] = reuse.known if reuse is not None else {}
        self.span_records: list[bytes] = []
        self.blocks_written = self.blocks_reused = 0      # blocks in the image; of them, taken from an earlier one
        self.run_reused = 0                                  # reused blocks of the file being written
        self.data_blocks = [0, 0]                            # files' blocks so far: [compressed, reused]
        self.compressions_saved = 0                          # blocks not compressed thanks to reuse
        self.reuse_note = ""
        self.frag_keys: list[bytes] = []
        # for a caller that fsyncs the image at its end (the SIF sink): the write-back of what is
        # written is started every FLUSH_STEP bytes on a pool thread, so that the fsync waits for
        # the tail only (without: 0.15 s at the very end for the benchmark image's 362 MB)
        self.flushed = self.base + self.pos if flush_behind and _sync_range is not None else None
        os.ftruncate(fd, base + self.pos)

    # -- the stream --------------------------------------------------------------------------------------
    def _parent(self, path: str) -> tuple[_Node, bytes]:
        head, _, name = path.rpartition("/")
        parent = self.nodes.get(head)
        if parent is None:
            parent = self._implicit(head)
        elif parent.type != T_DIR:
            raise CorruptInput(f"entry {path!r} is below {head!r}, which is not a directory")
        return parent, self._name(name, path)

    @staticmethod
    def _name(name: str, path: str) -> bytes:
        bname = raw(name)             # (not os.fsencode: that follows the locale)
        if len(bname) > 255:
            raise CorruptInput(f"entry {path!r}: a name is longer than 255 bytes")
        return bname

    def _implicit(self, path: str) -> _Node:
        """The directory at `path` and any missing parents of it, made as 0755 root:root, time 0
        (iteratively: a stream may name a file thousands of directories deep first)."""
        missing = [path]
        head = path.rpartition("/")[0]
        while head and head not in self.nodes:
            missing.append(head)
            head = head.rpartition("/")[0]
        parent = self.nodes[head]
        for p in reversed(missing):
            if parent.type != T_DIR:
                raise CorruptInput(f"entry {path!r} is below {p.rpartition('/')[0]!r}, which is not a directory")
            node = _Node(T_DIR, None)
            parent.children[self._name(p.rpartition("/")[2], p)] = node
            self.nodes[p] = node
            parent = node
        return parent

    def add(self, e: Entry) -> None:
        path = e.path
        old = self.nodes.get(path)
        if old is not None:
            if e.type == DIR and old.type == T_DIR:
                old.set_attrs(e)
                self._clamp(old)
                self.count += 1
                return
            raise CorruptInput(f"entry {path!r} appears twice in the stream")
        parent, name = self._parent(path)
        t = e.type
        if t == HARDLINK:
            node = self.nodes.get(e.linkname)
            if node is None:
                raise CorruptInput(f"hardlink {path!r} names {e.linkname!r}, which is not an earlier entry")
            if node.type == T_DIR:
                raise CorruptInput(f"hardlink {path!r} names a directory ({e.linkname!r})")
            node.nlink += 1
        else:
            if t not in _TYPES:
                raise CorruptInput(f"entry {path!r} has a type SquashFS cannot store ({t})")
            node = _Node(_TYPES[t], e)
            self._clamp(node)
            if t == FILE:
                self._file(node, e)
            elif t == SYMLINK:
                node.target = raw(e.linkname)
            elif t in (CHAR, BLOCK):
                node.rdev = (e.devminor & 0xFF) | ((e.devmajor & 0xFFF) << 8) | ((e.devminor & ~0xFF) << 12)
        parent.children[name] = node
        self.nodes[path] = node
        self.count += 1

    def _clamp(self, node: _Node) -> None:
        if self.clamp is not None and node.mtime > self.clamp:
            node.mtime = self.clamp

    def _origin(self, e: Entry) -> tuple[bytes, int] | None:
        """The provenance of the content about to be read (flatten._Named.provenance), when reuse
        is on: blocks are then keyed by where they come from as well as by their hash."""
        return provenance_of(e.reader) if self.reuse is not None else None

    def _file(self, node: _Node, e: Entry) -> None:
        size = node.size = e.size
        if size == 0:
            node.blocks = []
            return
        # blocks may be memoryviews of the decoded layer (no copy); each keeps its decoded chunk alive
        # until compressed: a job's blocks are consecutive (one or two chunks), so the window of
        # jobs in flight holds at most ~2 chunks a job (measured: the same peak RSS as copies)
        read = reader_of(e.reader)
        bs = self.block_size
        origin = self._origin(e)
        if size < bs:
            data = _read_exact(read, size, e.path)
            node.blocks = []
            if origin is None:
                self.batch.append((node, data, None, None))
            else:
                span = _span(origin[0], origin[1], size)
                self.batch.append((node, data, span, self.known.get(span)))
            self.batch_bytes += size
            if self.batch_bytes >= BATCH * bs:
                self._submit_batch()
            self.progress(size)
            return
        node.blocks = []
        node.digests = []
        node.pdigests = []
        node.spans = spans = [] if origin is not None else None
        known = self.known if spans is not None else None
        left = size
        group: list[bytes] = []
        while left > 0:
            data = _read_exact(read, min(bs, left), e.path)
            if spans is not None:
                spans.append(_span(origin[0], origin[1] + size - left, len(data)))
            left -= len(data)
            group.append(data)
            if len(group) == GROUP or not left:
                # the keys an earlier image recorded for these blocks' spans (None: hash them)
                keys = [known.get(s) for s in spans[-len(group):]] if known else None
                self._queue(("b", node, self.pool.submit(self._blocks, group, keys)))
                group = []
            self.progress(len(data))
        self._queue(("e", node, None))

    def _blocks(self, group: list[bytes], keys: list[bytes | None] | None) -> list:
        if keys is None:
            return [self._block(data, None) for data in group]
        return [self._block(data, key) for data, key in zip(group, keys)]

    def _block(self, data: bytes | list[bytes], key: bytes | None):
        """(size field, bytes to write, key, key_of those bytes or None, reused) of one data or
        fragment block (a fragment comes as its parts); runs on a pool thread. The key is key_of
        the uncompressed bytes (a fragment's: of its parts' keys); given, when an earlier
        image recorded it for the block's span (never for an all-zero block, see _end_run)."""
        if key is None:
            if len(data) == self.block_size and self.zero.startswith(data):     # (memoryview == is slow)
                return 0, b"", _ZERO_KEY, None, False
            key = key_of(data)
        if self.reuse is not None:
            hit = self.reuse.read(key)
            if hit is not None:
                return hit[0], hit[1], key, hit[2], True
        if isinstance(data, list):
            data = b"".join(data)
        packed = self.compress(data)
        if len(packed) < len(data):
            size, payload = len(packed), packed
        else:
            size, payload = len(data) | RAW_BLOCK, data
        return size, payload, key, key_of(payload) if self.reuse is not None else None, False

    def _submit_batch(self) -> None:
        """Small files go to the pool in batches of about a block to be hashed (for dedup) there,
        not on this thread; they are packed into fragments in stream order when the hashes are back."""
        if self.batch:
            batch = self.batch
            self.batch, self.batch_bytes = [], 0
            self._queue(("s", batch, self.pool.submit(_hashes, batch)))

    def _pack(self, batch: list[tuple[_Node, bytes, bytes | None, bytes | None]], digests: list[bytes]) -> None:
        for (node, data, span, _), key in zip(batch, digests):
            if span is not None:
                self.span_records.append(span + key)
            known = self.tails.get(key)
            if known is not None:
                node.frag = known
                continue
            if self.frag_len + len(data) > self.block_size:
                self._flush_fragment()
            node.frag = (len(self.frags), self.frag_len)
            self.tails[key] = node.frag
            self.frag_parts.append(data)
            self.frag_keys.append(key)
            self.frag_len += len(data)
            if key[0] % FRAGMENT_CUT == 0:
                self._flush_fragment()

    def _flush_fragment(self) -> None:
        if not self.frag_parts:
            return
        parts = self.frag_parts
        key = key_of(b"fragment:" + b"".join(self.frag_keys))
        self.frag_parts, self.frag_keys, self.frag_len = [], [], 0
        self.frags.append(None)
        self.frag_new.append(("f", len(self.frags) - 1, self.pool.submit(self._block, parts, key)))

    # -- ordered output --------------------------------------------------------------------------------
    def _queue(self, item) -> None:
        self.pending.append(item)
        if item[2] is not None:
            self.in_flight += 1
        self._drain(self.in_flight > self.window)

    def _drain(self, wait: bool, everything: bool = False) -> None:
        """Write what is done at the head of the queue; with `wait`, wait until no more than the
        window is in flight; with `everything`, until the queue is empty."""
        pending = self.pending
        wait = wait or everything
        while pending:
            kind, node, fut = pending[0]
            if fut is not None:
                if not wait and not fut.done():
                    return
                result = fut.result()
                self.in_flight -= 1
                wait = everything or self.in_flight > self.window
            pending.popleft()
            if kind == "b":
                if not node.blocks:
                    node.start = self.pos
                for size, payload, digest, pdigest, reused in result:
                    node.blocks.append(size)
                    node.digests.append(digest)
                    node.pdigests.append(pdigest)
                    self.run_reused += reused
                    if size == 0:
                        node.sparse += self.block_size
                    else:
                        self._write(payload)
                        self.data_blocks[reused] += 1
                continue
            if fut is not None:
                size, payload, digest, pdigest, reused = result
            if kind == "f":
                self.frags[node] = (self.pos, size)
                self.blocks_reused += reused
                self.compressions_saved += reused
                self._record(digest, self.pos, size, pdigest)
                self._write(payload)
            elif kind == "s":
                self._pack(node, payload)
                self._queue_fragments()
            else:   # end of a file's blocks
                self._end_run(node)

    def _queue_fragments(self) -> None:
        """Fragment blocks filled from a batch are written right after it: a place fixed by the
        stream alone (the image must not depend on thread timing) and never inside a file's run
        of blocks (a batch is queued between files)."""
        if self.frag_new:
            self.pending.extendleft(reversed(self.frag_new))
            self.in_flight += len(self.frag_new)
            self.frag_new = []

    def _write(self, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            n = os.pwrite(self.fd, view, self.base + self.pos)
            self.pos += n
            view = view[n:]
        if self.flushed is not None and self.base + self.pos - self.flushed >= FLUSH_STEP:
            end = self.base + self.pos
            self.pool.submit(_start_writeback, self.fd, self.flushed, end - self.flushed)
            self.flushed = end

    def _end_run(self, node: _Node) -> None:
        key = key_of(b"".join(node.digests) + struct.pack("<Q", node.size))
        digests, pdigests = node.digests, node.pdigests
        node.digests = node.pdigests = None
        if node.spans is not None:
            for span, k in zip(node.spans, digests):
                if k != _ZERO_KEY:                # (an all-zero block is found without hashing it)
                    self.span_records.append(span + k)
            node.spans = None
        reused, self.run_reused = self.run_reused, 0
        self.compressions_saved += reused
        known = self.runs.get(key)
        if known is None:
            self.blocks_reused += reused          # (a duplicate's blocks are cut off again: not counted)
            self.runs[key] = (node.start, node.blocks, node.sparse)
            pos = node.start
            for size, k, pd in zip(node.blocks, digests, pdigests):
                if size:
                    self._record(k, pos, size, pd)
                    pos += size & ~RAW_BLOCK
            return
        self.pos = node.start                     # the copy just written is cut off again
        os.ftruncate(self.fd, self.base + self.pos)
        node.start, node.blocks, node.sparse = known

    def _record(self, key: bytes, pos: int, size: int, pdigest: bytes | None) -> None:
        self.blocks_written += 1
        if self.reuse is not None and pdigest is not None:
            self.records.append(_REUSE_RECORD.pack(key, pos, size, pdigest))

    def read_ahead(self, digest: str) -> int | None:
        """How many decoded chunks the decoder of layer `digest` may run ahead now (flatten.READ_AHEAD,
        asked from the decoder's thread): READ_AHEAD_DEEP while this writer takes the blocks of
        that layer's files from an earlier image (the jobs in its window, which hold decoded
        chunks, come back at once), else the default, so that memory stays as bounded as on a
        cold conversion: not for a layer no earlier image was made of, not once a recorded block
        failed to read back (that image changed in place), and not while more blocks are
        compressed than reused (content the earlier images did not have)."""
        reuse = self.reuse
        if reuse is None or reuse.missed or digest not in reuse.known_blobs:
            return None
        made, taken = self.data_blocks
        return READ_AHEAD_DEEP if made <= taken + DEEP_SLACK else None

    # -- the end ---------------------------------------------------------------------------------------
    def abort(self) -> None:
        for _, _, fut in self.pending:
            if fut is not None:
                fut.cancel()
        for _, _, fut in self.frag_new:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def finish(self) -> int:
        """Write everything after the data, then the superblock. Returns the image size (padded)."""
        self._submit_batch()
        self._drain(True, everything=True)
        self._flush_fragment()
        self._queue_fragments()
        self._drain(True, everything=True)
        self.pool.shutdown(wait=True)          # (write-backs started behind the data are done too)
        self.flushed = None                    # the tables are the caller's fsync's to write
        order = self._order()
        for i, node in enumerate(order, 1):
            node.number = i
        inode_table, dir_table, ids, xattr_sets = self._tables(order)
        inode_start = self.pos
        self._write(inode_table)
        dir_start = self.pos
        self._write(dir_table)
        frag_start = self._table(b"".join(struct.pack("<QII", s, z, 0) for s, z in self.frags))
        id_list = sorted(ids, key=ids.get)
        id_start = self._table(struct.pack(f"<{len(id_list)}I", *id_list))
        xattr_start = self._xattrs(xattr_sets) if xattr_sets else NO_TABLE
        used = self.pos
        pad = -used % PAD
        if pad:
            self._write(bytes(pad))
        flags = FLAG_DUPLICATES | FLAG_COMPRESSOR_OPTIONS | (0 if xattr_sets else FLAG_NO_XATTRS)
        sb = SUPERBLOCK.pack(MAGIC, len(order), self.mod_time, self.block_size, len(self.frags), self.comp_id,
                             self.block_size.bit_length() - 1, flags, len(id_list), 4, 0, self.root.ref, used,
                             id_start, xattr_start, inode_start, dir_start, frag_start, NO_TABLE)
        os.pwrite(self.fd, sb + self.options, self.base)
        return used + pad

    def _tables(self, order: list[_Node]) -> tuple[bytes, bytes, dict[int, int], dict[tuple, int]]:
        """The inode table and the directory table (sets each node's ref), with the owner ids and
        xattr sets they index. In C when the module is built (the same bytes; None from it where
        something is out of the ordinary, and this code does it all)."""
        parents: dict[int, int] = {id(self.root): len(order) + 1}
        for node in order:
            if node.type == T_DIR:
                for child in node.children.values():
                    if child.type == T_DIR:
                        parents[id(child)] = node.number
        if _native_tables is not None:
            got = _native_tables(order, [parents.get(id(n), 0) for n in order], self.compress)
            if got is not None:
                return got
        ids: dict[int, int] = {}
        xattr_sets: dict[tuple, int] = {}
        inodes = _Meta(self.compress)
        dirs = _Meta(self.compress)
        for node in order:
            if node.type == T_DIR:
                listing_ref = dirs.ref()
                listing = self._listing(node)
                dirs.add(listing)
                self._inode(inodes, node, ids, xattr_sets, listing_ref, len(listing), parents[id(node)])
            else:
                self._inode(inodes, node, ids, xattr_sets, 0, 0, 0)
        return inodes.finish(), dirs.finish(), ids, xattr_sets

    def _order(self) -> list[_Node]:
        """Every inode once, children before their directory, directories' entries in name order."""
        order: list[_Node] = []
        seen: set[int] = set()
        stack = [(self.root, iter(sorted(self.root.children.items())))]
        while stack:
            node, it = stack[-1]
            for _, child in it:
                if id(child) in seen:
                    continue
                seen.add(id(child))
                if child.type == T_DIR:
                    stack.append((child, iter(sorted(child.children.items()))))
                    break
                order.append(child)
            else:
                stack.pop()
                order.append(node)
        return order

    def _listing(self, node: _Node) -> bytes:
        out = []
        run: list[bytes] = []
        block = base = -1
        for name, child in sorted(node.children.items()):
            cblock, coff = child.ref >> 16, child.ref & 0xFFFF
            if not run or cblock != block or len(run) == 256 or abs(child.number - base) > 32767:
                if run:
                    out.append(_DIR_HEADER.pack(len(run) - 1, block, base))
                    out.extend(run)
                run, block, base = [], cblock, child.number
            run.append(_DIR_ENTRY.pack(coff, child.number - base, child.type, len(name) - 1) + name)
        if run:
            out.append(_DIR_HEADER.pack(len(run) - 1, block, base))
            out.extend(run)
        return b"".join(out)

    def _inode(self, meta: _Meta, node: _Node, ids: dict, xattr_sets: dict, listing_ref: int, listing_len: int,
               parent: int) -> None:
        uid = ids.setdefault(node.uid, len(ids))
        gid = ids.setdefault(node.gid, len(ids))
        if len(ids) > 65536:
            raise CorruptInput("the image has more than 65536 distinct owner ids, more than SquashFS can store")
        xattr = NO_INDEX
        if node.xattrs:
            key = tuple(sorted(node.xattrs.items()))
            xattr = xattr_sets.setdefault(key, len(xattr_sets))
        t = node.type
        if t == T_DIR:
            nlink = 2 + sum(1 for c in node.children.values() if c.type == T_DIR)
            ext = xattr != NO_INDEX or listing_len + 3 > 0xFFFF
            block, off = listing_ref >> 16, listing_ref & 0xFFFF
            if ext:
                body = _DIR_EXT.pack(nlink, listing_len + 3, block, parent, 0, off, xattr)
            else:
                body = _DIR_BASIC.pack(block, nlink, listing_len + 3, off, parent)
        elif t == T_FILE:
            sizes = struct.pack(f"<{len(node.blocks)}I", *node.blocks) if node.blocks else b""   # (most: a fragment)
            fidx, foff = node.frag
            ext = (xattr != NO_INDEX or node.nlink > 1 or node.sparse or node.size > 0xFFFFFFFF
                   or node.start > 0xFFFFFFFF)
            if ext:
                body = _FILE_EXT.pack(node.start, node.size, node.sparse, node.nlink, fidx, foff, xattr) + sizes
            else:
                body = _FILE_BASIC.pack(node.start, fidx, foff, node.size) + sizes
        elif t == T_SYMLINK:
            ext = xattr != NO_INDEX
            body = struct.pack("<II", node.nlink, len(node.target)) + node.target
            if ext:
                body += struct.pack("<I", xattr)
        elif t in (T_BLOCK, T_CHAR):
            ext = xattr != NO_INDEX
            body = struct.pack("<III", node.nlink, node.rdev, xattr) if ext else struct.pack("<II", node.nlink, node.rdev)
        else:
            ext = xattr != NO_INDEX
            body = struct.pack("<II", node.nlink, xattr) if ext else struct.pack("<I", node.nlink)
        node.ref = meta.ref()
        meta.add(_INODE_HEAD.pack(t + 7 if ext else t, node.mode, uid, gid, node.mtime, node.number) + body)

    def _table(self, data: bytes) -> int:
        """Metadata blocks of `data`, then the index of their positions; returns the index position."""
        meta = _Meta(self.compress)
        meta.add(data)
        blob = meta.finish()
        start = self.pos
        self._write(blob)
        index = self.pos
        self._write(struct.pack(f"<{len(meta.starts)}Q", *(start + s for s in meta.starts)))
        return index

    def _xattrs(self, sets: dict[tuple, int]) -> int:
        kv = _Meta(self.compress)
        ids = []
        for items in sorted(sets, key=sets.get):
            ref = kv.ref()
            size = 0
            for key, value in items:
                kb = raw(key) if isinstance(key, str) else key
                for prefix, code in _XATTR_PREFIXES:
                    if kb.startswith(prefix):
                        name = kb[len(prefix):]
                        break
                else:
                    raise CorruptInput(f"xattr {key!r} has a prefix SquashFS cannot store")
                rec = struct.pack("<HH", code, len(name)) + name + struct.pack("<I", len(value)) + value
                kv.add(rec)
                size += len(rec)
            ids.append(struct.pack("<QII", ref, len(items), size))
        kv_start = self.pos
        self._write(kv.finish())
        meta = _Meta(self.compress)
        meta.add(b"".join(ids))
        blob = meta.finish()
        id_start = self.pos
        self._write(blob)
        header = self.pos
        self._write(struct.pack("<QII", kv_start, len(ids), 0))
        self._write(struct.pack(f"<{len(meta.starts)}Q", *(id_start + s for s in meta.starts)))
        return header


def write(entries: Iterable[Entry], fd: int, base: int = 0, **kw) -> SquashWriter:
    """Write the stream as a SquashFS image into `fd` at `base`. Returns the finished writer
    (`count` entries, `size` bytes, `records` for BlockReuse.save)."""
    w = SquashWriter(fd, base, **kw)
    token = READ_AHEAD.set(w.read_ahead)        # the layers are decoded as `entries` is read, here
    try:
        for e in entries:
            w.add(e)
        w.size = w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        READ_AHEAD.reset(token)
    return w


# reuse of earlier images' compressed blocks ----------------------------------------------------------------
_REUSE_RECORD = struct.Struct("<32sQI32s")    # key, position in the image, size field, key_of the bytes
_SPAN_RECORD = 16 + 32                        # a span's offset and length (_span, its blob said once) and key
_REUSE_MAGIC = b"hpcconv block-reuse 2\n"
REUSE_KEEP = 16                               # newest indexes kept per setting


def settings_name(compression: str, level: int | None, block_size: int) -> str:
    """Blocks are reusable only between images made with the same compressor, level, block size
    and compressor library version (so a warm image is byte-identical to a cold one), and found
    by the same content key hash."""
    if compression == "zstd":
        import zstandard

        lib = "zstd" + ".".join(map(str, zstandard.ZSTD_VERSION))
    else:
        lib = "zlib" + zlib.ZLIB_RUNTIME_VERSION
    return f"{compression}-{DEFAULT_LEVELS[compression] if level is None else level}-{block_size}-{lib}-{KEY_HASH}"


# Decoded chunks (compression.CHUNK, 4 MiB) a layer's decoder may run ahead when the writer takes
# that layer's blocks from an earlier image (SquashWriter.read_ahead; the default is 2). The
# benchmark image, warm (a second profile), 2 runs each, with 8 MiB chunks then: 2 / 8 / 16
# chunks 3.36–3.55 / 3.27–3.32 / 3.06–3.12 s, peak RSS 203–206 / 251–253 / 281–286 MiB: 64 MiB
# ahead it is.
READ_AHEAD_DEEP = 16
DEEP_SLACK = 64            # blocks compressed beyond those reused before the default applies again


class BlockReuse:
    """The compressed blocks of images this user made earlier with the same settings, found by
    the content key (`key_of`) of their uncompressed bytes, so a conversion that differs from an
    earlier one in a few files (another profile, a rebuilt top layer) compresses only what changed.

    Nothing is copied: `<dir>/<settings>/<hash of the output path>.idx`, written after an image is
    in place, says where each block of it is; an index is used only while its image is the same
    file (device, inode, size, modification time) and only if this user wrote it, and every block
    read from an image must match the key_of recorded for it, else it is compressed afresh.
    An image removed, moved or rewritten since simply gives no blocks. HPCCONV_BLOCK_REUSE=0 turns
    it off.

    An index also records, for content that came straight from a layer, where it came from (the
    layer blob's sha256, the offset and length in its decoded stream: `_span`) and the key of
    those bytes (`known`): the same span of a verified blob is the same bytes, so a later
    conversion of that layer takes the hash from there instead of hashing the bytes again (the
    image is the same either way). The spans are kept by blob; given `blobs` (the digests of the
    layers about to be read), only theirs are loaded (an index holds one per file of its image)."""

    def __init__(self, directory: Path, settings: str, blobs: Iterable[str] | None = None):
        self.dir = Path(directory) / settings
        self.blocks: dict[bytes, tuple[int, int, int, bytes]] = {}
        self.known: dict[bytes, bytes] = {}
        self.known_blobs: set[str] = set()       # digests of the layers `known` has spans of
        self.missed = False                      # a recorded block could not be read back
        self._blobs = None if blobs is None else {d.partition(":")[2] for d in blobs if d.startswith("sha256:")}
        self.fds: list[int] = []
        self.images = 0
        self._load()

    def _load(self) -> None:
        try:
            names = [n for n in os.listdir(self.dir) if n.endswith(".idx")]
        except OSError:
            return
        found = []
        for n in names:
            with contextlib.suppress(OSError):
                found.append((os.lstat(self.dir / n).st_mtime_ns, n))
        found.sort(reverse=True)
        for i, (_, n) in enumerate(found):
            path = self.dir / n
            if i >= REUSE_KEEP or not self._take(path):
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_uid == os.getuid():
                        os.unlink(path)          # an old index, or its image is gone or changed

    @staticmethod
    def _open(path: Path) -> tuple[int, dict, memoryview] | None:
        """(fd of the recorded image, header, records) of an index this user wrote whose image is
        still the same file, else None."""
        try:
            data = read_trusted(path)
            if not data.startswith(_REUSE_MAGIC):
                return None
            head_end = data.index(b"\n", len(_REUSE_MAGIC))
            head = json.loads(data[len(_REUSE_MAGIC):head_end])
            fd = os.open(head["path"], os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        st = os.fstat(fd)
        if [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns] != head.get("stat"):
            os.close(fd)
            return None
        return fd, head, memoryview(data)[head_end + 1:]

    @classmethod
    def still_valid(cls, path: Path) -> bool:
        """Whether an index can still be used (`store gc` drops the others)."""
        got = cls._open(path)
        if got is None:
            return False
        os.close(got[0])
        return True

    def _take(self, path: Path) -> bool:
        got = self._open(path)
        if got is None:
            return False
        fd, head, recs = got
        self.fds.append(fd)
        self.images += 1
        base = int(head.get("base", 0))
        size = _REUSE_RECORD.size
        end = min(int(head.get("blocks", 0)), len(recs) // size) * size
        for off in range(0, end, size):
            key, pos, field, digest = _REUSE_RECORD.unpack_from(recs, off)
            self.blocks.setdefault(key, (fd, base + pos, field, digest))
        try:
            self._take_spans(head.get("spans", []), recs, end)
        except (ValueError, TypeError):
            pass                                 # a damaged span list: the blocks alone still serve
        return True

    def _take_spans(self, groups: list, recs: memoryview, pos: int) -> None:
        """`groups`: [blob sha256 hex, count] for each run of span records from `pos` on."""
        want = self._blobs
        for hexd, count in groups:
            n = int(count) * _SPAN_RECORD
            if n < 0 or pos + n > len(recs):
                raise ValueError("span records beyond the index")
            if want is None or hexd in want:
                blob = bytes.fromhex(hexd)
                if len(blob) != 32:
                    raise ValueError("not a sha256")
                data = bytes(recs[pos:pos + n])
                r = range(0, n, _SPAN_RECORD)
                self.known.update(zip([blob + data[i:i + 16] for i in r], [data[i + 16:i + _SPAN_RECORD] for i in r]))
                if n:
                    self.known_blobs.add(f"sha256:{hexd}")
            pos += n

    def read(self, key: bytes) -> tuple[int, bytes, bytes] | None:
        """(size field, bytes, their key_of) of an earlier block with that key, if still intact."""
        hit = self.blocks.get(key)
        if hit is None:
            return None
        fd, off, field, digest = hit
        n = field & ~RAW_BLOCK
        try:
            data = os.pread(fd, n, off)
        except OSError:
            data = b""
        if len(data) != n or key_of(data) != digest:
            self.missed = True
            return None
        return field, data, digest

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def save(self, image: Path, base: int, writer: SquashWriter) -> None:
        """Record where `writer`'s blocks are in `image` (once it is in its final place)."""
        if not writer.records and not writer.span_records:
            return
        try:
            path = os.path.abspath(image)
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        by_blob: dict[bytes, list[bytes]] = {}
        for r in writer.span_records:                # span (blob, offset, length) + key
            by_blob.setdefault(r[:32], []).append(r[32:])
        head = json.dumps({"path": path, "base": base, "stat": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns],
                           "blocks": len(writer.records),
                           "spans": [[blob.hex(), len(rs)] for blob, rs in by_blob.items()]})
        name = hashlib.sha256(os.fsencode(path)).hexdigest()[:32] + ".idx"
        write_atomic(self.dir / name, _REUSE_MAGIC + head.encode() + b"\n" + b"".join(writer.records)
                     + b"".join(b"".join(rs) for rs in by_blob.values()))
