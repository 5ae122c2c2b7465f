"""Reference parsing and docker.io normalisation (distribution/reference rules)."""

from __future__ import annotations

import pytest

from hpcconv.errors import UsageError
from hpcconv.reference import parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest, host", [
    ("alpine", "docker.io", "library/alpine", "latest", "", "registry-1.docker.io"),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", "", "registry-1.docker.io"),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", "", "registry-1.docker.io"),
    ("index.docker.io/library/alpine", "docker.io", "library/alpine", "latest", "", "registry-1.docker.io"),
    ("bitnami/redis:7", "docker.io", "bitnami/redis", "7", "", "registry-1.docker.io"),
    ("localhost/x", "localhost", "x", "latest", "", "localhost"),
    ("localhost:5000/x", "localhost:5000", "x", "latest", "", "localhost:5000"),
    ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", "", "127.0.0.1:5000"),
    ("ghcr.io/org/sub/img:v1.2_3-rc", "ghcr.io", "org/sub/img", "v1.2_3-rc", "", "ghcr.io"),
    (f"alpine@{D}", "docker.io", "library/alpine", "", D, "registry-1.docker.io"),
    (f"quay.io/a/b:tag@{D}", "quay.io", "a/b", "tag", D, "quay.io"),
    ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io", "nvidia/pytorch", "24.01-py3", "", "nvcr.io"),
    ("Registry/a", "Registry", "a", "latest", "", "Registry"),   # uppercase first component = a host
    ("a__b/c-d--e.f_g", "docker.io", "a__b/c-d--e.f_g", "latest", "", "registry-1.docker.io"),
    ("[::1]:5000/x:y", "[::1]:5000", "x", "y", "", "[::1]:5000"),
])
def test_parse(text, registry, repo, tag, digest, host):
    r = parse(text)
    assert (r.registry, r.repository, r.tag, r.digest, r.host) == (registry, repo, tag, digest, host)


def test_digest_wins_over_tag():
    r = parse(f"127.0.0.1:5000/a/b:t@{D}")
    assert r.reference == D
    assert r.canonical() == f"127.0.0.1:5000/a/b@{D}"
    assert parse("a/b:t").canonical() == "docker.io/a/b:t"
    assert str(parse("alpine")) == "docker.io/library/alpine:latest"


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("Alpine", "lowercase"),
    ("alpine:", "tag"),
    ("alpine:-x", "tag"),
    ("alpine:.x", "tag"),
    ("alpine:" + "x" * 129, "tag"),
    ("a//b", "repository"),
    ("a/b/", "repository"),
    ("-a/b", "repository"),
    ("a_/b", "repository"),
    ("a b", "invalid"),
    ("alpine@sha256:abc", "digest"),
    ("alpine@sha256:" + "AB" * 32, "digest"),
    ("alpine@md5:" + "ab" * 16, "digest"),
    ("bad_host:5000:1/x", "registry"),
    ("host:99999999/x", "registry"),
    ("example.com/" + "a" * 300, "255"),
])
def test_parse_rejects(text, words):
    with pytest.raises(UsageError) as e:
        parse(text)
    assert words in e.value.message
    assert e.value.exit_code == 2
    assert "\n" not in e.value.message


def test_transport_prefix_slashes():
    assert parse("//alpine").repository == "library/alpine"
