"""Typed errors a user can cause, each with a one-line message, an optional hint and an exit code.

Exit codes (the CLI contract): 0 success; 1 a check failed; 2 usage or profile error;
3 source/network/auth error; 4 corrupt or unsafe input.
"""

from __future__ import annotations


class HpcconvError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class CheckFailed(HpcconvError):
    exit_code = 1


class UsageError(HpcconvError):
    exit_code = 2


class ProfileError(HpcconvError):
    exit_code = 2


class SourceError(HpcconvError):
    """The source could not be read: unknown image, unsupported format, engine unreachable."""

    exit_code = 3


class NetworkError(SourceError):
    exit_code = 3


class AuthError(SourceError):
    exit_code = 3


class CorruptInput(HpcconvError):
    """Bytes that do not match their digest, truncated or undecodable data."""

    exit_code = 4


class UnsafeInput(HpcconvError):
    """Input that would escape the output root or otherwise cannot be handled safely."""

    exit_code = 4
