"""HTTP plumbing for the registry client: TLS trust, proxies, retries with backoff.

* `trust_env` is off on the session so that requests never re-applies `~/.netrc` credentials to a
  redirect target; proxies are still taken from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` per request
  with requests' own `get_environ_proxies` (so loopback is proxied unless NO_PROXY says otherwise,
  exactly as plain requests would do).
* Trust: `REQUESTS_CA_BUNDLE`, else `SSL_CERT_FILE`, else certifi is the base bundle; `--ca-cert`
  adds to it (both loaded into one SSL context, no file written).
* Retries: 429/500/502/503/504 and connection errors, exponential backoff with jitter, honouring
  `Retry-After` (seconds or an HTTP date), bounded attempts. TLS errors are not retried; a refused
  connection or unknown host is retried once.
* Knobs (environment, read when a request is made): HPCCONV_HTTP_ATTEMPTS (5),
  HPCCONV_BACKOFF_BASE (0.5 s), HPCCONV_CONNECT_TIMEOUT (30 s), HPCCONV_READ_TIMEOUT (120 s, also
  `--timeout`: no byte for that long aborts the read), HPCCONV_MIN_RATE (1024 bytes/s) and
  HPCCONV_SLOW_TIMEOUT (60 s): a blob body arriving slower than the minimum rate for longer than
  that is cut and resumed with Range, like a dropped connection (the rate watchdog; 0 disables it).
"""

from __future__ import annotations

import email.utils
import os
import random
import ssl
import threading
import time
import warnings
from typing import Callable

import requests
from urllib3.util.ssl_ import create_urllib3_context
from requests.utils import get_environ_proxies

from ..errors import NetworkError

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
TIMEOUT = (float(os.environ.get("HPCCONV_CONNECT_TIMEOUT", "30")), float(os.environ.get("HPCCONV_READ_TIMEOUT", "120")))
MAX_ATTEMPTS = int(os.environ.get("HPCCONV_HTTP_ATTEMPTS", "5"))
BACKOFF_BASE = float(os.environ.get("HPCCONV_BACKOFF_BASE", "0.5"))
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
USER_AGENT = "hpcconv/0.1 (+python-requests)"


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name) or default)
    except ValueError:
        return default


def timeouts() -> tuple[float, float]:
    """(connect, read) timeouts for requests, from the environment at call time."""
    return _env_float("HPCCONV_CONNECT_TIMEOUT", 30), _env_float("HPCCONV_READ_TIMEOUT", 120)


def min_rate() -> tuple[float, float]:
    """(bytes/s, seconds): the blob rate watchdog's minimum rate and how long it may be undercut."""
    return _env_float("HPCCONV_MIN_RATE", 1024), _env_float("HPCCONV_SLOW_TIMEOUT", 60)


def base_bundle() -> str:
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and os.path.isfile(os.environ[var]):
            return os.environ[var]
    import certifi

    return certifi.where()


class Trust:
    """What TLS servers are checked against: one SSL context holding the CA bundle
    (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, else certifi's) and, with --ca-cert, that CA too, built
    once per client and given to urllib3 by `mount_tls`. (urllib3 otherwise reads a bundle file
    into a fresh context for every new connection, ~20 ms each; and --ca-cert needed a combined
    bundle written to /tmp, which a killed process left behind.) `bundle`: the base bundle's path.

    Without --ca-cert the context is built when the first checked HTTPS connection asks for it:
    loading the base bundle takes ~20 ms, which a run against a plain-HTTP registry (a local one,
    the test suite's, the benchmark's) never needs. A --ca-cert file is loaded at once, so that a
    bad one fails before anything is sent."""

    def __init__(self, ca_cert: str | None):
        self._ca_cert = ca_cert
        self._bundle: str | None = None
        self._context = None
        self._lock = threading.Lock()           # (download threads may open the first connections)
        if ca_cert:
            self._load()

    @property
    def bundle(self) -> str:
        if self._bundle is None:
            self._bundle = base_bundle()
        return self._bundle

    @property
    def context(self) -> ssl.SSLContext:
        return self._context if self._context is not None else self._load()

    def _load(self) -> ssl.SSLContext:
        with self._lock:
            if self._context is None:
                context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                for path in [self.bundle] + ([self._ca_cert] if self._ca_cert else []):
                    try:
                        context.load_verify_locations(cafile=path)
                    except ssl.SSLError as e:
                        raise NetworkError(f"CA bundle {path} holds no usable certificate ({e.reason or e})") from None
                    except OSError as e:
                        raise NetworkError(f"cannot read CA bundle {path}: {e.strerror or e}") from None
                self._context = context
            return self._context


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), capped."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_CAP)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, min(when.timestamp() - time.time(), RETRY_AFTER_CAP))


def backoff(attempt: int) -> float:
    base = min(BACKOFF_CAP, BACKOFF_BASE * (2 ** attempt))
    return base / 2 + random.uniform(0, base / 2)


def new_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.headers["User-Agent"] = USER_AGENT
    return s


class _ContextTLS(requests.adapters.HTTPAdapter):
    """HTTPS through SSL contexts made once: the Trust's for requests sent with verify=True
    (built when the first such connection is made), one without checks for verify=False (the
    --insecure host, `_verify_for`). Each context goes into the connection pool's key, so a pool,
    and the per-connection setting of its context's verify mode, only ever sees one verify value.
    urllib3 loads CA files only into a context it makes itself or when told a CA path, which
    requests' cert_verify tells it for every checked connection: cleared here (the context holds
    the CAs)."""

    def __init__(self, trust: Trust):
        self._trust = trust
        self._unchecked = None
        super().__init__()

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if verify is True:
            pool_kwargs["ssl_context"] = self._trust.context
        elif verify is False:
            if self._unchecked is None:
                self._unchecked = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
            pool_kwargs["ssl_context"] = self._unchecked
        else:
            raise ValueError("verify is True or False here (the CAs are in the Trust's context)")
        pool_kwargs.pop("ca_certs", None)
        pool_kwargs.pop("ca_cert_dir", None)
        return host_params, pool_kwargs

    def cert_verify(self, conn, url, verify, cert) -> None:
        super().cert_verify(conn, url, verify, cert)
        conn.ca_certs = conn.ca_cert_dir = None


def mount_tls(session: requests.Session, trust: Trust) -> None:
    """HTTPS checked against `trust`'s context (requests sent with verify=True), or not checked at
    all (verify=False), without loading a CA file per connection: urllib3 would load the system
    store into a fresh context for every new connection, ~20 ms, even an unchecked one."""
    session.mount("https://", _ContextTLS(trust))


def send(session: requests.Session, method: str, url: str, *, headers: dict, verify, stream: bool = False,
         data=None, cancelled: Callable[[], bool] | None = None,
         sleep: Callable[[float], None] = time.sleep) -> requests.Response:
    """One logical request: retried on connection errors and 429/5xx, never following redirects.

    Returns the last response (possibly still an error status after the last attempt)."""
    last_error = ""
    for attempt in range(MAX_ATTEMPTS):
        if cancelled and cancelled():
            raise NetworkError("download cancelled")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # InsecureRequestWarning when the user chose --insecure
                r = session.request(method, url, headers=headers, verify=verify, stream=stream, data=data,
                                    allow_redirects=False, timeout=timeouts(), proxies=get_environ_proxies(url))
        except requests.exceptions.SSLError:
            raise
        except (requests.ConnectionError, requests.Timeout) as e:
            last_error = _reason(e)
            # a refused connection or unknown host is retried once, a dropped or slow one fully
            limit = min(2, MAX_ATTEMPTS) if _connect_failed(e) else MAX_ATTEMPTS
            if attempt + 1 < limit:
                sleep(backoff(attempt))
                continue
            raise NetworkError(f"cannot reach {_origin(url)}: {last_error}",
                               hint="check the registry address, your network and HTTPS_PROXY/NO_PROXY") from None
        if r.status_code in RETRY_STATUS and attempt + 1 < MAX_ATTEMPTS:
            wait = retry_after(r.headers.get("Retry-After"))
            r.close()
            sleep(wait if wait is not None else backoff(attempt))
            continue
        return r
    raise AssertionError("unreachable")


def _connect_failed(e: Exception) -> bool:
    import urllib3

    if isinstance(e, requests.ConnectTimeout):
        return True
    reason = getattr(e.args[0], "reason", None) if e.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError) or \
        isinstance(e.args[0] if e.args else None, urllib3.exceptions.NewConnectionError)


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def _reason(e: Exception) -> str:
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Temporary failure",
                   "No route to host", "Connection reset", "RemoteDisconnected", "Network is unreachable"):
        if marker in text:
            return marker.lower() if marker != "RemoteDisconnected" else "connection closed by the server"
    return text.splitlines()[0][:200] if text else type(e).__name__

