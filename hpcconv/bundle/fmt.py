"""The on-disk format of an hpcconv bundle: sealed JSON documents, keys, the tar container and parts.

See `hpcconv/bundle/__init__.py` for the layout. Nothing here knows about images.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import CorruptInput, SourceError, UsageError

FORMAT = 1
MANIFEST = "hpcbundle.json"
PART_RE = re.compile(r"\.part(\d{3,})$")
DOMAIN_MANIFEST = b"hpcbundle-v1 manifest\x00"
DOMAIN_PARTS = b"hpcbundle-v1 parts\x00"
MAX_DOC = 64 << 20
BLOCK = 512
CHUNK = 1 << 20


class BundleCorrupt(CorruptInput):
    """Verification found problems; `problems` is a list of (item, what is wrong)."""

    def __init__(self, problems: list[tuple[str, str]], where: str):
        self.problems = problems
        head = "; ".join(f"{item}: {msg}" for item, msg in problems[:6])
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        super().__init__(f"bundle {where} failed verification: {head}{more}")


# sealed documents ---------------------------------------------------------------------------------
def dump_body(obj: dict) -> bytes:
    """The one serialisation of a document body (re-dumping a loaded body gives the same bytes)."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True).encode() + b"\n"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(body: bytes, domain: bytes, key=None) -> bytes:
    """body + one line `{"hpcbundle-seal": ...}` holding the body's sha256 and size and, with a key,
    an Ed25519 signature over domain + body. Every byte of the body is covered."""
    s: dict = {"hpcbundle-seal": FORMAT, "sha256": sha256_hex(body), "size": len(body)}
    if key is not None:
        pub = public_raw(key.public_key())
        s["signature"] = {"alg": "ed25519", "key_id": key_id(pub), "public_key": base64.b64encode(pub).decode(),
                          "value": base64.b64encode(key.sign(domain + body)).decode()}
    return body + json.dumps(s, sort_keys=True, separators=(",", ":")).encode() + b"\n"


@dataclass
class Sealed:
    body: bytes
    doc: dict
    seal: dict

    @property
    def sha256(self) -> str:
        return sha256_hex(self.body)

    @property
    def signer(self) -> str:
        return (self.seal.get("signature") or {}).get("key_id", "")


def unseal(data: bytes, what: str) -> Sealed:
    """Split and check a sealed document; raises CorruptInput naming `what`."""
    if not data.endswith(b"\n"):
        raise CorruptInput(f"{what} is truncated (no seal line)")
    cut = data.rfind(b"\n", 0, len(data) - 1)
    body, line = data[: cut + 1], data[cut + 1:]
    try:
        s = json.loads(line)
    except ValueError:
        raise CorruptInput(f"{what} is damaged: its seal line is not JSON") from None
    if not isinstance(s, dict) or s.get("hpcbundle-seal") != FORMAT:
        raise CorruptInput(f"{what} is damaged or not an hpcconv bundle document (no seal)")
    if s.get("size") != len(body) or s.get("sha256") != sha256_hex(body):
        raise CorruptInput(f"{what} is damaged: its content does not match its sha256 seal")
    try:
        doc = json.loads(body)
    except ValueError:
        raise CorruptInput(f"{what} is damaged: not JSON") from None
    if not isinstance(doc, dict):
        raise CorruptInput(f"{what} is not a JSON object")
    return Sealed(body, doc, s)


def check_signature(sealed: Sealed, domain: bytes, trusted: list, what: str) -> str:
    """Verify the Ed25519 signature. With `trusted` keys it must verify under one of them; without,
    a signature present must still verify under its embedded key. Returns the signer key id or ''."""
    sig = sealed.seal.get("signature")
    if not sig:
        if trusted:
            raise CorruptInput(f"{what} is not signed, but a key was given to verify it with")
        return ""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        value = base64.b64decode(sig["value"], validate=True)
        embedded = base64.b64decode(sig["public_key"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise CorruptInput(f"{what}: malformed signature") from None
    if sig.get("alg") != "ed25519":
        raise CorruptInput(f"{what}: unsupported signature algorithm {sig.get('alg')!r}")
    candidates = [public_raw(k) for k in trusted] if trusted else [embedded]
    for raw in candidates:
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(value, domain + sealed.body)
            return key_id(raw)
        except (InvalidSignature, ValueError):
            continue
    if trusted:
        ids = ", ".join(key_id(public_raw(k)) for k in trusted)
        raise CorruptInput(f"{what}: signature does not verify with the given key ({ids}); "
                           f"the bundle says it was signed by key {sig.get('key_id', '?')}")
    raise CorruptInput(f"{what}: signature does not verify (document altered after signing)")


# keys ------------------------------------------------------------------------------------------------
def public_raw(pub) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(private_path: Path, public_path: Path, force: bool = False) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    for p in (private_path, public_path):
        if p.exists() and not force:
            raise UsageError(f"{p} exists", hint="choose another name or pass --force")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(pub)
    return key_id(public_raw(key.public_key()))


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot load signing key {path}: {e}",
                         hint="make one with `hpcconv bundle keygen` (an unencrypted PEM Ed25519 key)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read public key {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            priv = serialization.load_pem_private_key(data, None)
        except (ValueError, TypeError):
            raise UsageError(f"{path} is not a PEM public key") from None
        key = priv.public_key() if isinstance(priv, Ed25519PrivateKey) else None
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path} is not an Ed25519 public key")
    return key


# the tar container -------------------------------------------------------------------------------------
def tar_header(name: str, size: int, mtime: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = size, 0o644, mtime
    ti.uname = ti.gname = "root"
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def tar_padding(size: int) -> bytes:
    return b"\0" * ((BLOCK - size % BLOCK) % BLOCK)


TAR_END = b"\0" * (2 * BLOCK)


class ContainerWriter:
    """Write the container as one file or as numbered parts of at most `split` bytes each.

    Files are written under temporary names and renamed by `finish()`; `abort()` removes them."""

    def __init__(self, out: Path, split: int | None):
        self.out, self.split = out, split
        self.parts: list[dict] = []
        self._f: BinaryIO | None = None
        self._h = None
        self._n = 0
        self._tmp: list[tuple[Path, Path]] = []
        self.total = 0
        self.whole = hashlib.sha256()
        if not split:
            self._open(out)

    def _open(self, final: Path) -> None:
        tmp = final.with_name(f".{final.name}.tmp")
        self._f = open(tmp, "wb")
        self._h, self._n = hashlib.sha256(), 0
        self._tmp.append((tmp, final))

    def _close_part(self) -> None:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        if self.split:
            final = self._tmp[-1][1]
            self.parts.append({"index": len(self.parts) + 1, "name": final.name, "offset": self.total - self._n,
                               "size": self._n, "sha256": self._h.hexdigest()})

    def write(self, data) -> None:
        view = memoryview(data)
        self.whole.update(view)
        while len(view):
            if self._f is None:
                self._open(part_path(self.out, len(self.parts) + 1))
            room = len(view) if not self.split else min(len(view), self.split - self._n)
            self._f.write(view[:room])
            self._h.update(view[:room])
            self._n += room
            self.total += room
            view = view[room:]
            if self.split and self._n >= self.split:
                self._close_part()

    def finish(self) -> None:
        if self._f is not None:
            self._close_part()
        for tmp, final in self._tmp:
            os.replace(tmp, final)
        self._tmp = []

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        for tmp, _ in self._tmp:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def part_path(out: Path, index: int) -> Path:
    return out.with_name(f"{out.name}.part{index:03d}")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# locating and reading a bundle ---------------------------------------------------------------------
@dataclass
class Location:
    base: Path                   # NAME.hpcbundle (may not exist when split)
    split: bool
    part0: Path | None           # NAME.hpcbundle.part000
    found_parts: dict[int, Path]  # index -> path of every NAME.hpcbundle.partNNN present (not 0)

    @property
    def display(self) -> str:
        return str(self.base)


def locate(path: str | os.PathLike) -> Location:
    p = Path(path)
    m = PART_RE.search(p.name)
    if m:
        base = p.with_name(p.name[: m.start()])
    elif p.is_dir():
        raise SourceError(f"{p} is a directory, not a bundle")
    elif p.is_file():
        return Location(p, False, None, {})
    else:
        base = p
    part0 = part_path(base, 0)
    found = {}
    if base.parent.is_dir():
        for q in base.parent.iterdir():
            if q.name.startswith(base.name + ".part"):
                mm = PART_RE.search(q.name)
                if mm and q.name[: mm.start()] == base.name and int(mm.group(1)) > 0:
                    found[int(mm.group(1))] = q
    if not part0.is_file() and not found:
        if m is None and not p.exists():
            raise SourceError(f"bundle {p} not found (neither the file nor {part0.name} exists)")
    return Location(base, True, part0, found)


class SingleFile:
    """A read-only file with a thread-safe `pread` (members are read by several threads at once)."""

    def __init__(self, path: Path):
        self._f = open(path, "rb")
        self.size = os.fstat(self._f.fileno()).st_size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, off: int, whence: int = 0) -> int:
        return self._f.seek(off, whence)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def pread(self, off: int, n: int) -> bytes:
        return os.pread(self._f.fileno(), n, off)

    def close(self) -> None:
        self._f.close()


class MultiFile:
    """A read-only, seekable file over several files laid end to end."""

    def __init__(self, paths: list[Path]):
        import threading

        self._lock = threading.Lock()
        self._files = [open(p, "rb") for p in paths]
        self._starts, pos = [], 0
        for f in self._files:
            self._starts.append(pos)
            pos += os.fstat(f.fileno()).st_size
        self.size = pos
        self._pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, off: int, whence: int = 0) -> int:
        self._pos = {0: off, 1: self._pos + off, 2: self.size + off}[whence]
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self._pos
        out = []
        while n > 0 and self._pos < self.size:
            i = max(j for j, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
            f.seek(self._pos - self._starts[i])
            data = f.read(min(n, end - self._pos))
            if not data:
                break
            out.append(data)
            self._pos += len(data)
            n -= len(data)
        return b"".join(out)

    def pread(self, off: int, n: int) -> bytes:
        with self._lock:
            self._pos = off
            data = self.read(n)
            if self._tap is not None:
                self._feed(off, data)
            return data

    # hashing each part during one sequential pass (bundle import) ---------------------------------
    _tap = None

    def start_tap(self) -> None:
        self._tap = [hashlib.sha256() for _ in self._files]
        self._tap_pos, self._tap_ok = 0, True

    def _feed(self, off: int, data: bytes) -> None:
        if off + len(data) <= self._tap_pos:
            return                                   # a re-read of bytes already hashed
        if off != self._tap_pos:
            self._tap_ok = False                     # not sequential: the caller hashes the parts again
            return
        view = memoryview(data)
        while len(view):
            i = max(j for j, s in enumerate(self._starts) if s <= self._tap_pos)
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self.size
            k = min(len(view), end - self._tap_pos)
            self._tap[i].update(view[:k])
            self._tap_pos += k
            view = view[k:]

    def tap_position(self) -> int:
        return self._tap_pos

    def tap_digests(self) -> list[str] | None:
        """sha256 of each part if every byte was read in order once, else None."""
        if self._tap is None or not self._tap_ok or self._tap_pos != self.size:
            return None
        return [h.hexdigest() for h in self._tap]

    def close(self) -> None:
        for f in self._files:
            f.close()


class Region:
    """A bounded, read-only window [start, start+size) of a seekable file."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = self._f.pread(self._start + self._pos, n)
        self._pos += len(data)
        return data

    def seek(self, off: int) -> None:
        self._pos = off

    def close(self) -> None:
        pass


@dataclass
class Member:
    name: str
    offset: int      # of the data
    size: int


def scan_tar(f, size: int, what: str) -> list[Member]:
    """Members of the container, in order. A damaged header or trailing garbage is an error."""
    f.seek(0)
    try:
        tf = tarfile.open(fileobj=f, mode="r:")
        infos = tf.getmembers()
    except (tarfile.TarError, EOFError) as e:
        raise CorruptInput(f"{what}: the container is not a readable tar archive ({e})") from None
    end = tf.offset
    f.seek(end)
    left = size - end
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            break
        if chunk.strip(b"\0"):
            raise CorruptInput(f"{what}: the container is damaged at byte {end} (a tar header fails its checksum, "
                               f"or data follows the end of the archive)")
        left -= len(chunk)
    if size - end < 2 * BLOCK:
        raise CorruptInput(f"{what}: the container is truncated (no end-of-archive marker)")
    out = []
    for ti in infos:
        if not ti.isreg():
            raise CorruptInput(f"{what}: unexpected non-file member {ti.name!r}")
        out.append(Member(ti.name, ti.offset_data, ti.size))
    return out
