"""Image references: parsing, validation and docker.io normalisation.

Follows distribution/reference (`splitDockerDomain`): the first path component is a registry only
if it contains `.` or `:`, is `localhost`, or has an uppercase letter; otherwise the registry is
`docker.io`, whose single-component names live under `library/`. `index.docker.io` is `docker.io`;
the network endpoint of `docker.io` is `registry-1.docker.io`. A digest wins over a tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import CorruptInput, UsageError
from .image import check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# a hostname (labels) or an IPv6 literal in brackets, optional port
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$")
_HINT = "write [REGISTRY[:PORT]/]REPO[:TAG][@sha256:DIGEST], e.g. docker.io/library/alpine:3.20"


@dataclass(frozen=True)
class Reference:
    registry: str           # as named, normalised: docker.io, localhost:5000, 127.0.0.1:5000
    repository: str         # library/alpine, a/b
    tag: str = ""           # empty when pinned by digest only
    digest: str = ""        # sha256:... or empty

    @property
    def host(self) -> str:
        """host[:port] to connect to."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes into /v2/<name>/manifests/<reference>: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def canonical(self) -> str:
        """The key under which a pull is recorded in the store: digest form wins over the tag."""
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, digest)


def _looks_like_registry(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost" or component != component.lower()


def parse(text: str) -> Reference:
    """Parse `[REGISTRY/]REPO[:TAG][@DIGEST]` (without a transport prefix). Raises UsageError."""
    orig = text
    text = text.strip()
    if text.startswith("//"):
        text = text[2:]
    if not text:
        raise UsageError("empty image reference", hint=_HINT)
    if len(text) > 512 or any(c.isspace() for c in text):
        raise UsageError(f"invalid image reference {orig[:80]!r}", hint=_HINT)
    digest = ""
    if "@" in text:
        text, digest = text.split("@", 1)
        try:
            check_digest(digest)
        except CorruptInput as e:
            raise UsageError(f"invalid digest in image reference {orig!r}: {e.message}",
                             hint="digests look like sha256:<64 lowercase hex digits>") from None
    registry, rest = DOCKER_HUB, text
    if "/" in text:
        first, remainder = text.split("/", 1)
        if _looks_like_registry(first):
            registry, rest = first, remainder
            if not _HOST_RE.match(registry):
                raise UsageError(f"invalid registry host {registry!r} in {orig!r}", hint=_HINT)
    tag = ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid tag {tag!r} in {orig!r}",
                             hint="tags are 1-128 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'")
    if not rest or not _NAME_RE.match(rest):
        if rest and rest != rest.lower() and _NAME_RE.match(rest.lower()):
            raise UsageError(f"repository name {rest!r} must be lowercase", hint=_HINT)
        raise UsageError(f"invalid repository name {rest!r} in {orig!r}", hint=_HINT)
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    if len(registry) + 1 + len(rest) > 255:
        raise UsageError(f"image name {registry}/{rest} is longer than 255 characters")
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(registry, rest, tag, digest)
