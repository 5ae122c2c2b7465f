"""The optional C module (`hpcconv/_native.c`, built by setup.py when a C compiler and the Python
headers are there): `native`, or None when it is not built or HPCCONV_NO_NATIVE is set. Each user
keeps its pure-Python code for that case (tests/test_native.py compares the two)."""

from __future__ import annotations

import os


def _load():
    if os.environ.get("HPCCONV_NO_NATIVE"):
        return None
    try:
        from . import _native
    except ImportError:
        return None
    return _native


native = _load()
