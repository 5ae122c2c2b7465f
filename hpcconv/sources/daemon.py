"""`docker-daemon:REPO[:TAG]`: an image from the local Docker engine (Docker SDK, honours DOCKER_HOST).

The engine's `GET /images/NAME/get` (`docker save`) is parsed as a stream, member by member, straight
into the store (see docker_archive.py; nothing is buffered whole). Before that, the image is inspected:
when the store already holds `docker-daemon:NAME` with the same config digest (the engine's image
ID) and all its layers, the save is skipped and the stored image is used.
"""

from __future__ import annotations

import io
import os

from ..errors import SourceError
from ..image import Image, Manifest
from ..store import Store
from . import SourceOptions
from .docker_archive import CHUNK, image_from_contents, read_archive
from .oci_layout import MAX_CONFIG, MAX_INDEX, Blobs, load_image


class _IterStream(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (the SDK's streamed HTTP body)."""

    def __init__(self, chunks):
        self._it = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _with_tag(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    if ":" in last or "@" in name or _looks_like_id(name):
        return name
    return name + ":latest"  # `docker save repo` would save every tag of the repository


def _looks_like_id(name: str) -> bool:
    h = name[7:] if name.startswith("sha256:") else name
    return len(h) >= 12 and all(c in "0123456789abcdef" for c in h)


def _client():
    try:
        import docker
    except ImportError:
        raise SourceError("the Docker SDK for Python is not installed", hint="pip install docker") from None
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except Exception as e:  # DockerException, requests ConnectionError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"cannot reach the Docker engine at {host}: {msg[:200]}",
                          hint="start Docker or set DOCKER_HOST; or use docker-archive: with a `docker save` file") from None
    return client


def _cached(store: Store, tag: str, image_id: str, opts: SourceOptions, reference: str) -> Image | None:
    desc = store.resolve(tag)
    if desc is None or not store.has(desc.digest):
        return None
    try:
        man = Manifest.parse(store.read_blob(desc.digest, MAX_INDEX), desc.media_type)
    except Exception:
        return None
    if man.config.digest != image_id or not all(store.has(l.digest) for l in man.layers):
        return None
    return load_image(Blobs(store.root, f"store {store.root}"), desc, reference, opts)


def open_image(rest: str, opts: SourceOptions) -> Image:
    import docker.errors

    name = _with_tag(rest)
    client = _client()
    try:
        info = client.api.inspect_image(name)
    except docker.errors.NotFound:
        raise SourceError(f"image {name} is not in the Docker engine",
                          hint="check `docker images`; pull or build it first") from None
    except docker.errors.APIError as e:
        raise SourceError(f"Docker engine error for {name}: {e.explanation or e}") from None
    except Exception as e:
        raise SourceError(f"Docker engine error for {name}: {str(e)[:200]}") from None
    store = Store.open(opts.store_path)
    reference = f"docker-daemon:{name}"
    image_id = str(info.get("Id") or "")
    hit = _cached(store, reference, image_id, opts, reference) if image_id else None
    if hit is not None:
        return hit
    what = f"docker-daemon image {name}"
    try:
        chunks = client.api.get_image(name, chunk_size=CHUNK)
        stream = io.BufferedReader(_IterStream(chunks), CHUNK)
        contents = read_archive(stream, store, what, opts.reporter, total=int(info.get("Size") or 0) or None)
    except docker.errors.NotFound:
        raise SourceError(f"image {name} is not in the Docker engine") from None
    except docker.errors.APIError as e:
        raise SourceError(f"Docker engine error saving {name}: {e.explanation or e}") from None
    except (ConnectionError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None and e.errno != 0:
            raise
        raise SourceError(f"lost the connection to the Docker engine while saving {name}: {e}") from None
    # `docker save NAME` holds exactly the image asked for; pick it by name, or the only one
    entries_ref = None if "@" in name or _looks_like_id(name) else name
    try:
        return image_from_contents(contents, store, entries_ref, reference, [reference], opts, what)
    except SourceError:
        if entries_ref is None:
            raise
        return image_from_contents(contents, store, None, reference, [reference], opts, what)
