"""Check results every stage returns; the CLI and the reports render them."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclass
class Check:
    stage: str          # build, pull, flatten, rewrite, emit, run
    name: str
    status: str         # pass | warn | fail | skip
    detail: str = ""
    duration: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Checks:
    items: list[Check] = field(default_factory=list)

    def add(self, stage: str, name: str, status: str, detail: str = "", duration: float = 0.0) -> Check:
        c = Check(stage, name, status, detail, round(duration, 3))
        self.items.append(c)
        return c

    def extend(self, other: "Checks | list[Check]") -> None:
        self.items.extend(other.items if isinstance(other, Checks) else other)

    @contextmanager
    def timed(self, stage: str, name: str):
        """Time a block; the block sets `.status`/`.detail` on the yielded check (default pass)."""
        c = Check(stage, name, PASS)
        t0 = time.monotonic()
        try:
            yield c
        finally:
            c.duration = round(time.monotonic() - t0, 3)
            self.items.append(c)

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.items)

    @property
    def warned(self) -> bool:
        return any(c.status == WARN for c in self.items)

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.items]
