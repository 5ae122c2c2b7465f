"""Credential lookup: docker config.json (auths, credHelpers, credsStore), podman auth.json,
DOCKER_AUTH_CONFIG. Helpers are real executables (`docker-credential-test`) on a temporary PATH."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from hpcconv.errors import AuthError
from hpcconv.registry.credentials import lookup, normalize_key, server_url


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


HELPER = """#!/bin/sh
# docker-credential-{name}: answers from a JSON table keyed by server URL; logs what it was asked
read url
echo "$1 $url" >> "{log}"
python3 - "$url" <<'EOF'
import json, sys
table = json.load(open("{table}"))
entry = table.get(sys.argv[1])
if entry is None:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps({{"ServerURL": sys.argv[1], "Username": entry[0], "Secret": entry[1]}}))
EOF
"""


@pytest.fixture
def env(tmp_path) -> dict:
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    return {"HOME": str(home), "PATH": f"{bindir}:{os.environ['PATH']}"}


def helper(env: dict, name: str, table: dict) -> Path:
    bindir = Path(env["PATH"].split(":")[0])
    log = bindir.parent / f"{name}.log"
    tfile = bindir.parent / f"{name}.json"
    tfile.write_text(json.dumps(table))
    exe = bindir / f"docker-credential-{name}"
    exe.write_text(HELPER.format(name=name, log=log, table=tfile))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return log


def docker_config(env: dict, obj: dict) -> None:
    (Path(env["HOME"]) / ".docker" / "config.json").write_text(json.dumps(obj))


def test_normalize_key():
    assert normalize_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_key("registry-1.docker.io") == "docker.io"
    assert normalize_key("http://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    assert normalize_key("quay.io/org/repo") == "quay.io/org/repo"
    assert server_url("docker.io") == "https://index.docker.io/v1/"
    assert server_url("ghcr.io") == "ghcr.io"


def test_inline_auths_legacy_keys(env):
    docker_config(env, {"auths": {"https://index.docker.io/v1/": {"auth": b64("hubuser:hubpass\x00")},
                                  "http://127.0.0.1:5000/v1/": {"username": "u", "password": "p:w"},
                                  "ghcr.io": {}}})
    c = lookup("docker.io", "library/alpine", env)
    assert (c.username, c.password) == ("hubuser", "hubpass")          # trailing NUL trimmed
    c = lookup("127.0.0.1:5000", "a/b", env)
    assert (c.username, c.password) == ("u", "p:w")
    assert lookup("ghcr.io", "x/y", env) is None                        # empty marker entry
    assert lookup("other.io", "x", env) is None


def test_docker_config_env_var_and_identity_token(env, tmp_path):
    d = tmp_path / "dcfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"auths": {"myacr.io": {"auth": b64("0000:"), "identitytoken": "rt"}}}))
    env["DOCKER_CONFIG"] = str(d)
    c = lookup("myacr.io", "r", env)
    assert c.identity_token == "rt" and c.usable


def test_bad_auth_value_is_a_clear_error(env):
    docker_config(env, {"auths": {"r.io": {"auth": b64("no-colon")}}})
    with pytest.raises(AuthError) as e:
        lookup("r.io", "x", env)
    assert "user:password" in e.value.message


def test_cred_helpers_beat_creds_store_beat_auths(env):
    per_host = helper(env, "perhost", {"r.io": ["helper-user", "helper-secret"]})
    store = helper(env, "store", {"s.io": ["store-user", "store-secret"],
                                  "https://index.docker.io/v1/": ["hub", "hubsecret"]})
    docker_config(env, {"credHelpers": {"r.io": "perhost"}, "credsStore": "store",
                        "auths": {"r.io": {"auth": b64("inline:x")}, "t.io": {"auth": b64("inline-t:y")}}})
    c = lookup("r.io", "a", env)
    assert (c.username, c.password, c.source) == ("helper-user", "helper-secret",
                                                  "credential helper docker-credential-perhost")
    assert lookup("s.io", "a", env).username == "store-user"
    assert lookup("docker.io", "library/x", env).username == "hub"        # Hub's legacy server URL on stdin
    assert lookup("t.io", "a", env).username == "inline-t"               # store has nothing: inline auths
    assert per_host.read_text().split() == ["get", "r.io"]
    assert "get https://index.docker.io/v1/" in store.read_text()


def test_helper_token_username_and_failures(env):
    helper(env, "tok", {"r.io": ["<token>", "refresh-me"]})
    docker_config(env, {"credHelpers": {"r.io": "tok", "q.io": "missing"}})
    c = lookup("r.io", "a", env)
    assert c.identity_token == "refresh-me" and not c.username
    warnings = []
    assert lookup("q.io", "a", env, warn=warnings.append) is None        # helper not installed: warn, go on
    assert "docker-credential-missing" in warnings[0]


def test_podman_auth_json_order_and_namespaces(env, tmp_path):
    xdg = tmp_path / "xdg-config"
    (xdg / "containers").mkdir(parents=True)
    (xdg / "containers" / "auth.json").write_text(json.dumps({"auths": {
        "quay.io": {"auth": b64("top:1")},
        "quay.io/org": {"auth": b64("org:2")},
        "quay.io/org/team/repo": {"auth": b64("repo:3")}}}))
    env["XDG_CONFIG_HOME"] = str(xdg)
    docker_config(env, {"auths": {"quay.io": {"auth": b64("docker:0")}}})
    assert lookup("quay.io", "org/team/repo", env).username == "repo"
    assert lookup("quay.io", "org/team/other", env).username == "org"
    assert lookup("quay.io", "else/x", env).username == "top"
    run = tmp_path / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(json.dumps({"auths": {"quay.io": {"auth": b64("runtime:4")}}}))
    env["XDG_RUNTIME_DIR"] = str(run)
    assert lookup("quay.io", "org/team/repo", env).username == "runtime"   # runtime file comes first
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"auths": {"quay.io/org/team": {"auth": b64("explicit:5")}}}))
    env["REGISTRY_AUTH_FILE"] = str(explicit)
    assert lookup("quay.io", "org/team/repo", env).username == "explicit"
    assert lookup("quay.io", "zzz", env).username == "runtime"


def test_docker_auth_config_env_wins(env):
    docker_config(env, {"auths": {"r.io": {"auth": b64("file:1")}}})
    env["DOCKER_AUTH_CONFIG"] = json.dumps({"auths": {"https://r.io/v1/": {"auth": b64("envuser:2")}}})
    assert lookup("r.io", "a", env).username == "envuser"
    env["DOCKER_AUTH_CONFIG"] = "{not json"
    with pytest.raises(AuthError):
        lookup("r.io", "a", env)


def test_no_files_no_credentials(env):
    assert lookup("r.io", "a", env) is None
