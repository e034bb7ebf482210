"""A progress bar for long work at the command line, without a dependency.

On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints a line
at each quarter, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self, label: str, total: int, unit: str = "", stream: TextIO | None = None, width: int = 30
    ) -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.started = time.monotonic()
        self._interactive = self.stream.isatty()
        self._next_quarter = 1

    def advance(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        if self._interactive:
            self._draw("\r")
        elif self.done * 4 >= self._next_quarter * self.total:
            while self.done * 4 >= self._next_quarter * self.total:
                self._next_quarter += 1
            self._draw("", "\n")

    def finish(self) -> None:
        if self._interactive:
            self._draw("\r", "\n")

    def _draw(self, prefix: str, suffix: str = "") -> None:
        share = self.done / self.total
        filled = int(share * self.width)
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(
            f"{prefix}{self.label:<10} [{bar}] {share:4.0%} {self.done:,}/"
            f"{self.total:,} {self.unit} ({rate:,.0f}/s){suffix}"
        )
        self.stream.flush()
