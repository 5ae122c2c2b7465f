"""WWW-Authenticate parsing (RFC 7235), token URLs and the token cache."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from hpcconv.registry.auth import (MIN_EXPIRY, Challenge, TokenCache, expiry_seconds, merge_scopes,
                                   parse_challenges, pick, token_from_response, token_url)


def test_docker_hub_style():
    [c] = parse_challenges('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                           'scope="repository:library/alpine:pull"')
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scopes == ["repository:library/alpine:pull"]


def test_several_challenges_and_case():
    cs = parse_challenges('Basic realm="Registry Realm", BEARER Realm="https://r/t", Service=svc, '
                          'error="insufficient_scope"')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].params == {"realm": "Registry Realm"}
    assert cs[1].params == {"realm": "https://r/t", "service": "svc", "error": "insufficient_scope"}
    assert pick(cs).scheme == "bearer"
    assert pick(parse_challenges('Basic realm="x"')).scheme == "basic"
    assert pick(parse_challenges('Negotiate abc')) is None


def test_quoted_commas_equals_and_escapes():
    [c] = parse_challenges(r'Bearer realm="https://nvcr.io/proxy_auth?scope=repository:nvidia/tensorflow:pull,push",'
                           r' note="a \"quoted\" word, x=y"')
    assert c.realm == "https://nvcr.io/proxy_auth?scope=repository:nvidia/tensorflow:pull,push"
    assert c.params["note"] == 'a "quoted" word, x=y'
    assert c.service == ""


def test_rfc7235_example_and_token68():
    cs = parse_challenges('Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"')
    assert [c.scheme for c in cs] == ["newauth", "basic"]
    assert cs[0].params == {"realm": "apps", "type": "1", "title": 'Login to "apps"'}
    cs = parse_challenges("Negotiate dG9rZW4=, Basic, Bearer realm=https://x/y")
    assert [(c.scheme, c.token68) for c in cs] == [("negotiate", "dG9rZW4="), ("basic", ""), ("bearer", "")]
    assert cs[2].realm == "https://x/y"


def test_multiple_scopes_and_garbage():
    [c] = parse_challenges('Bearer realm="r" , scope="repository:a:pull  repository:b:pull,push"')
    assert c.scopes == ["repository:a:pull", "repository:b:pull,push"]
    assert parse_challenges("") == []
    assert parse_challenges('"junk", Bearer realm="r"')[0].realm == "r"
    # an unterminated quoted string takes the rest instead of crashing
    assert parse_challenges('Bearer realm="https://r/t')[0].realm == "https://r/t"


def test_token_url_keeps_realm_query_and_repeats_scope():
    url = token_url("https://nvcr.io/proxy_auth?scope=repository:nvidia/tf:pull,push&x=1", "",
                    ["repository:nvidia/tf:pull,push", "repository:other:pull"])
    q = parse_qsl(urlsplit(url).query)
    assert q == [("scope", "repository:nvidia/tf:pull,push"), ("x", "1"), ("scope", "repository:other:pull")]
    url = token_url("https://auth.docker.io/token", "registry.docker.io", ["repository:a:pull", "repository:b:pull"])
    assert parse_qsl(urlsplit(url).query) == [("service", "registry.docker.io"), ("scope", "repository:a:pull"),
                                              ("scope", "repository:b:pull")]
    assert urlsplit(url).netloc == "auth.docker.io"


def test_merge_scopes_puts_new_first():
    assert merge_scopes(["repository:b:pull"], ["repository:a:pull", "repository:b:pull"]) == \
        ["repository:b:pull", "repository:a:pull"]


def test_token_response_fields_and_expiry():
    assert token_from_response({"token": "t", "expires_in": 300}) == ("t", 300)
    assert token_from_response({"access_token": "a"}) == ("a", MIN_EXPIRY)
    assert token_from_response({"token": "t", "access_token": "a"})[0] == "t"
    assert token_from_response({}) == ("", MIN_EXPIRY)
    assert expiry_seconds(5) == MIN_EXPIRY            # clamp: never less than 60 s
    assert expiry_seconds("x") == MIN_EXPIRY
    assert expiry_seconds(10 ** 9) == 24 * 3600


def test_token_cache_expiry_and_keys():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("https://r/t", "svc", ["repository:a:pull", "repository:b:pull"], "tok", 60)
    assert cache.get("https://r/t", "svc", ["repository:b:pull", "repository:a:pull"]) == "tok"  # set semantics
    assert cache.get("https://r/t", "svc", ["repository:a:pull"]) is None
    assert cache.get("https://r/t", "other", ["repository:a:pull", "repository:b:pull"]) is None
    now[0] += 45
    assert cache.get("https://r/t", "svc", ["repository:a:pull", "repository:b:pull"]) == "tok"
    now[0] += 6                                        # within the early-refresh window
    assert cache.get("https://r/t", "svc", ["repository:a:pull", "repository:b:pull"]) is None


def test_challenge_defaults():
    c = Challenge("bearer")
    assert (c.realm, c.service, c.scopes) == ("", "", [])
