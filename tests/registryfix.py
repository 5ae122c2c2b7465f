"""Registry fixtures (docker-registry on 127.0.0.1: plain HTTP, TLS + htpasswd, token auth).

Everything listens on loopback only, on free ports, with temporary storage, and every process
started here is stopped by PID at the end of the session. Test images are pushed with skopeo (a
real client), so the registry's content does not depend on hpcconv's code.

* `plain_registry`  plain HTTP, no auth
* `tls_registry`    TLS with a test CA (SAN IP:127.0.0.1, IP:127.0.0.2) + htpasswd (bcrypt) Basic auth
* `token_registry`  TLS + `auth: token`, backed by `TokenServer` below: a threaded https server that
                    checks Basic credentials and issues RS256 JWTs with an `x5c` header whose
                    certificate is the registry's `rootcertbundle` (what distribution 2.8 accepts)
* `LoopbackProxy`   a TLS reverse proxy in front of a registry that records requests and can redirect
                    blob GETs to `StorageServer` on 127.0.0.2 (a different host), because no real
                    registry here redirects on demand; the storage server records the headers it got.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# HPCCONV_TEST_SENTINEL: run the whole suite with this registry password (htpasswd and token server
# take it from here), then search everything the run wrote for it (tests/test_hardening_secrets.py
# does that for a broad set of operations on its own).
USER = "hpcuser"
PASSWORD = os.environ.get("HPCCONV_TEST_SENTINEL") or "s3cret pass:word"
TOKEN_SERVICE = "hpcconv-test-registry"
TOKEN_ISSUER = "hpcconv-test-issuer"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment for tools started by tests: no proxies (all traffic is loopback)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _need(tool: str) -> str:
    from conftest import need

    return need(tool)


# certificates ----------------------------------------------------------------------------------------
@dataclass
class Certs:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    token_cert: Path
    token_key: Path
    cert_dir: Path           # for skopeo --dest-cert-dir: ca.crt only


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d: Path) -> Certs:
    _need("openssl")
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3",
             "-subj", "/CN=hpcconv test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost\n"
                                  "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                                  "extendedKeyUsage=serverAuth\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "3", "-extfile", "server.ext", "-out", "server.crt", cwd=d)
    # the token signer: a self-signed certificate that is also the registry's rootcertbundle
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "token.key", "-out", "token.crt",
             "-days", "3", "-subj", "/CN=hpcconv test token signer", cwd=d)
    cert_dir = d / "certdir"
    cert_dir.mkdir(exist_ok=True)
    shutil.copy(d / "ca.crt", cert_dir / "ca.crt")
    return Certs(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "token.crt", d / "token.key", cert_dir)


def server_context(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.cert, certs.key)
    return ctx


# the registry process ---------------------------------------------------------------------------------
class Registry:
    def __init__(self, root: Path, name: str, auth: dict | None = None, certs: Certs | None = None,
                 extra: dict | None = None):
        self.root, self.name, self.auth, self.certs = root / name, name, auth, certs
        self.extra = extra or {}
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = self.root / "storage"
        self.log = self.root / "registry.log"
        self.proc: subprocess.Popen | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.certs else "http"

    def start(self) -> "Registry":
        exe = _need("docker-registry")
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg = {"version": 0.1, "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
               "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
               "http": {"addr": self.host, "secret": "hpcconv-test-secret"}}
        if self.certs:
            cfg["http"]["tls"] = {"certificate": str(self.certs.cert), "key": str(self.certs.key)}
        if self.auth:
            cfg["auth"] = self.auth
        cfg.update(self.extra)
        (self.root / "config.yml").write_text(json.dumps(cfg))   # JSON is YAML
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([exe, "serve", str(self.root / "config.yml")], stdout=logf, stderr=logf,
                                         env=clean_env(), start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    # observation ------------------------------------------------------------------------------------
    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path, status) from the access log, in order."""
        out = []
        for m in re.finditer(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[0-9.]+" (\d{3})', self.log.read_text()):
            out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def blob_file(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.storage / "docker" / "registry" / "v2" / "blobs" / algo / hexd[:2] / hexd / "data"


# token server --------------------------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """Issues JWTs the registry accepts: RS256, `x5c` = the signer certificate (in rootcertbundle)."""

    def __init__(self, certs: Certs, users: dict[str, str], field: str = "token"):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        self.certs, self.users, self.field = certs, users, field
        self.key = serialization.load_pem_private_key(certs.token_key.read_bytes(), None)
        cert = x509.load_pem_x509_certificate(certs.token_cert.read_bytes())
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.port = free_port()
        self.realm = f"https://127.0.0.1:{self.port}/token"
        self.seen: list[dict] = []
        self.refresh_tokens = {f"refresh-{u}": u for u in users}     # identity tokens it accepts
        self.issued: list[str] = []
        self._httpd: http.server.ThreadingHTTPServer | None = None

    def sign(self, claims: dict) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        head = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = f"{_b64url(json.dumps(head).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"

    def issue(self, user: str, scopes: list[str]) -> str:
        access = []
        if user:
            for sc in scopes:
                parts = sc.split(":")
                if len(parts) >= 3 and parts[0] == "repository":
                    access.append({"type": "repository", "name": ":".join(parts[1:-1]),
                                   "actions": parts[-1].split(",")})
        now = int(time.time())
        tok = self.sign({"iss": TOKEN_ISSUER, "sub": user, "aud": TOKEN_SERVICE, "exp": now + 600,
                         "nbf": now - 30, "iat": now, "jti": uuid.uuid4().hex, "access": access})
        self.issued.append(tok)                  # secrets tests look for these in everything we wrote
        return tok

    def start(self) -> "TokenServer":
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit

                q = parse_qs(urlsplit(self.path).query)
                outer.seen.append({"path": self.path, "headers": dict(self.headers.items())})
                user = ""
                authz = self.headers.get("Authorization", "")
                if authz.startswith("Basic "):
                    u, _, p = base64.b64decode(authz[6:]).decode().partition(":")
                    if outer.users.get(u) != p:
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u
                if q.get("service", [""])[0] != TOKEN_SERVICE:
                    self.send_response(400)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({outer.field: outer.issue(user, q.get("scope", [])),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                """OAuth2 (distribution `oauth.md`): grant_type=refresh_token with a known refresh token."""
                from urllib.parse import parse_qs

                n = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(n).decode()).items()}
                outer.seen.append({"path": self.path, "method": "POST", "form": form,
                                   "headers": dict(self.headers.items())})
                user = outer.refresh_tokens.get(form.get("refresh_token", ""))
                if form.get("grant_type") != "refresh_token" or not user or form.get("service") != TOKEN_SERVICE:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"access_token": outer.issue(user, form.get("scope", "").split()),
                                   "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.socket = server_context(self.certs).wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()


# loopback proxy + storage host (redirect and request-recording tests) -----------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict
    status: int = 0
    start: float = 0.0
    end: float = 0.0


class _TLSServer:
    def __init__(self, host: str, certs: Certs, handler_factory):
        self.port = free_port(host)
        self.host = host
        self._httpd = http.server.ThreadingHTTPServer((host, self.port), handler_factory(self))
        self._httpd.daemon_threads = True
        self._httpd.socket = server_context(certs).wrap_socket(self._httpd.socket, server_side=True)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class StorageServer(_TLSServer):
    """Serves /blob/<digest> on 127.0.0.2 by fetching the blob from the upstream registry with
    the test credentials (as a CDN holding presigned content would); records request headers."""

    def __init__(self, certs: Certs, upstream: "Registry", repo: str, user: str, password: str):
        self.upstream, self.repo, self.creds = upstream, repo, (user, password)
        self.seen: list[Seen] = []
        self.certs = certs
        super().__init__("127.0.0.2", certs, _storage_handler)

    @property
    def base(self) -> str:
        return f"https://127.0.0.2:{self.port}"


def _storage_handler(server: StorageServer):
    import requests

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            s = Seen("GET", self.path, dict(self.headers.items()))
            server.seen.append(s)
            digest = self.path.split("?")[0].rsplit("/", 1)[-1]
            r = requests.get(f"{server.upstream.scheme}://{server.upstream.host}/v2/{server.repo}/blobs/{digest}",
                             auth=server.creds, verify=str(server.certs.ca), proxies={"http": "", "https": ""})
            s.status = r.status_code
            self.send_response(r.status_code)
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

    return H


class LoopbackProxy(_TLSServer):
    """TLS reverse proxy on 127.0.0.1 in front of a registry (passes Authorization through).

    With a `storage` server, blob GETs that carry Authorization are answered with a 307 to it (another
    host). `fail_first[substring] = n` answers the first n matching requests with 503 + Retry-After;
    `mutate(path, body) -> body` alters response bodies (to serve corrupt bytes on purpose)."""

    def __init__(self, certs: Certs, upstream: Registry, storage: StorageServer | None = None):
        self.upstream, self.storage, self.certs = upstream, storage, certs
        self.seen: list[Seen] = []
        self.fail_first: dict[str, int] = {}
        self.mutate = None
        self.strip_range = False         # behave like a server that ignores Range (answers 200)
        self.cut_first: dict[str, int] = {}   # substring -> n: send half the body, then drop the connection
        self.blob_delay = 0.0                 # seconds to wait before answering a blob GET
        # fault injection for tests/test_hardening_faults.py (substring of the path -> what to do):
        self.statuses: dict[str, list[int]] = {}   # answer the next matching requests with these statuses
        self.retry_after = "1"                     # Retry-After sent with 429/503 from `statuses`
        self.throttle = 0.0                        # bytes/s for blob bodies (0: full speed)
        self.length_delta: dict[str, list[int]] = {}  # Content-Length = real + delta, then close
        self.pad_manifest = 0                      # append this many spaces to manifest bodies...
        self.omit_length = False                   # ...and send no Content-Length (close-delimited)
        self.gates: dict[str, threading.Event] = {}  # path substring -> GETs wait for the event (60 s at most)
        super().__init__("127.0.0.1", certs, _proxy_handler)

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"


def _proxy_handler(proxy: LoopbackProxy):
    import requests

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _forward(self, method: str):
            s = Seen(method, self.path, dict(self.headers.items()), start=time.monotonic())
            proxy.seen.append(s)
            if proxy.blob_delay and "/blobs/" in self.path:
                time.sleep(proxy.blob_delay)
            for sub, gate in list(proxy.gates.items()):
                if sub in self.path and method == "GET":
                    gate.wait(60)
            for sub, codes in list(proxy.statuses.items()):
                if sub in self.path and codes:
                    code = codes.pop(0)
                    s.status = code
                    self.send_response(code)
                    if code in (429, 503):
                        self.send_header("Retry-After", proxy.retry_after)
                    body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS" if code == 429 else "UNAVAILABLE",
                                                   "message": "injected by the test proxy"}]}).encode()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
            for sub, n in list(proxy.fail_first.items()):
                if sub in self.path and n > 0:
                    proxy.fail_first[sub] = n - 1
                    s.status = 503
                    self.send_response(503)
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            if (proxy.storage is not None and method == "GET" and "/blobs/" in self.path
                    and self.headers.get("Authorization")):
                digest = self.path.rsplit("/", 1)[-1]
                s.status = 307
                self.send_response(307)
                self.send_header("Location", f"{proxy.storage.base}/blob/{digest}?X-Sig=abc")
                self.send_header("Docker-Content-Digest", digest)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            fwd = ("authorization", "accept") if proxy.strip_range else ("authorization", "accept", "range")
            headers = {k: v for k, v in self.headers.items() if k.lower() in fwd}
            r = requests.request(method, f"{proxy.upstream.scheme}://{proxy.upstream.host}{self.path}",
                                 headers=headers, verify=str(proxy.certs.ca), allow_redirects=False,
                                 proxies={"http": "", "https": ""}, stream=True)
            body = r.raw.read(decode_content=False) if method != "HEAD" else b""
            if proxy.mutate is not None and method == "GET" and r.status_code in (200, 206):
                body = proxy.mutate(self.path, body)
            if proxy.pad_manifest and method == "GET" and "/manifests/" in self.path and r.status_code == 200:
                body = body + b" " * proxy.pad_manifest
            s.status = r.status_code
            self.send_response(r.status_code)
            for k, v in r.headers.items():
                if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "content-range",
                                 "location", "docker-distribution-api-version"):
                    self.send_header(k, v)
            delta = next((ds for sub, ds in proxy.length_delta.items() if sub in self.path and ds), None)
            if delta is not None and method == "GET" and r.status_code in (200, 206):
                d = delta.pop(0)
                s.status = 1000 + r.status_code          # marks a response with a wrong Content-Length
                self.send_header("Content-Length", str(len(body) + d))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if proxy.omit_length and method == "GET" and "/manifests/" in self.path:
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    for i in range(0, len(body), 1 << 20):
                        self.wfile.write(body[i:i + (1 << 20)])
                return
            self.send_header("Content-Length", r.headers.get("Content-Length", str(len(body)))
                             if method == "HEAD" else str(len(body)))
            self.end_headers()
            cut = next((sub for sub, n in proxy.cut_first.items() if sub in self.path and n > 0), None)
            if proxy.throttle and method == "GET" and "/blobs/" in self.path:
                step = max(1, int(proxy.throttle / 10))
                if cut is not None:                # half the body, slowly, then the connection drops
                    proxy.cut_first[cut] -= 1
                    s.status = -r.status_code
                    body = body[: len(body) // 2]
                with contextlib.suppress(OSError):
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i:i + step])
                        self.wfile.flush()
                        time.sleep(0.1)
                    if cut is not None:
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                s.end = time.monotonic()
                return
            if cut is not None and method == "GET" and len(body) > 1:
                proxy.cut_first[cut] -= 1
                s.status = -r.status_code          # negative: this response was cut short
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if method != "HEAD":
                self.wfile.write(body)
            s.end = time.monotonic()

        def do_GET(self):
            self._forward("GET")

        def do_HEAD(self):
            self._forward("HEAD")

    return H


# skopeo ------------------------------------------------------------------------------------------------
def skopeo(*args: str, env: dict | None = None) -> str:
    exe = _need("skopeo")
    r = subprocess.run([exe, "--insecure-policy", *args], capture_output=True, text=True, env=env or clean_env(),
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed: {r.stderr}")
    return r.stdout


def push_layout(layout: Path, tag: str, registry: Registry, dest: str, all_images: bool = False,
                creds: str | None = None) -> None:
    args = ["copy", "--quiet"]
    if all_images:
        args.append("--all")
    if registry.certs:
        args += ["--dest-cert-dir", str(registry.certs.cert_dir)]
    else:
        args.append("--dest-tls-verify=false")
    if creds:
        args += ["--dest-creds", creds]
    env = clean_env(SSL_CERT_FILE=registry.certs.ca) if registry.certs else None
    skopeo(*args, f"oci:{layout}:{tag}", f"docker://{registry.host}/{dest}", env=env)


def inspect_raw(registry: Registry, ref: str, creds: str | None = None) -> bytes:
    args = ["inspect", "--raw"]
    if registry.certs:
        args += ["--cert-dir", str(registry.certs.cert_dir)]
    else:
        args.append("--tls-verify=false")
    if creds:
        args += ["--creds", creds]
    env = clean_env(SSL_CERT_FILE=registry.certs.ca) if registry.certs else None
    return skopeo(*args, f"docker://{registry.host}/{ref}", env=env).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registries")


@pytest.fixture(scope="session")
def test_certs(registry_root) -> Certs:
    return make_certs(registry_root / "certs")


@pytest.fixture(scope="session")
def plain_registry(registry_root):
    reg = Registry(registry_root, "plain").start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_registry(registry_root, test_certs):
    _need("htpasswd")
    htp = registry_root / "htpasswd"
    out = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True).stdout
    htp.write_text(out.strip() + "\n")
    reg = Registry(registry_root, "tls", auth={"htpasswd": {"realm": "hpcconv-test", "path": str(htp)}},
                   certs=test_certs).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_server(test_certs):
    ts = TokenServer(test_certs, {USER: PASSWORD}).start()
    yield ts
    ts.stop()


@pytest.fixture(scope="session")
def token_registry(registry_root, test_certs, token_server):
    reg = Registry(registry_root, "token", certs=test_certs,
                   auth={"token": {"realm": token_server.realm, "service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER,
                                   "rootcertbundle": str(test_certs.token_cert)}}).start()
    yield reg
    reg.stop()


def _layout(tmp: Path, name: str, img) -> Path:
    from ocitools import image_layout

    return image_layout(tmp / name, img, "t")


@pytest.fixture(scope="session")
def plain_images(plain_registry, registry_root, busybox_amd64, busybox_arm64) -> dict:
    """Pushed to the plain registry: test/busybox:amd64, test/multi:latest (index amd64+arm64),
    test/zstd:1 (zstd layers). Returns name -> BuiltImage ('test/multi:latest' -> (index bytes, blobs))."""
    from ocitools import T, build_image, build_index, make_tar, write_layout

    lay = registry_root / "layouts"
    push_layout(_layout(lay, "bb-amd64", busybox_amd64), "t", plain_registry, "test/busybox:amd64")
    idx, blobs = build_index([(busybox_amd64, {"os": "linux", "architecture": "amd64"}),
                              (busybox_arm64, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    write_layout(lay / "multi", idx, blobs, "t")
    push_layout(lay / "multi", "t", plain_registry, "test/multi:latest", all_images=True)
    zimg = build_image([make_tar([T("etc", "dir"), T("etc/zstd-layer", data=b"zstd layer\n" * 1000)]),
                        make_tar([T("opt", "dir"), T("opt/second", data=os.urandom(3000))])],
                       compression="zstd")
    push_layout(_layout(lay, "zstd", zimg), "t", plain_registry, "test/zstd:1")
    return {"test/busybox:amd64": busybox_amd64, "test/multi:latest": (idx, blobs),
            "test/zstd:1": zimg, "amd64": busybox_amd64, "arm64": busybox_arm64}


@pytest.fixture(scope="session")
def tls_images(tls_registry, registry_root, busybox_amd64) -> dict:
    push_layout(_layout(registry_root / "layouts", "bb-tls", busybox_amd64), "t", tls_registry, "secure/busybox:1",
                creds=f"{USER}:{PASSWORD}")
    return {"secure/busybox:1": busybox_amd64}


@pytest.fixture(scope="session")
def token_images(token_registry, registry_root, busybox_amd64) -> dict:
    push_layout(_layout(registry_root / "layouts", "bb-token", busybox_amd64), "t", token_registry,
                "private/busybox:1", creds=f"{USER}:{PASSWORD}")
    return {"private/busybox:1": busybox_amd64}


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 (for HTTPS_PROXY tests). It only tunnels to
    loopback addresses and records the targets it was asked for."""

    def __init__(self):
        import socketserver

        self.targets: list[str] = []
        outer = self

        class H(socketserver.BaseRequestHandler):
            def handle(self):
                f = self.request.makefile("rb")
                line = f.readline().decode("latin-1").split()
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                if len(line) < 2 or line[0] != "CONNECT" or not line[1].startswith("127."):
                    self.request.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                outer.targets.append(line[1])
                host, port = line[1].rsplit(":", 1)
                up = socket.create_connection((host, int(port)))
                self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                _pipe(self.request, up)

        self.port = free_port()
        self._srv = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), H)
        self._srv.daemon_threads = True
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._srv.shutdown()
        self._srv.server_close()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    import select

    try:
        while True:
            r, _, _ = select.select([a, b], [], [], 30)
            if not r:
                return
            for s in r:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    finally:
        b.close()
