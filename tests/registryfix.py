"""Registry fixtures (docker-registry on 127.0.0.1: plain HTTP, TLS + htpasswd, token auth)."""
