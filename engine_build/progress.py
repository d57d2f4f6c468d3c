"""Progress of long build steps: a bar on a terminal, structured log events otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

_LOG = logging.getLogger("nemotron.build")


class Progress:
    """Counts steps of one named job and reports them."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()

    def advance(self, step: str, count: int = 1) -> None:
        """Mark `count` more steps done; `step` says what just finished."""
        self.done = min(self.total, self.done + count)
        if self.interactive:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {step[:40]:<40}")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            _LOG.info(
                "build_progress",
                extra={
                    "fields": {
                        "job": self.label,
                        "step": step,
                        "done": self.done,
                        "total": self.total,
                        "seconds": round(time.monotonic() - self.started, 1),
                    }
                },
            )
