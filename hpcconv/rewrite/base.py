"""The pass framework: profile-driven passes observe the rootfs entry stream in one go.

A :class:`Pass` sees every entry (``observe``), and for each ELF file the parsed :class:`ElfInfo`
(``observe_elf``), then reports :class:`Checks` at the end (``finish``). :class:`PassRunner` composes
passes into a single stream transform: it reads at most ``head_size`` bytes of each file up front,
hands downstream a reader that replays those bytes and then continues from the original reader,
and feeds every byte that flows through (the head, then what downstream reads) to the scanners the
passes asked for. Nothing re-reads the stream and no file is held whole in memory: scanners keep only
bounded pieces (ELF headers, notes, the dynamic section, a bounded prefix) or running counters.

Entry-stream contract (see ``hpcconv.entries``): a file's reader is valid only until the next entry
is requested. Before yielding the next entry the runner therefore drains what downstream left unread
of the previous file through the scanners (only when a scanner is attached), then closes them.

Changing the stream (preparation passes, ``rewrite/prepare.py``): a pass may ``edit`` each entry
(return it, a replacement, or None to drop it; a file's replacement carries its own reader, and the
original content still streams through the scanners) and may append entries at the end of the
stream (``additions``), still in the same single pass. Additions are new paths; the runner emits
any missing parent directory (0755 root) before an addition, and skips a directory addition whose
path was already a directory, so "directories before their contents" holds. Every sink accepts
new paths at the end (tar, hpcconv's SquashFS writer, ``tar2sqfs``, ``mksquashfs -tar`` and the
directory writer do; the Charliecloud emitter appends its own items the same way). A hardlink
whose target was dropped is dropped too (its target must be an earlier entry).
"""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator

from ..entries import DIR, FILE, HARDLINK, Entry, provenance_of, read_full, reader_of
from ..harness.checks import Checks
from ..speedups import native

_adjoin = native.adjoin if native is not None else None

HEAD_SIZE = 64 * 1024
_DRAIN_CHUNK = 1 << 20


class Scanner:
    """Receives a file's bytes in order, once: ``feed(offset, data)`` ..., then ``close(complete)``.
    ``data`` is bytes or a read-only memoryview of bytes (entries.reader_of): a scanner may keep it,
    slice it or add it to bytes, not call bytes methods on it."""

    def feed(self, offset: int, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, complete: bool) -> None:
        pass


class Pass:
    """Base class of a rewrite pass. Subclasses override what they need."""

    name = "pass"
    stage = "rewrite"
    #: ask the runner's ELF scanner to scan executable segments for AVX/AVX-512 encodings
    scan_instructions = False

    def observe(self, entry: Entry, head: bytes | None) -> Scanner | None:
        """Every entry; ``head`` is the first bytes of a file (None for other types): bytes when
        they are the whole content, else bytes or a read-only memoryview. May return a scanner
        that then receives the whole file content as it streams (bytes or memoryviews)."""
        return None

    def observe_elf(self, entry: Entry, elf) -> None:
        """Every ELF file, after its content has streamed (``elf`` is an ElfInfo)."""

    def finish(self, profile) -> Checks:
        return Checks()

    def facts(self) -> dict:
        """What the pass found, JSON-able, for `inspect` (no profile needed)."""
        return {}

    def edit(self, entry: Entry, head: bytes | None) -> Entry | None:
        """Called after ``observe`` for every entry: return it unchanged (the default), a replacement
        (same path; a file's replacement brings its own ``reader`` and ``size``), or None to drop it.
        ``head`` is a file's first bytes, as for ``observe`` (the whole content, as bytes, when
        ``entry.size <= len(head)``)."""
        return entry

    def additions(self) -> Iterable[Entry]:
        """Entries to append at the end of the stream (new paths), after every entry was seen."""
        return ()


class _TeeReader:
    """Replays ``head`` then continues from ``reader``; everything read past the head is fed to scanners.
    (A plain object with the reader methods, not an io.RawIOBase: one is made for every file.)"""

    __slots__ = ("_head", "_r", "_size", "_scanners", "_pos", "_fed", "_closed_scanners")

    def __init__(self, head: bytes, reader: BinaryIO, size: int, scanners: list[Scanner]):
        self._head, self._r, self._size, self._scanners = head, reader, size, scanners
        self._pos = 0            # bytes handed downstream
        self._fed = len(head)    # bytes fed to scanners (the head is fed at once)
        self._closed_scanners = False
        for s in scanners:
            s.feed(0, head)

    def close(self) -> None:
        pass

    def readable(self) -> bool:
        return True

    def provenance(self) -> tuple[bytes, int] | None:
        """The source's provenance (see flatten._Named) at this reader's position: the same bytes."""
        got = provenance_of(self._r)
        if got is None:
            return None
        return got[0], got[1] - self._fed + self._pos

    def _pull(self, n: int, read=None) -> bytes:
        data = (read or self._r.read)(n)
        if data and self._scanners:
            for s in self._scanners:
                s.feed(self._fed, data)
        self._fed += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        """Full reads (tarfile treats short reads as EOF); past the head, the source's bytes are
        handed on as they are (RawIOBase.read would copy them twice)."""
        return self._take(n, None)

    def read_view(self, n: int = -1):
        """As read, maybe a memoryview (entries.reader_of): the source's, scanners fed with it."""
        return self._take(n, reader_of(self._r))

    def _take(self, n: int, read):
        left = self._size - self._pos
        want = left if n is None or n < 0 else min(n, left)
        if want <= 0:
            return b""
        parts = []
        got = 0
        if self._pos < len(self._head):
            part = self._head[self._pos:self._pos + want]
            if read is None and type(part) is not bytes:
                part = bytes(part)                   # (a view head: read() hands on bytes)
            parts.append(part)
            got = len(part)
        while got < want and self._fed < self._size:
            chunk = self._pull(min(want - got, self._size - self._fed), read)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        self._pos += got
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2 and _adjoin is not None:
            one = _adjoin(parts[0], parts[1])        # the head's view and the next one of its chunk
            if one is not None:
                return one
        return b"".join(parts)

    def readinto(self, b) -> int:
        """Fill ``b`` as far as the content goes (full reads: tarfile treats short reads as EOF)."""
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Drain the rest through the scanners (if any) and close them."""
        if self._closed_scanners:
            return
        self._closed_scanners = True
        complete = True
        if self._scanners:
            # errors of the source (corrupt or truncated layers) propagate, as they would to the consumer
            while self._fed < self._size:
                data = self._pull(min(_DRAIN_CHUNK, self._size - self._fed))
                if not data:
                    complete = False
                    break
        for s in self._scanners:
            s.close(complete and self._fed >= self._size)


class _Known:
    """A scanner with nothing to scan: the ELF findings for these bytes are known (elfcache)."""

    __slots__ = ("_entry", "_info", "_done")

    def __init__(self, entry: Entry, info, done):
        self._entry, self._info, self._done = entry, info, done

    def feed(self, offset: int, data: bytes) -> None:
        pass

    def close(self, complete: bool) -> None:
        self._info.complete = complete
        self._done(self._entry, self._info)


class PassRunner:
    """Runs passes over an entry stream as one transform (``transform``) or to the end (``run``)."""

    def __init__(self, passes: Iterable[Pass], profile=None, head_size: int = HEAD_SIZE, elf_cache=None):
        self.passes = list(passes)
        # ElfScanner findings kept by content provenance (rewrite/elfcache.py), or None
        self.elf_cache = elf_cache
        self.profile = profile
        self.head_size = head_size
        self.scan_instructions = any(p.scan_instructions for p in self.passes)
        self.entries_seen = 0
        self.files_seen = 0
        self.elf_seen = 0
        self.elf_cached = 0
        self._editors = [p for p in self.passes
                         if type(p).edit is not Pass.edit or type(p).additions is not Pass.additions]
        from .elfinfo import ElfScanner, is_elf      # once, not per file

        self._is_elf, self._elf_scanner = is_elf, ElfScanner
        self._dirs: set[str] = set()       # directory paths yielded (only tracked when a pass edits)
        self._dropped: set[str] = set()    # paths dropped by an edit (hardlinks to them go too)
        self.links_dropped: list[str] = [] # those hardlinks

    def _scanners_for(self, e: Entry, head: bytes, origin: tuple[bytes, int] | None) -> list[Scanner]:
        out: list[Scanner] = []
        for p in self.passes:
            s = p.observe(e, head)
            if s is not None:
                out.append(s)
        if self._is_elf(head):
            self.elf_seen += 1
            out.append(self._elf(e, head, origin))
        return out

    def _elf(self, e: Entry, head: bytes, origin: tuple[bytes, int] | None) -> Scanner:
        """An ElfScanner, or, for content whose findings the cache has, one that hands those over."""
        cache = self.elf_cache
        if cache is None or origin is None:
            return self._elf_scanner(e, head, self._elf_done, scan_instructions=self.scan_instructions)
        where = (origin[0].hex(), origin[1], e.size, e.path, self.scan_instructions)
        info = cache.get(*where)
        if info is not None:
            self.elf_cached += 1
            return _Known(e, info, self._elf_done)

        def done(entry: Entry, info) -> None:
            cache.put(*where, info)
            self._elf_done(entry, info)
        return self._elf_scanner(e, head, done, scan_instructions=self.scan_instructions)

    def _elf_done(self, entry: Entry, info) -> None:
        for p in self.passes:
            p.observe_elf(entry, info)

    def _edit(self, e: Entry, head: bytes | None) -> Entry | None:
        if e.type == HARDLINK and e.linkname in self._dropped:
            self._dropped.add(e.path)
            self.links_dropped.append(e.path)
            return None
        for p in self._editors:
            new = p.edit(e, head)
            if new is None:
                self._dropped.add(e.path)
                return None
            e = new
        if e.type == DIR:
            self._dirs.add(e.path)
        return e

    def _append(self) -> Iterator[Entry]:
        for p in self._editors:
            for a in p.additions():
                if a.type == DIR and a.path in self._dirs:
                    continue
                parts = a.path.split("/")
                for i in range(1, len(parts)):
                    d = "/".join(parts[:i])
                    if d not in self._dirs:
                        self._dirs.add(d)
                        yield Entry(d, DIR, 0o755, 0, 0, 0, uname="root", gname="root")
                if a.type == DIR:
                    self._dirs.add(a.path)
                yield a

    def transform(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        editing = bool(self._editors)
        for e in entries:
            self.entries_seen += 1
            if e.type == FILE and e.size and e.reader is not None:
                self.files_seen += 1
                origin = provenance_of(e.reader) if self.elf_cache is not None else None
                # a longer file's head may be a view into the decoded layer (no copy; the writer's
                # first block then continues it without a copy either, see _TeeReader._take)
                head = read_full(reader_of(e.reader) if e.size > self.head_size else e.reader.read,
                                 min(self.head_size, e.size))
                tee = _TeeReader(head, e.reader, e.size, self._scanners_for(e, head, origin))
                out = e.with_(reader=tee)
                if editing:
                    out = self._edit(out, head)
                try:
                    if out is not None:
                        yield out
                except GeneratorExit:   # the consumer stopped: close scanners without reading on
                    tee._scanners, scanners = [], tee._scanners
                    for s in scanners:
                        s.close(False)
                    raise
                # downstream asked for the next entry: finish this file *before* pulling the next
                # one upstream, while its reader is still valid
                tee.finish()
            else:
                head = b"" if e.type == FILE else None
                for p in self.passes:
                    p.observe(e, head)
                out = self._edit(e, head) if editing else e
                if out is not None:
                    yield out
        if editing:
            yield from self._append()

    def run(self, entries: Iterable[Entry]) -> Checks:
        """Consume the stream (observe only) and return the passes' checks."""
        for _ in self.transform(entries):
            pass
        return self.finish()

    def facts(self) -> dict:
        return {p.name: p.facts() for p in self.passes}

    _UNSET = object()

    def finish(self, profile=_UNSET) -> Checks:
        """The passes' checks against the runner's profile, or another one: passes only collect while
        streaming and ``finish`` does not change them, so one pass over an image can be judged against
        every profile (``check --profile all``)."""
        checks = Checks()
        for p in self.passes:
            checks.extend(p.finish(self.profile if profile is PassRunner._UNSET else profile))
        if self.links_dropped:
            n = len(self.links_dropped)
            checks.add("prepare", "prepare.hardlinks", "warn",
                       f"{n} hardlink(s) to a dropped file dropped with it (the content was stored under the "
                       f"dropped name): " + ", ".join("/" + p for p in self.links_dropped[:5])
                       + (f" (+{n - 5} more)" if n > 5 else ""))
        return checks
