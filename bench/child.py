"""Measurements that need a fresh interpreter: a cold JVM, or a peak RSS of their own.

The parent runs ``module:function`` in a new Python with string arguments;
the function ends with :func:`report`, one JSON line on standard output,
which the parent reads back. Standard error passes through, so a child's
failure shows its own traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from encore.output import output_logger

ROOT = Path(__file__).resolve().parents[1]
output = output_logger(__name__)


def run_in_child(function: str, *args: str) -> dict[str, Any]:
    """Call ``function`` (``module:name``) with ``args`` in a fresh interpreter; its report."""
    module, name = function.split(":")
    script = f"import sys\nfrom {module} import {name}\n{name}(*sys.argv[1:])"
    output = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def report(result: dict[str, Any]) -> None:
    """The child's side: its result as the last line of standard output."""
    output.info("%s", json.dumps(result))
