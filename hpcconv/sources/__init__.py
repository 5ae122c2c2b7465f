"""Sources: one module per transport, each with `open_image(rest: str, opts: SourceOptions) -> Image`.

Transport syntax follows containers-transports(5), with Apptainer-style spellings accepted:

    docker://[REGISTRY/]REPO[:TAG|@DIGEST]     registry (OCI distribution protocol)
    docker-daemon:REPO:TAG                     the local Docker engine
    docker-archive:PATH                        a `docker save` archive (classic or OCI-hybrid layout)
    oci:DIR[:TAG]                              an OCI image layout directory
    bundle:PATH                                an hpcconv offline bundle
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..image import Image, Platform
from ..progress import NULL, Reporter

TRANSPORTS = {
    "docker": "registry",
    "docker-daemon": "daemon",
    "docker-archive": "docker_archive",
    "oci": "oci_layout",
    "bundle": "bundle",
}


@dataclass
class SourceOptions:
    platform: Platform | None = None          # None: the host's platform (or the profile's)
    insecure: bool = False                    # allow plain HTTP / unverified TLS for the source's registry only
    ca_cert: str | None = None                # extra CA bundle for registry TLS
    store_path: str | None = None             # None: $HPCCONV_STORE or the XDG cache default
    username: str | None = None               # explicit registry credentials (never from argv)
    password: str | None = field(default=None, repr=False)
    reporter: Reporter = NULL
    max_workers: int = 4                      # parallel blob downloads
    # registry: return the image once its config is in, layers still downloading (Image.downloads;
    # a layer's opener waits for its blob); the caller must finish() or abort() them
    stream_layers: bool = False


def parse_source(spec: str) -> tuple[str, str]:
    """Split SOURCE into (transport, rest). A bare name is a registry reference, unless it is an
    existing path: a directory with `oci-layout` is `oci:`, a file is `docker-archive:`."""
    if spec.startswith("docker://"):
        return "docker", spec[len("docker://"):]
    for t in ("docker-daemon", "docker-archive", "oci-archive", "oci", "bundle"):
        if spec.startswith(t + ":"):
            if t == "oci-archive":
                raise UsageError("the oci-archive: transport is not supported yet",
                                 hint="unpack it and use oci:DIR, or use docker-archive:PATH")
            rest = spec[len(t) + 1:]
            if t in ("docker-archive", "bundle", "oci") and rest.startswith("//"):
                rest = rest[2:]
            if not rest:
                raise UsageError(f"empty {t}: source")
            return t, rest
    if "://" in spec:
        raise UsageError(f"unknown transport in {spec!r}",
                         hint="use docker://, docker-daemon:, docker-archive:, oci: or bundle:")
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "oci-layout")):
        return "oci", spec
    if os.path.isfile(spec):
        return "docker-archive", spec
    return "docker", spec


def open_source(spec: str, opts: SourceOptions | None = None) -> Image:
    transport, rest = parse_source(spec)
    opts = opts or SourceOptions()
    module = importlib.import_module(f".{TRANSPORTS[transport]}", __name__)
    image = module.open_image(rest, opts)
    image.source = transport
    return image
