"""Headless Chromium for the tests, driven over the DevTools protocol on a pipe.

``Chromium`` starts one browser (Debian's ``chromium`` package) with a fresh,
empty profile and no background networking; ``check(url)`` opens the page,
waits for its load event and a painted frame, and returns what a reader
would meet: each SVG plot's size and the marks drawn in it, every console
error, uncaught exception and failed load, and every URL the page asked for.

The protocol runs over ``--remote-debugging-pipe``: the browser reads
commands from its descriptor 3 and writes replies and events to descriptor 4,
one JSON message per NUL-terminated chunk. No port is opened, and only the
standard library is needed. Every host name resolves to nothing, so a page
that reaches for the network fails to load it instead of leaving the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",  # as root (CI, these machines) Chromium refuses to start with it
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    # Containers often give /dev/shm 64 MB; Debian's launcher adds this flag itself only
    # when its own size check of /dev/shm works.
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)

#: Each SVG on the page: its label, its laid-out size and how many of its shapes have
#: an area (a rect) or a length (a line, a polyline) once drawn.
MEASURE_PLOTS = """
new Promise(resolve => requestAnimationFrame(() => resolve(
  Array.from(document.querySelectorAll('svg')).map(svg => {
    const box = svg.getBoundingClientRect();
    const shapes = svg.querySelectorAll('rect, line, polyline, polygon, path, circle, ellipse');
    const marks = Array.from(shapes).filter(shape => {
      const b = shape.getBBox();
      return shape.tagName === 'rect' ? b.width > 0 && b.height > 0 : b.width + b.height > 0;
    }).length;
    return {label: svg.getAttribute('aria-label') || '', width: box.width,
            height: box.height, marks: marks};
  })
)))
"""


def require_chromium() -> str:
    """The browser's path; without one, skip, except under CI, where the test fails."""
    found = shutil.which("chromium")
    if found:
        return found
    reason = (
        "headless Chromium is missing: install Debian's chromium package "
        "(`make test` does when run as root)"
    )
    if os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no", "off"}:
        pytest.fail(f"{reason}; CI is set, so the browser tests may not be skipped")
    pytest.skip(reason)


class BrowserError(RuntimeError):
    """Chromium could not be started, or did not answer in time."""


@dataclass(frozen=True)
class Plot:
    label: str
    width: float
    height: float
    marks: int


@dataclass
class PageCheck:
    url: str
    plots: list[Plot] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """What a reader of the page would see go wrong; empty when nothing does."""
        found = [f"error: {error}" for error in self.errors]
        found += [
            f"request beyond the page: {url}"
            for url in self.requests
            if url != self.url and not url.startswith("data:")
        ]
        if not self.plots:
            found.append("no plot on the page")
        for plot in self.plots:
            if plot.width <= 0 or plot.height <= 0:
                found.append(f"plot {plot.label!r} is {plot.width:g}x{plot.height:g} pixels")
            elif plot.marks == 0:
                found.append(f"plot {plot.label!r} draws nothing")
        return found


class Chromium:
    """One headless browser; stopped by its process id when the ``with`` block ends."""

    def __init__(self, executable: str = "chromium", timeout_s: float = 30.0) -> None:
        self.executable = executable
        self.timeout_s = timeout_s
        self._profile = Path()
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Chromium:
        self._profile = Path(tempfile.mkdtemp(prefix="encore-chromium-"))
        commands_read, self._commands = _high_pipe()
        self._replies, replies_write = _high_pipe()
        flags = (*FLAGS, f"--user-data-dir={self._profile / 'profile'}", "about:blank")
        # bash puts the pipe ends where the browser looks for them, 3 and 4 (dash cannot:
        # it takes no descriptor above 9).
        script = f'exec "$0" "$@" 3<&{commands_read} 4>&{replies_write}'
        try:
            try:
                with open(self._profile / "stderr.log", "wb") as log:
                    self._process = subprocess.Popen(
                        ["bash", "-c", script, self.executable, *flags],
                        pass_fds=(commands_read, replies_write),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
            finally:
                # Only the browser keeps these ends, so its exit reads as the end of the pipe.
                os.close(commands_read)
                os.close(replies_write)
            self._call("Browser.getVersion")
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            if self._process is not None:
                if self._process.poll() is None:
                    with contextlib.suppress(BrokenPipeError):
                        self._send("Browser.close")
                _end_group(self._process)
        finally:
            os.close(self._commands)
            os.close(self._replies)
            shutil.rmtree(self._profile, ignore_errors=True)

    def check(self, url: str) -> PageCheck:
        """Open ``url`` in a new tab, let it load and paint, and report what it showed."""
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                self._call(f"{domain}.enable", session=session)
            self._events.clear()
            navigation = self._call("Page.navigate", {"url": url}, session=session)
            if "errorText" in navigation:
                raise BrowserError(f"{url} did not open: {navigation['errorText']}")
            self._wait_for("Page.loadEventFired", session)
            measured = self._call(
                "Runtime.evaluate",
                {"expression": MEASURE_PLOTS, "awaitPromise": True, "returnByValue": True},
                session=session,
            )
            page = PageCheck(url, [Plot(**plot) for plot in measured["result"]["value"]])
            requested: dict[str, str] = {}
            for event in self._events:
                if event.get("sessionId") == session:
                    _record(page, requested, event["method"], event.get("params", {}))
            return page
        finally:
            self._call("Target.closeTarget", {"targetId": target})

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _call(
        self, method: str, params: dict[str, Any] | None = None, session: str = ""
    ) -> dict[str, Any]:
        """Send one command and wait for its reply; events that arrive meanwhile are kept."""
        sent = self._send(method, params, session)
        while True:
            message = self._receive(method)
            if message.get("id") == sent:
                if "error" in message:
                    raise BrowserError(f"{method} failed: {message['error'].get('message')}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self._events.append(message)

    def _wait_for(self, event: str, session: str) -> None:
        while not any(
            seen["method"] == event and seen.get("sessionId") == session for seen in self._events
        ):
            message = self._receive(event)
            if "method" in message:
                self._events.append(message)

    def _receive(self, waiting_for: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self._replies], [], [], max(left, 0))
            chunk = os.read(self._replies, 1 << 16) if readable else b""
            if not chunk:
                raise BrowserError(self._failure(waiting_for, timed_out=not readable))
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        received: dict[str, Any] = json.loads(message)
        return received

    def _failure(self, waiting_for: str, timed_out: bool) -> str:
        what = f"no answer within {self.timeout_s:g} s" if timed_out else "the browser exited"
        log = (self._profile / "stderr.log").read_text(errors="replace").strip().splitlines()
        return f"{self.executable} {waiting_for}: {what}" + (f" ({log[-1]})" if log else "")


def _record(page: PageCheck, requested: dict[str, str], method: str, params: Any) -> None:
    """Keep what a reader would notice from one DevTools event."""
    if method == "Network.requestWillBeSent":
        requested[params["requestId"]] = params["request"]["url"]
        page.requests.append(params["request"]["url"])
    elif method == "Network.loadingFailed":
        url = requested.get(params["requestId"], "?")
        page.errors.append(f"{url} did not load: {params['errorText']}")
    elif method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        page.errors.append(details.get("exception", {}).get("description") or details["text"])
    elif method == "Runtime.consoleAPICalled" and params["type"] in {"error", "assert"}:
        words = (str(arg.get("value", arg.get("description", ""))) for arg in params["args"])
        page.errors.append("console: " + " ".join(words))
    elif (
        method == "Log.entryAdded"
        and params["entry"]["level"] == "error"
        # Failed loads come once, with their URL, from the network events above.
        and params["entry"].get("source") != "network"
    ):
        page.errors.append(params["entry"]["text"])


def _end_group(browser: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """Wait for the browser and the helpers in its process group (led by its id) to
    exit, and kill what is left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        browser.wait(timeout=grace_s)
    while time.monotonic() < deadline:
        try:
            os.killpg(browser.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(browser.pid, signal.SIGKILL)
    browser.wait()


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are numbered 10 or above, clear of the 3 and 4 they move to."""
    low = os.pipe()
    ends = tuple(fcntl.fcntl(end, fcntl.F_DUPFD_CLOEXEC, 10) for end in low)
    for end in low:
        os.close(end)
    return ends[0], ends[1]
