"""The registry client (client.py) and its HTTP plumbing (http.py)."""


def _import_requests() -> None:
    """Import requests without a character-set detector: requests imports chardet or
    charset_normalizer when it is imported (~20 ms here, a tenth of a small conversion's start-up)
    only to guess the encoding of a text body that declares none, which this client never reads as
    text (registry replies are JSON or bytes; requests decodes JSON without a detector, and falls
    back to UTF-8 for `.text`). Only when requests is not imported yet; the detector modules stay
    importable for anyone else."""
    import sys

    if "requests" in sys.modules:
        return
    blocked = [m for m in ("chardet", "charset_normalizer") if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None                 # `import m` raises ImportError, which requests expects
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # RequestsDependencyWarning: no detector found
            import requests  # noqa: F401
    finally:
        for m in blocked:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]


_import_requests()
