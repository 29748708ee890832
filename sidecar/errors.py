"""Exception hierarchy: raise deep, translate once at the edge.

Protocol errors carry the HTTP status the edge should answer with, in the
spirit of h11's ``error_status_hint``; datapath errors name the step that
failed so an operator knows which kernel object to look at.
"""

from __future__ import annotations

from dataclasses import dataclass


class SidecarError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass(frozen=True)
class PolicyIssue:
    """One problem found in a policy file, at a 1-based line."""

    line: int
    message: str


class PolicyError(SidecarError):
    """A policy file that cannot be used; the running policy stays in force."""

    def __init__(self, path: str, issues: list[PolicyIssue]) -> None:
        self.path = path
        self.issues = sorted(issues, key=lambda i: i.line)
        super().__init__(self.format())

    def format(self) -> str:
        """``FILE:LINE: what is wrong``, one line per issue, like a compiler."""
        return "\n".join(f"{self.path}:{i.line}: {i.message}" for i in self.issues)


class ProtocolError(SidecarError):
    """An HTTP peer broke the protocol; ``status_hint`` is the answer to send."""

    status_hint = 400

    def __init__(self, message: str, status_hint: int | None = None) -> None:
        super().__init__(message)
        if status_hint is not None:
            self.status_hint = status_hint


class DownstreamProtocolError(ProtocolError):
    """The client sent something we refuse (400, 414, 431)."""


class UpstreamProtocolError(ProtocolError):
    """The upstream failed us (502, or 504 on a timeout)."""

    status_hint = 502


class DatapathError(SidecarError):
    """A kernel step failed; ``step`` says which, ``code`` is the errno if any."""

    def __init__(self, step: str, message: str, code: int | None = None, hint: str = "") -> None:
        self.step = step
        self.code = code
        self.hint = hint
        text = f"{step}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)
