"""Registry credentials from the places Docker and Podman users keep them.

Order (first hit wins; explicit --username/--password beat all of this and are handled by the caller):

1. `DOCKER_AUTH_CONFIG` (JSON with an `auths` map, as docker/cli's env store)
2. `REGISTRY_AUTH_FILE` (containers auth.json)
3. `$XDG_RUNTIME_DIR/containers/auth.json`
4. `$XDG_CONFIG_HOME/containers/auth.json` (default `~/.config/containers/auth.json`)
5. `$DOCKER_CONFIG/config.json` (default `~/.docker/config.json`): `credHelpers[host]`, then
   `credsStore`, then the inline `auths` entry.

In `auths` maps, legacy URL keys (`https://index.docker.io/v1/`) are normalised to host names, and
namespaced keys (`quay.io/org/repo`) are matched most specific first, as containers/image does.
Helpers run as `docker-credential-NAME get` with the server URL on stdin; user `<token>` means the
secret is an identity (refresh) token.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from ..errors import AuthError

HUB_SERVER_URL = "https://index.docker.io/v1/"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credential:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    source: str = ""                         # where it came from, for messages

    @property
    def usable(self) -> bool:
        return bool(self.identity_token or (self.username and self.password))


def normalize_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/v2/` -> `host:5000`;
    `quay.io/org/repo` stays namespaced."""
    k = key.strip()
    legacy = False
    for prefix in ("https://", "http://"):
        if k.lower().startswith(prefix):
            k, legacy = k[len(prefix):], True
    if legacy:
        k = k.split("/", 1)[0]
    k = k.rstrip("/")
    host, sep, rest = k.partition("/")
    if host.lower() in _HUB_ALIASES:
        host = "docker.io"
    return host + (sep + rest if rest else "")


def server_url(registry: str) -> str:
    """What a credential helper is asked for (Docker Hub's legacy URL, else the host)."""
    return HUB_SERVER_URL if registry in _HUB_ALIASES else registry


def _candidates(registry: str, repository: str) -> list[str]:
    parts = repository.split("/") if repository else []
    out = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)]
    return out + [registry]


def _decode_entry(entry, where: str) -> Credential | None:
    if not isinstance(entry, dict):
        return None
    user, pw = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            text = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"invalid base64 'auth' value in {where}") from None
        user, sep, pw = text.partition(":")
        if not sep or not user:
            raise AuthError(f"invalid 'auth' value in {where}: expected base64 of user:password")
        pw = pw.rstrip("\x00")
    token = str(entry.get("identitytoken") or "")
    cred = Credential(user, pw, token, where)
    return cred if cred.usable else None


def _from_auths(auths, registry: str, repository: str, where: str, namespaced: bool) -> Credential | None:
    if not isinstance(auths, dict):
        return None
    table: dict[str, object] = {}
    for k, v in auths.items():
        table.setdefault(normalize_key(str(k)), v)
    keys = _candidates(registry, repository) if namespaced else [registry]
    for key in keys:
        if key in table:
            cred = _decode_entry(table[key], f"{where} ({key})")
            if cred:
                return cred
    return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read credentials file {path}: {e}") from None
    return data if isinstance(data, dict) else None


def run_helper(name: str, registry: str, env: Mapping[str, str] | None = None,
               warn: Callable[[str], None] | None = None) -> Credential | None:
    exe = f"docker-credential-{name}"
    try:
        r = subprocess.run([exe, "get"], input=server_url(registry).encode(), capture_output=True, timeout=60,
                           env=dict(env) if env is not None else None)
    except FileNotFoundError:
        if warn:
            warn(f"credential helper {exe} is configured but not installed; continuing without it")
        return None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {exe} did not answer within 60 s") from None
    out = (r.stdout + r.stderr).decode(errors="replace").strip()
    if r.returncode != 0:
        if "credentials not found" in out.lower():
            return None
        raise AuthError(f"credential helper {exe} failed: {out.splitlines()[-1] if out else r.returncode}")
    try:
        obj = json.loads(r.stdout)
        user, secret = str(obj.get("Username") or ""), str(obj.get("Secret") or "")
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {exe} printed something that is not credentials JSON") from None
    where = f"credential helper {exe}"
    if user == "<token>":
        return Credential("", "", secret, where) if secret else None
    cred = Credential(user, secret, "", where)
    return cred if cred.usable else None


def _docker_config(env: Mapping[str, str], home: Path) -> Path:
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    return home / ".docker" / "config.json"


def auth_files(env: Mapping[str, str] | None = None) -> list[tuple[Path, str]]:
    """(path, kind) in lookup order; kind is 'containers' or 'docker'."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    out: list[tuple[Path, str]] = []
    if env.get("REGISTRY_AUTH_FILE"):
        out.append((Path(env["REGISTRY_AUTH_FILE"]), "containers"))
    if env.get("XDG_RUNTIME_DIR"):
        out.append((Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json", "containers"))
    cfg_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    out.append((cfg_home / "containers" / "auth.json", "containers"))
    out.append((_docker_config(env, home), "docker"))
    return out


def lookup(registry: str, repository: str = "", env: Mapping[str, str] | None = None,
           warn: Callable[[str], None] | None = None) -> Credential | None:
    """Credentials for `registry` (normalised: docker.io, host:port) and `repository`, or None."""
    env = os.environ if env is None else env
    registry = normalize_key(registry)
    if env.get("DOCKER_AUTH_CONFIG"):
        try:
            obj = json.loads(env["DOCKER_AUTH_CONFIG"])
        except ValueError:
            raise AuthError("DOCKER_AUTH_CONFIG is not valid JSON") from None
        if isinstance(obj, dict):
            cred = _from_auths(obj.get("auths"), registry, repository, "DOCKER_AUTH_CONFIG", False)
            if cred:
                return cred
    for path, kind in auth_files(env):
        data = _read_json(path)
        if data is None:
            continue
        if kind == "docker":
            helpers = data.get("credHelpers") if isinstance(data.get("credHelpers"), dict) else {}
            helper = {normalize_key(str(k)): v for k, v in helpers.items()}.get(registry)
            if helper:
                return run_helper(str(helper), registry, env, warn)
            if data.get("credsStore"):
                cred = run_helper(str(data["credsStore"]), registry, env, warn)
                if cred:
                    return cred
        cred = _from_auths(data.get("auths"), registry, repository, str(path), kind == "containers")
        if cred:
            return cred
    return None
