"""The upload side of the distribution protocol, for `hpcconv push`.

Blobs: HEAD first (present blobs are not sent again); small blobs go in one POST + PUT
(monolithic), larger ones in PATCH chunks of CHUNK bytes and a closing PUT ?digest=. Manifests:
the platform manifests are PUT by digest, then the top document by tag. The registry's
Docker-Content-Digest answer is checked against what was sent. Auth, TLS, proxies and retries are
the pull side's (`RegistryClient`), with a pull,push scope.

A multi-arch image that carries only some of its index's platforms (a bundle made with --platform)
cannot be pushed with its original index: registries refuse an index whose manifests are missing.
Then a new index listing only the carried platforms is pushed (its digest differs; a warning says so),
or the platform manifest itself when only one is carried.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode, urlsplit

from ..errors import CorruptInput, NetworkError, SourceError, UsageError
from ..image import INDEX_TYPES, OCI_INDEX
from ..reference import parse
from ..sources import SourceOptions, parse_source
from .client import RegistryClient

CHUNK = 16 << 20


def _path_of(client: RegistryClient, location: str) -> str:
    if not location:
        raise NetworkError(f"{client.host} sent no upload location")
    p = urlsplit(location)
    if p.scheme and p.netloc and p.netloc.lower() != client.host.lower():
        raise NetworkError(f"{client.host} wants uploads sent to another host ({p.netloc}); not supported")
    return p.path + (f"?{p.query}" if p.query else "")


def _with_query(path: str, **params) -> str:
    return path + ("&" if "?" in path else "?") + urlencode(params)


def blob_exists(client: RegistryClient, digest: str) -> bool:
    r = client.request("HEAD", f"/v2/{client.repo}/blobs/{digest}")
    with r:
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        client._fail(r, f"blob {digest}")
    return False


def upload_blob(client: RegistryClient, blob, task=None) -> None:
    r = client.request("POST", f"/v2/{client.repo}/blobs/uploads/", {"Content-Length": "0"}, data=b"")
    with r:
        if r.status_code != 202:
            client._fail(r, f"upload of blob {blob.digest}")
        loc = _path_of(client, r.headers.get("Location", ""))
    with blob.open() as src:
        if blob.size <= CHUNK:
            data = src.read()
            src.read()                                     # end of stream: digest and size checked
            r = client.request("PUT", _with_query(loc, digest=blob.digest),
                               {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))},
                               data=data)
            if task is not None:
                task.advance(len(data))
        else:
            pos = 0
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                r = client.request("PATCH", loc, {"Content-Type": "application/octet-stream",
                                                  "Content-Length": str(len(data)),
                                                  "Content-Range": f"{pos}-{pos + len(data) - 1}"}, data=data)
                with r:
                    if r.status_code != 202:
                        client._fail(r, f"upload of blob {blob.digest}")
                    loc = _path_of(client, r.headers.get("Location", ""))
                pos += len(data)
                if task is not None:
                    task.advance(len(data))
            r = client.request("PUT", _with_query(loc, digest=blob.digest), {"Content-Length": "0"}, data=b"")
    with r:
        if r.status_code not in (201, 204):
            client._fail(r, f"upload of blob {blob.digest}")


def put_manifest(client: RegistryClient, reference: str, raw: bytes, media_type: str, digest: str) -> None:
    r = client.request("PUT", f"/v2/{client.repo}/manifests/{reference}",
                       {"Content-Type": media_type, "Content-Length": str(len(raw))}, data=raw)
    with r:
        if r.status_code not in (200, 201, 202):
            client._fail(r, f"manifest {reference}")
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise CorruptInput(f"{client.host} stored manifest {reference} as {got}, expected {digest}")


def _read(blob) -> bytes:
    with blob.open() as s:
        data = s.read()
        s.read()
    return data


def push_plan(plan, dest: str, opts: SourceOptions, reporter) -> dict:
    """Push an ImagePlan (see bundle.collect) to `docker://REGISTRY/REPO[:TAG]`."""
    transport, rest = parse_source(dest)
    if transport != "docker":
        raise UsageError(f"push destination must be docker://REGISTRY/REPO:TAG, not {dest}")
    ref = parse(rest)
    warnings: list[str] = []
    top_raw = _read(plan.blobs[plan.top.digest])
    top_mt, top_digest = plan.top.media_type, plan.top.digest
    documents = {plan.top.digest} | {c.digest for c in plan.children}
    if plan.top.media_type in INDEX_TYPES and plan.partial:
        if len(plan.children) == 1:
            c = plan.children[0]
            top_raw, top_mt, top_digest = _read(plan.blobs[c.digest]), c.media_type, c.digest
            warnings.append(f"only {plan.platforms[0]} is available: pushed its manifest, not the index "
                            f"{plan.top.digest}")
        else:
            obj = json.loads(top_raw)
            obj["manifests"] = [m for m in obj.get("manifests", []) if m.get("digest") in
                                {c.digest for c in plan.children}]
            obj.setdefault("mediaType", plan.top.media_type or OCI_INDEX)
            top_raw = json.dumps(obj, separators=(",", ":")).encode()
            from ..image import digest_bytes

            top_digest = digest_bytes(top_raw)
            warnings.append(f"the index {plan.top.digest} lists manifests that are not available (carried: "
                            f"{', '.join(plan.platforms)}): pushed a new index {top_digest} of those")
    uploaded = existing = 0
    with RegistryClient(ref, insecure=opts.insecure, ca_cert=opts.ca_cert, username=opts.username,
                        password=opts.password, warn=lambda m: reporter.log("warning", m)) as client:
        client.scopes = [f"repository:{ref.repository}:pull,push"]
        blobs = [b for d, b in plan.blobs.items() if d not in documents]
        task = reporter.task(f"push {ref.repository}", total=sum(b.size for b in blobs))
        for b in blobs:
            if blob_exists(client, b.digest):
                existing += 1
                task.advance(b.size)
                continue
            upload_blob(client, b, task)
            uploaded += 1
        task.done()
        if top_mt in INDEX_TYPES:
            for c in plan.children:
                put_manifest(client, c.digest, _read(plan.blobs[c.digest]), c.media_type, c.digest)
        if ref.digest and ref.digest != top_digest:
            raise SourceError(f"{dest} names digest {ref.digest}, but the image is {top_digest}")
        put_manifest(client, ref.tag or ref.digest or "latest", top_raw, top_mt, top_digest)
    return {"command": "push", "source": plan.source, "dest": str(ref), "digest": top_digest,
            "platforms": plan.platforms, "uploaded": uploaded, "existing": existing, "warnings": warnings}
