"""A command's own output through :mod:`logging`: bare lines on standard output or error.

What a command answers (a JSON summary, a results table, what a deploy did,
a CloudWatch metric line) is output, not a log record: it must reach its
stream exactly as written, with no level or time in front, whatever logging
the process configured. :func:`output_logger` gives the module's logger for
that, ``<module>.output``: INFO goes to standard output, WARNING and above to
standard error. It does not propagate, so the root logger's handlers (the
JSON format in Lambda, the timestamped one of the Spark jobs) never repeat
or reformat its lines.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class _CurrentStream(logging.StreamHandler):
    """Writes the records below WARNING (``errors=False``) or from WARNING up
    (``errors=True``) to ``sys.stdout`` or ``sys.stderr`` as they are when the
    line is written, so a stream replaced later (as pytest's capture does)
    still gets the lines."""

    def __init__(self, errors: bool) -> None:
        self._errors = errors
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._errors else sys.stdout

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        """The stream is looked up on every line; nothing to keep."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING) == self._errors and super().filter(record)


def output_logger(module: str) -> logging.Logger:
    """The logger for ``module``'s command output (see the module docstring)."""
    logger = logging.getLogger(f"{module}.output")
    if not logger.handlers:
        logger.addHandler(_CurrentStream(errors=False))
        logger.addHandler(_CurrentStream(errors=True))
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
