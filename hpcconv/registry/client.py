"""OCI distribution client for one repository: ping, auth, manifests, resumable verified blobs.

Scheme: https with verified TLS. With `insecure` (the user's --insecure, scoped to this registry)
https is tried first without verification and plain http is used for this host if https fails.

Auth is driven by any 401: Bearer challenges get a token from the realm (Basic credentials sent
to the realm only over https, or over http to the registry's own host with --insecure); Basic
challenges get Basic credentials. A 401 is retried once with a fresh token. Redirects are followed
by hand: Authorization (and cookies) never go to another origin, and plain-http targets are refused
unless they are this registry with --insecure.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import threading
from typing import Callable
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from ..errors import AuthError, CorruptInput, NetworkError, SourceError
from ..image import MANIFEST_ACCEPT, Descriptor
from ..reference import Reference
from . import auth, credentials
from .http import MAX_ATTEMPTS, Trust, backoff, min_rate, mount_tls, new_session, send

MAX_MANIFEST = 8 << 20
MAX_TOKEN_RESPONSE = 1 << 20
CHUNK = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)


class _Cancelled(Exception):
    pass


class _TooSlow(Exception):
    pass


class _RateWatch:
    """Cut a body that arrives slower than `rate` bytes/s for longer than `grace` seconds (the
    read timeout only catches a server that sends nothing at all)."""

    def __init__(self, rate: float, grace: float):
        import time

        self.rate, self.grace, self._now = rate, grace, time.monotonic
        self.t0, self.n = self._now(), 0

    def saw(self, n: int) -> None:
        if self.rate <= 0 or self.grace <= 0:
            return
        self.n += n
        elapsed = self._now() - self.t0
        if elapsed >= self.grace:
            if self.n / elapsed < self.rate:
                raise _TooSlow(f"slower than {self.rate:.0f} bytes/s for {elapsed:.0f} s")
            self.t0, self.n = self._now(), 0          # a fresh window


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}".lower()


def _tls_reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"\[SSL: [A-Z_]+\] ([^(']+)", text)
    if m:
        return m.group(1).strip().rstrip(":")
    m = re.search(r"(certificate verify failed|hostname mismatch|doesn't match)[^(')]*", text)
    return m.group(0).strip() if m else text[:200]


def _error_body(r: requests.Response) -> str:
    try:
        raw = r.raw.read(65536, decode_content=True) if r.raw is not None else b""
        errs = json.loads(raw).get("errors") or []
        if errs and isinstance(errs[0], dict):
            return f"{errs[0].get('code', '')}: {errs[0].get('message', '')}".strip(": ")
    except Exception:  # noqa: BLE001 - any body is fine, we only want a hint
        pass
    return ""


class RegistryClient:
    def __init__(self, ref: Reference, *, insecure: bool = False, ca_cert: str | None = None,
                 username: str | None = None, password: str | None = None,
                 warn: Callable[[str], None] | None = None):
        self.ref = ref
        self.host = ref.host
        self.hostname = (urlsplit(f"//{ref.host}").hostname or ref.host).lower()
        self.repo = ref.repository
        self.insecure = insecure
        trust = Trust(ca_cert)                  # (first: a bad CA file leaves no session behind)
        self.session = new_session()
        mount_tls(self.session, trust)
        self.scheme: str | None = None
        self.challenge: auth.Challenge | None = None
        self.tokens = auth.TokenCache()
        self.scopes = [f"repository:{self.repo}:pull"]
        self._explicit = credentials.Credential(username or "", password or "", "", "--username") \
            if username and password else None
        self._cred: credentials.Credential | None = None
        self._cred_loaded = False
        self._warn = warn
        self._lock = threading.Lock()
        self._token_lock = threading.Lock()

    # lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # plumbing -------------------------------------------------------------------------------------
    def _verify_for(self, url: str):
        host = (urlsplit(url).hostname or "").lower()
        return not (self.insecure and host == self.hostname)     # (the CAs: mount_tls)

    def credential(self) -> credentials.Credential | None:
        if self._explicit:
            return self._explicit
        if not self._cred_loaded:
            self._cred = credentials.lookup(self.ref.registry, self.repo, warn=self._warn)
            self._cred_loaded = True
        return self._cred

    def _send(self, method: str, url: str, headers: dict, stream: bool = False, data=None,
              cancelled=None) -> requests.Response:
        try:
            return send(self.session, method, url, headers=headers, verify=self._verify_for(url), stream=stream,
                        data=data, cancelled=cancelled)
        except requests.exceptions.SSLError as e:
            reason = _tls_reason(e)
            hint = "pass the registry's CA with --ca-cert (or SSL_CERT_FILE)"
            if "version" in reason.lower():
                hint = "the server does not speak TLS; if it is a plain-HTTP registry you trust, use --insecure"
            raise NetworkError(f"TLS connection to {_origin(url)} failed: {reason}", hint=hint) from None

    def ping(self) -> None:
        """GET /v2/ once: choose the scheme and remember the auth challenge."""
        with self._lock:
            if self.scheme is not None:
                return
            schemes = ["https", "http"] if self.insecure else ["https"]
            for i, scheme in enumerate(schemes):
                url = f"{scheme}://{self.host}/v2/"
                try:
                    r = self._send("GET", url, {})
                except NetworkError:
                    if i + 1 < len(schemes):
                        continue
                    raise
                with r:
                    if r.status_code == 401:
                        self.challenge = auth.pick(auth.parse_challenges(r.headers.get("WWW-Authenticate", "")))
                    elif r.status_code == 404:
                        raise SourceError(f"{self.host} is not an OCI/Docker registry (no /v2/ endpoint)")
                    elif r.status_code >= 300 and r.status_code not in _REDIRECTS:
                        raise NetworkError(f"{self.host} answered HTTP {r.status_code} to the registry ping")
                self.scheme = scheme
                return

    # auth -----------------------------------------------------------------------------------------
    def _auth_headers(self, scopes: list[str], force: bool) -> dict:
        c = self.challenge
        if c is None:
            return {}
        cred = self.credential()
        if c.scheme == "basic":
            if cred and cred.username and cred.password:
                raw = f"{cred.username}:{cred.password}".encode()
                return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
            return {}
        if c.scheme == "bearer":
            tok = self._token(c, scopes, force)
            return {"Authorization": f"Bearer {tok}"} if tok else {}
        return {}

    def _check_realm(self, realm: str) -> None:
        p = urlsplit(realm)
        host = (p.hostname or "").lower()
        if p.scheme not in ("https", "http") or not host:
            raise AuthError(f"{self.host} sent an unusable token realm {realm!r}")
        if p.scheme == "http" and not (self.insecure and host == self.hostname):
            raise AuthError(f"{self.host} wants tokens from a plain-HTTP realm {realm}; refusing",
                            hint="use --insecure only if the realm is the registry's own host and you trust the network")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        if (ip.is_loopback or ip.is_private or ip.is_link_local) and host != self.hostname:
            raise AuthError(f"{self.host} points its token realm at {host}, a local address; refusing")

    def _token(self, c: auth.Challenge, scopes: list[str], force: bool) -> str:
        realm, service = c.realm, c.service
        if not realm:
            raise AuthError(f"{self.host} sent a Bearer challenge without a realm")
        with self._token_lock:
            if not force:
                tok = self.tokens.get(realm, service, scopes)
                if tok:
                    return tok
            self._check_realm(realm)
            tok, lifetime = self._fetch_token(realm, service, scopes)
            self.tokens.put(realm, service, scopes, tok, lifetime)
            return tok

    def _fetch_token(self, realm: str, service: str, scopes: list[str]) -> tuple[str, int]:
        cred = self.credential()
        r = None
        if cred and cred.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token, "service": service,
                    "client_id": "hpcconv", "scope": " ".join(scopes)}
            r = self._send("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"}, data=form,
                           stream=True)
            if r.status_code in (404, 405):
                r.close()
                r = None
        if r is None:
            headers = {}
            if cred and cred.username and cred.password:
                raw = f"{cred.username}:{cred.password}".encode()
                headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
            r = self._send("GET", auth.token_url(realm, service, scopes), headers, stream=True)
        with r:
            if r.status_code in (401, 403):
                who = f"the credentials from {cred.source}" if cred else "anonymous access"
                raise AuthError(f"token server {_origin(realm)} refused {who} for {self.repo}",
                                hint="check your login (docker login / podman login, or --username)")
            if r.status_code != 200:
                raise AuthError(f"token server {_origin(realm)} answered HTTP {r.status_code}")
            body = r.raw.read(MAX_TOKEN_RESPONSE + 1, decode_content=True)
        if len(body) > MAX_TOKEN_RESPONSE:
            raise AuthError(f"token server {_origin(realm)} sent an oversized response")
        try:
            obj = json.loads(body)
        except ValueError:
            raise AuthError(f"token server {_origin(realm)} sent no JSON") from None
        tok, lifetime = auth.token_from_response(obj if isinstance(obj, dict) else {})
        if not tok:
            raise AuthError(f"token server {_origin(realm)} sent no token")
        return tok, lifetime

    def _auth_failed(self) -> AuthError:
        cred = self.credential()
        if cred:
            return AuthError(f"{self.ref.registry} refused the credentials from {cred.source} for {self.repo}",
                             hint="check the user name and password or token")
        return AuthError(f"{self.ref.registry} requires authentication for {self.repo}",
                         hint="log in with docker login / podman login, or pass --username with $HPCCONV_PASSWORD")

    # requests -------------------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: dict | None = None, stream: bool = False,
                cancelled=None, data: bytes | None = None) -> requests.Response:
        """An authenticated request to this registry; 401 retried once; redirects followed safely."""
        self.ping()
        url = f"{self.scheme}://{self.host}{path}"
        scopes = list(self.scopes)
        for attempt in range(2):
            h = {**(headers or {}), **self._auth_headers(scopes, force=attempt > 0)}
            r, foreign = self._follow(method, url, h, stream, cancelled, data)
            if r.status_code != 401:
                return r
            www = r.headers.get("WWW-Authenticate", "")
            r.close()
            if foreign:
                raise AuthError(f"the storage host a blob was redirected to refused the download ({_origin(r.url)})")
            ch = auth.pick(auth.parse_challenges(www))
            if ch is not None:
                if ch.scheme == "bearer":
                    scopes = auth.merge_scopes(ch.scopes, scopes)
                self.challenge = ch
            if self.challenge is None:
                break
        raise self._auth_failed()

    def _follow(self, method: str, url: str, headers: dict, stream: bool, cancelled, data: bytes | None = None):
        start = _origin(url)
        for _ in range(6):
            r = self._send(method, url, headers, stream=stream, cancelled=cancelled, data=data)
            if r.status_code not in _REDIRECTS:
                return r, _origin(url) != start
            loc = r.headers.get("Location")
            r.close()
            if not loc:
                raise NetworkError(f"{_origin(url)} sent a redirect without a Location")
            nxt = urljoin(url, loc)
            p = urlsplit(nxt)
            if p.scheme not in ("http", "https"):
                raise NetworkError(f"refusing redirect to {p.scheme}: URL")
            if p.scheme == "http" and not (self.insecure and (p.hostname or "").lower() == self.hostname):
                raise NetworkError(f"refusing redirect to plain-HTTP {_origin(nxt)}")
            if _origin(nxt) != start:
                headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
            if r.status_code == 303:
                method = "GET"
            url = nxt
        raise NetworkError(f"too many redirects for {url}")

    def _fail(self, r: requests.Response, what: str) -> None:
        msg = _error_body(r)
        detail = f" ({msg})" if msg else ""
        if r.status_code == 404:
            raise SourceError(f"{what} not found in {self.ref.registry}/{self.repo}{detail}",
                              hint="check the repository name and tag")
        if r.status_code == 403:
            raise AuthError(f"{self.ref.registry} denied access to {self.repo}{detail}")
        if r.status_code == 429:
            raise NetworkError(f"{self.ref.registry} is rate limiting us{detail}",
                               hint="log in to get a higher pull limit, or wait and retry")
        raise NetworkError(f"{self.ref.registry} answered HTTP {r.status_code} for {what}{detail}")

    # manifests ------------------------------------------------------------------------------------
    def head_manifest(self, reference: str) -> str | None:
        """The digest a tag points at (from Docker-Content-Digest), or None if the registry won't say."""
        r = self.request("HEAD", f"/v2/{self.repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT})
        with r:
            if r.status_code == 200:
                return r.headers.get("Docker-Content-Digest") or None
            if r.status_code == 404:
                self._fail(r, f"manifest {reference}")
        return None

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, content type, Docker-Content-Digest or '') with a size cap."""
        r = self.request("GET", f"/v2/{self.repo}/manifests/{reference}", {"Accept": MANIFEST_ACCEPT}, stream=True)
        with r:
            if r.status_code != 200:
                self._fail(r, f"manifest {reference}")
            length = r.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_MANIFEST:
                raise CorruptInput(f"manifest {reference} is {length} bytes, over the {MAX_MANIFEST}-byte limit")
            raw = b""
            for chunk in r.iter_content(65536):
                raw += chunk
                if len(raw) > MAX_MANIFEST:
                    raise CorruptInput(f"manifest {reference} is over the {MAX_MANIFEST}-byte limit")
            ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
            return raw, ctype, r.headers.get("Docker-Content-Digest", "")

    # blobs ----------------------------------------------------------------------------------------
    def download_blob(self, desc: Descriptor, store, task=None, cancelled: Callable[[], bool] | None = None) -> None:
        """Fetch a blob into the store: resume a partial file with Range, verify, publish."""
        if store.has(desc.digest):
            return
        for attempt in range(2):
            with store.writer(desc.digest, desc.size) as w:
                if store.has(desc.digest):
                    return
                resumed = w.offset > 0
                try:
                    if w.offset < desc.size:
                        self._fill(w, desc, task, cancelled)
                    w.commit()
                    return
                except (_Cancelled, NetworkError, SourceError):
                    if w.offset + w.written == 0:
                        w.discard()            # nothing worth resuming: leave no empty partial file
                    raise
                except CorruptInput:
                    if not (resumed and attempt == 0):
                        raise
                    w.discard()            # the kept partial bytes were bad: download it whole once more
                    if task is not None:
                        task.update(completed=0)

    def _fill(self, w, desc: Descriptor, task, cancelled) -> None:
        path = f"/v2/{self.repo}/blobs/{desc.digest}"
        pos = w.offset
        if task is not None and pos:
            task.advance(pos)
        failures = 0
        while pos < desc.size:
            headers = {"Accept-Encoding": "identity"}
            if pos:
                headers["Range"] = f"bytes={pos}-"
            r = self.request("GET", path, headers, stream=True, cancelled=cancelled)
            with r:
                if pos and r.status_code == 416:
                    pos = self._restart(w, task)
                    continue
                if pos and r.status_code == 206 and not _range_ok(r.headers.get("Content-Range", ""), pos, desc.size):
                    pos = self._restart(w, task)
                    continue
                if pos and r.status_code == 200:   # the server ignored Range: take the whole blob
                    pos = self._restart(w, task)
                elif r.status_code not in (200, 206) or (r.status_code == 206 and not pos):
                    self._fail(r, f"blob {desc.digest}")
                watch = _RateWatch(*min_rate())
                try:
                    while True:
                        if cancelled is not None and cancelled():
                            raise _Cancelled()
                        # read1: whatever has arrived (up to CHUNK), so the watchdog and the
                        # cancel flag are looked at while a slow server trickles
                        chunk = r.raw.read1(CHUNK, decode_content=False) if hasattr(r.raw, "read1") \
                            else r.raw.read(CHUNK, decode_content=False)
                        if not chunk:
                            break
                        w.write(chunk)
                        pos += len(chunk)
                        if task is not None:
                            task.advance(len(chunk))
                        watch.saw(len(chunk))
                except (urllib3.exceptions.HTTPError, requests.RequestException, ConnectionError, TimeoutError,
                        _TooSlow) as e:
                    failures += 1
                    if failures >= MAX_ATTEMPTS:
                        why = str(e) if isinstance(e, _TooSlow) else type(e).__name__
                        raise NetworkError(f"download of blob {desc.digest} keeps failing: {why}",
                                           hint="check the network; HPCCONV_MIN_RATE/HPCCONV_SLOW_TIMEOUT and "
                                                "--timeout set what counts as stalled") from None
                    import time

                    time.sleep(backoff(failures))
                    continue
            if pos < desc.size:                    # the stream ended early: resume from here
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise NetworkError(f"blob {desc.digest} download stops at {pos} of {desc.size} bytes")

    @staticmethod
    def _restart(w, task) -> int:
        w.restart()
        if task is not None:
            task.update(completed=0)
        return 0


def _range_ok(content_range: str, start: int, size: int) -> bool:
    """`bytes first-last/total` must start where we asked and end at the blob's end."""
    try:
        unit, _, rest = content_range.partition(" ")
        span, _, total = rest.partition("/")
        first, _, last = span.partition("-")
        return (unit == "bytes" and int(first) == start and int(last) + 1 == size
                and (total.strip() == "*" or int(total) == size))
    except ValueError:
        return False
