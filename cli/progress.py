"""Progress of long work at the command line, without a dependency.

On a terminal it redraws one line. Elsewhere (CI logs, pipes) it keeps logs
short: a line at a quarter only once the work has run for ``quiet_s`` since the
last line, and one closing line with the count and the rate. Work of unknown
size (``total=None``) shows a running count instead of a bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO


class Progress:
    """Use as a context manager, or call :meth:`finish` when the work ends."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str = "",
        stream: TextIO | None = None,
        width: int = 30,
        quiet_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = None if total is None else max(total, 1)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.width = width
        self.quiet_s = quiet_s
        self.done = 0
        self._clock = clock
        self.started = self._last_line = clock()
        self._interactive = self.stream.isatty()
        self._next_quarter = 1
        self._finished = False
        self._written: int | None = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.finish()

    def advance(self, count: int = 1) -> None:
        self.done = self.done + count if self.total is None else min(self.total, self.done + count)
        if self._interactive:
            self._draw("\r")
        elif self._due():
            self._last_line = self._clock()
            self._draw("", "\n")

    def finish(self) -> None:
        """Close the line: on a terminal end the redrawn one, elsewhere write the outcome
        unless the last line written already shows it."""
        if self._finished:
            return
        self._finished = True
        if self._interactive:
            self._draw("\r", "\n")
        elif self._written != self.done:
            self._draw("", "\n")

    def _due(self) -> bool:
        """Off a terminal: a new quarter was reached (or, with no total, any count) and the
        log has been quiet for long enough."""
        if self._clock() - self._last_line < self.quiet_s:
            return False
        if self.total is None:
            return True
        reached = False
        while self.done * 4 >= self._next_quarter * self.total:
            self._next_quarter += 1
            reached = True
        return reached

    def _draw(self, prefix: str, suffix: str = "") -> None:
        rate = self.done / max(self._clock() - self.started, 1e-6)
        if self.total is None:
            shown = f"{self.done:,} {self.unit}"
        else:
            share = self.done / self.total
            filled = int(share * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            shown = f"[{bar}] {share:4.0%} {self.done:,}/{self.total:,} {self.unit}"
        # Slow steps (stages of a job) read better as elapsed time than as a rate.
        pace = f"{rate:,.0f}/s" if rate >= 1 else f"{self._clock() - self.started:,.0f} s"
        self.stream.write(f"{prefix}{self.label:<10} {shown} ({pace}){suffix}")
        self.stream.flush()
        self._written = self.done


#: Makes a bar from (label, total, unit): ``Progress`` itself, or a partial of it.
ProgressFactory = Callable[[str, int | None, str], Progress]


@contextmanager
def counting(
    progress: ProgressFactory | None, label: str, total: int | None, unit: str
) -> Iterator[Callable[[int], None] | None]:
    """A bar's ``advance`` for the work inside the block, or None when no bar is wanted."""
    if progress is None:
        yield None
        return
    with progress(label, total, unit) as bar:
        yield bar.advance
