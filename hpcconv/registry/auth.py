"""`WWW-Authenticate` challenges (RFC 7235 / RFC 6750) and the bearer-token cache.

The parser handles several challenges in one header, quoted strings holding `,` `=` and escaped
quotes, case-insensitive schemes and parameter names, and token68 (`Basic abc==`). Token cache keys
are (realm, service, scope set); expiry follows the distribution token spec (`expires_in` defaults
to 60 s and is never taken as less than that).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_BARE = re.compile(r"[^,\s\"]*")
_WS = " \t"

MIN_EXPIRY = 60          # distribution token spec: default and minimum lifetime in seconds
MAX_EXPIRY = 24 * 3600   # do not trust a token for longer than a day whatever the server says
EARLY_REFRESH = 10       # refresh this many seconds before expiry


@dataclass
class Challenge:
    scheme: str                                   # lower case: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)   # names lower case
    token68: str = ""

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> list[str]:
        return self.params.get("scope", "").split()


def _skip(s: str, i: int, chars: str) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int]:
    """Read a quoted-string starting at s[i] == '"'; returns (value, index after it)."""
    out = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), i   # unterminated: take the rest


def parse_challenges(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate value (or several joined with commas) into challenges."""
    s = header or ""
    out: list[Challenge] = []
    cur: Challenge | None = None
    i = 0
    while True:
        i = _skip(s, i, _WS + ",")
        if i >= len(s):
            break
        m = _TOKEN.match(s, i)
        if not m:                       # garbage: skip to the next comma
            nxt = s.find(",", i)
            i = len(s) if nxt < 0 else nxt + 1
            continue
        name = m.group()
        j = _skip(s, m.end(), _WS)
        if cur is not None and j < len(s) and s[j] == "=":
            j = _skip(s, j + 1, _WS)
            if j < len(s) and s[j] == '"':
                value, j = _quoted(s, j)
            else:
                mv = _BARE.match(s, j)          # a token; be lenient with unquoted URLs
                value, j = mv.group(), mv.end()
            cur.params.setdefault(name.lower(), value)
            i = j
            continue
        cur = Challenge(name.lower())
        out.append(cur)
        m68 = _TOKEN68.match(s, j) if j > m.end() else None
        if m68:
            k = _skip(s, m68.end(), _WS)
            if k >= len(s) or s[k] == ",":      # `Basic dXNlcg==` (not `realm=...`)
                cur.token68 = m68.group()
                j = m68.end()
        i = j
    return out


def pick(challenges: list[Challenge]) -> Challenge | None:
    """Prefer Bearer, then Basic; other schemes are not supported."""
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


def token_url(realm: str, service: str, scopes: list[str]) -> str:
    """The GET URL for a token: the realm's own query kept, `service`, one `scope=` per scope."""
    parts = urlsplit(realm)
    query = parse_qsl(parts.query, keep_blank_values=True)
    have = {(k, v) for k, v in query}
    if service and ("service", service) not in have:
        query.append(("service", service))
    for sc in scopes:
        if ("scope", sc) not in have:
            query.append(("scope", sc))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


def merge_scopes(needed: list[str], have: list[str]) -> list[str]:
    """Newly needed scopes first (some registries read only the first `scope=`), no duplicates."""
    out: list[str] = []
    for s in list(needed) + list(have):
        if s and s not in out:
            out.append(s)
    return out


def expiry_seconds(expires_in) -> int:
    try:
        n = int(expires_in)
    except (TypeError, ValueError):
        n = MIN_EXPIRY
    return max(MIN_EXPIRY, min(n, MAX_EXPIRY))


def token_from_response(obj: dict) -> tuple[str, int]:
    """(token, lifetime seconds) from a token endpoint's JSON; `token` or `access_token`."""
    tok = obj.get("token") or obj.get("access_token") or ""
    if not isinstance(tok, str):
        tok = ""
    return tok, expiry_seconds(obj.get("expires_in"))


class TokenCache:
    """Thread-safe bearer tokens keyed by (realm, service, frozenset(scopes))."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[tuple, tuple[str, float]] = {}

    @staticmethod
    def key(realm: str, service: str, scopes: list[str]) -> tuple:
        return (realm, service, frozenset(scopes))

    def get(self, realm: str, service: str, scopes: list[str]) -> str | None:
        with self._lock:
            hit = self._tokens.get(self.key(realm, service, scopes))
        if hit and hit[1] - EARLY_REFRESH > self._clock():
            return hit[0]
        return None

    def put(self, realm: str, service: str, scopes: list[str], token: str, lifetime: int) -> None:
        with self._lock:
            self._tokens[self.key(realm, service, scopes)] = (token, self._clock() + lifetime)

    def drop(self, realm: str, service: str, scopes: list[str]) -> None:
        with self._lock:
            self._tokens.pop(self.key(realm, service, scopes), None)
