"""HTTP helpers of the registry client: Retry-After, backoff, CA bundles."""

from __future__ import annotations

import email.utils
import http.server
import os
import ssl
import tempfile
import time

import pytest

from hpcconv.errors import NetworkError
from hpcconv.registry.client import _range_ok
from hpcconv.registry.http import BACKOFF_CAP, RETRY_AFTER_CAP, Trust, backoff, retry_after


def test_retry_after_seconds_and_dates():
    assert retry_after("7") == 7
    assert retry_after("100000") == RETRY_AFTER_CAP
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(soon) <= 30
    assert retry_after(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0
    assert retry_after("soon") is None
    assert retry_after(None) is None


def test_backoff_grows_with_jitter_and_is_capped():
    for attempt in range(12):
        b = backoff(attempt)
        assert 0 < b <= BACKOFF_CAP
    assert backoff(1) <= backoff(6)   # 0.5..1 s vs 8..16 s with the default base


def test_range_check():
    assert _range_ok("bytes 100-999/1000", 100, 1000)
    assert _range_ok("bytes 100-999/*", 100, 1000)
    assert not _range_ok("bytes 0-999/1000", 100, 1000)
    assert not _range_ok("bytes 100-998/1000", 100, 1000)
    assert not _range_ok("bytes 100-999/2000", 100, 1000)
    assert not _range_ok("", 100, 1000)


def test_trust_adds_extra_ca_to_base(tmp_path, monkeypatch, test_certs):
    """The client's SSL context holds the base bundle (REQUESTS_CA_BUNDLE, else SSL_CERT_FILE) and
    the --ca-cert CA (real certificates, read back from the context); no file is written for it;
    a CA file that is missing or holds no certificate is a one-line error."""
    import glob

    def subjects(t):
        return {dict(x[0] for x in c["subject"])["commonName"] for c in t.context.get_ca_certs()}
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(test_certs.token_cert))
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "hpcconv-ca-*")))
    t = Trust(str(test_certs.ca))
    assert subjects(t) == {"hpcconv test token signer", "hpcconv test CA"}
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "hpcconv-ca-*"))) == before
    assert Trust(None).bundle == str(test_certs.token_cert)
    assert subjects(Trust(None)) == {"hpcconv test token signer"}
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("SSL_CERT_FILE", str(test_certs.ca))
    assert Trust(None).bundle == str(test_certs.ca) and subjects(Trust(None)) == {"hpcconv test CA"}
    with pytest.raises(NetworkError, match="cannot read CA bundle"):
        Trust(str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_bytes(b"EXTRA\n")
    with pytest.raises(NetworkError, match="holds no usable certificate"):
        Trust(str(tmp_path / "junk.pem"))


def test_token_realm_checks():
    """Where tokens (and the Basic credentials for them) may be fetched from; no network involved."""
    from hpcconv.errors import AuthError
    from hpcconv.reference import parse
    from hpcconv.registry.client import RegistryClient

    with RegistryClient(parse("127.0.0.1:5000/a/b")) as c:
        c._check_realm("https://auth.example.org/token?x=1")
        c._check_realm("https://127.0.0.1:5001/token")           # the registry's own host, another port
        for bad in ("http://auth.example.org/token", "http://127.0.0.1:5001/token", "https://10.1.2.3/token",
                    "https://127.0.0.2/token", "https://169.254.169.254/latest", "ftp://x/y", "token"):
            with pytest.raises(AuthError):
                c._check_realm(bad)
    with RegistryClient(parse("127.0.0.1:5000/a/b"), insecure=True) as c:
        c._check_realm("http://127.0.0.1:5001/token")            # --insecure: plain HTTP on that host only
        with pytest.raises(AuthError):
            c._check_realm("http://auth.example.org/token")


class _Ok(http.server.BaseHTTPRequestHandler):
    """A server that answers every GET with `{}`."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


def test_insecure_skips_certificate_checks_for_that_host_only(test_certs, monkeypatch):
    """--insecure for a registry: its TLS connections are not checked, while a server on another
    host is still checked, before and after, on the same session (the checked and the unchecked
    SSL context never mix); the CA bundle is loaded once, by the client's Trust when the first
    checked connection asks for it, and no connection loads one of its own. Real TLS servers on
    loopback with a certificate from a CA the client does not trust."""
    import threading

    from hpcconv.reference import parse
    from hpcconv.registry.client import RegistryClient
    from registryfix import server_context

    servers = []
    for ip in ("127.0.0.1", "127.0.0.2"):
        srv = http.server.ThreadingHTTPServer((ip, 0), _Ok)
        srv.socket = server_context(test_certs).wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    try:
        own, other = (f"{ip}:{s.server_address[1]}" for ip, s in zip(("127.0.0.1", "127.0.0.2"), servers))
        with RegistryClient(parse(f"{own}/a/b"), insecure=True) as c:
            loads = []
            real, real_files = ssl.SSLContext.load_default_certs, ssl.SSLContext.load_verify_locations
            monkeypatch.setattr(ssl.SSLContext, "load_default_certs",
                                lambda self, *a: loads.append(1) or real(self, *a))
            monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                                lambda self, *a, **k: loads.append(2) or real_files(self, *a, **k))
            for url in (f"https://{own}/v2/", f"https://{other}/v2/", f"https://{own}/v2/", f"https://{other}/v2/"):
                if url.startswith(f"https://{own}/"):
                    assert c._send("GET", url, {}).status_code == 200
                else:
                    with pytest.raises(NetworkError, match="certificate verify failed"):
                        c._send("GET", url, {})
            # (urllib3's own contexts: a store load per new connection; an eager Trust: none here)
            assert loads == [2]
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_plain_http_loads_no_ca_bundle_and_a_bad_one_fails_on_first_use(tmp_path, test_certs, monkeypatch):
    """A client that only talks plain HTTP (a local registry with --insecure) never loads a CA
    bundle (~20 ms a run); a base bundle that holds no certificate is not read when the client is
    made, and is a one-line error at the first checked HTTPS connection. Real servers on loopback."""
    import threading

    from hpcconv.reference import parse
    from hpcconv.registry.client import RegistryClient
    from registryfix import server_context

    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    tls.socket = server_context(test_certs).wrap_socket(tls.socket, server_side=True)
    for srv in (plain, tls):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    (tmp_path / "junk.pem").write_bytes(b"no certificate here\n")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "junk.pem"))
    loads = []
    real = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                        lambda self, *a, **k: loads.append(1) or real(self, *a, **k))
    try:
        host = f"127.0.0.1:{plain.server_address[1]}"
        with RegistryClient(parse(f"{host}/a/b"), insecure=True) as c:
            for _ in range(2):
                assert c._send("GET", f"http://{host}/v2/", {}).status_code == 200
            assert loads == []
            with pytest.raises(NetworkError, match=r"CA bundle .*junk.pem holds no usable certificate"):
                c._send("GET", f"https://localhost:{tls.server_address[1]}/v2/", {})
            assert loads == [1]
    finally:
        for srv in (plain, tls):
            srv.shutdown()
            srv.server_close()


def test_the_client_does_not_import_a_charset_detector():
    """requests would import chardet/charset_normalizer on import (~20 ms of every run's start-up)
    for text bodies the client never reads; they stay importable for others, and no warning shows."""
    import subprocess
    import sys

    code = ("import sys, warnings; warnings.simplefilter('error'); import hpcconv.registry.client, requests; "
            "assert not {'chardet', 'charset_normalizer'} & set(sys.modules), sorted(sys.modules); "
            "assert requests.compat.chardet is None; import charset_normalizer; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
