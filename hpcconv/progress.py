"""Progress reporting shared by every long step. A thin, thread-safe wrapper over rich.

Library code takes a `Reporter` and calls `task(...)`; the CLI decides whether bars are shown
(terminal, not --quiet/--json). With no reporter, `NullReporter` does nothing.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager


class Task:
    def __init__(self, reporter: "Reporter", task_id):
        self._r, self._id = reporter, task_id

    def advance(self, n: int) -> None:
        if self._id is not None:
            self._r._progress.advance(self._id, n)

    def update(self, **kw) -> None:
        if self._id is not None:
            self._r._progress.update(self._id, **kw)

    def done(self) -> None:
        if self._id is not None:
            self._r._progress.update(self._id, completed=self._r._total(self._id))


class Reporter:
    """Shows rich progress bars on stderr when `enabled`, and collects log lines."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._lock = threading.Lock()
        self._console = console
        self.messages: list[tuple[str, str]] = []

    def _ensure(self):
        if self._progress is None:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)
            from rich.console import Console

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(),
                                      console=self._console or Console(stderr=True), transient=False)
            self._progress.start()
        return self._progress

    def _total(self, task_id):
        for t in self._progress.tasks:
            if t.id == task_id:
                return t.total or t.completed
        return 0

    def task(self, description: str, total: int | None = None) -> Task:
        if not self.enabled:
            return Task(self, None)
        with self._lock:
            p = self._ensure()
            return Task(self, p.add_task(description, total=total))

    def log(self, level: str, message: str) -> None:
        self.messages.append(("warning" if level == "warn" else level, message))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextmanager
    def running(self):
        try:
            yield self
        finally:
            self.stop()


class NullReporter(Reporter):
    def __init__(self):
        super().__init__(enabled=False)


NULL = NullReporter()
