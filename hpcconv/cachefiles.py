"""Cache files in the store (flatten's index-cache/, the SquashFS writer's block-reuse/): written
atomically and best effort, read only if this user wrote them.

In a store shared by many users anyone may write these directories, and what they hold is trusted
(a cached header index for names, modes and links; a block-reuse index for where an earlier image's
compressed blocks are). Others' files, group/other-writable ones and symlinks are ignored
(ValueError) and the caller does the work itself instead."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def read_trusted(path: Path) -> bytes:
    """The file's bytes, only if this user wrote it and nobody else can (else ValueError)."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError("cache file not owned by this user")
        return f.read()


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a cache file atomically, best effort (one that cannot be written is simply not there
    next time)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a fresh O_EXCL name (a predictable one in a shared directory could be a planted
        # symlink), mode 0644 whatever the umask (readers trust only owner-only-writable files)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except (OSError, ValueError):
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
