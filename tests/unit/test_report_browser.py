"""The report as a reader sees it: headless Chromium opens it from file:// and must find
every plot drawn, no console error and no request beyond the page itself.

The checker is tested too, on pages broken in the ways it must catch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chromium import Chromium, require_chromium
from test_report import SUMMARY

from cli.report import render_report

pytestmark = pytest.mark.browser

PLOT = '<svg width="100" height="50"><rect width="40" height="20"/></svg>'


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    with Chromium(require_chromium()) as chromium:
        yield chromium


def open_page(browser: Chromium, folder: Path, html: str) -> list[str]:
    page = folder / "page.html"
    page.write_text(f'<!doctype html><html lang="en"><body>{html}</body></html>')
    return browser.check(page.as_uri()).problems()


#: A run cut short before any feed or evaluation: one plot, and notes for the others.
SPARSE = {
    **SUMMARY,
    "popularity": {**SUMMARY["popularity"], "top10": []},
    "recommendations": {"interactions_read": 0, "metrics": None},
    "timeline": [],
}


@pytest.mark.parametrize(
    ("summary", "marks"),
    [
        # One bar per stage, leader and metric; two axes and two series for the replay.
        (
            SUMMARY,
            {
                "Bids at each stage": 6,
                "Bids inserted and events landed during the replay": 4,
                "Popularity leaders (trending score, live listings)": 2,
                "Evaluation on held-out bids: ALS against the popularity baseline": 4,
            },
        ),
        (SPARSE, {"Bids at each stage": 5}),
    ],
    ids=["full-run", "no-feeds-or-metrics"],
)
def test_report_shows_its_plots_and_logs_no_error(
    browser: Chromium, tmp_path: Path, summary: dict[str, Any], marks: dict[str, int]
) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_report(summary))

    seen = browser.check(page.as_uri())

    assert seen.problems() == []
    assert seen.requests == [page.as_uri()]
    assert {plot.label: plot.marks for plot in seen.plots} == marks
    assert all(plot.width == 640 and plot.height > 0 for plot in seen.plots)


def test_checker_passes_a_page_with_one_drawn_plot(browser: Chromium, tmp_path: Path) -> None:
    assert open_page(browser, tmp_path, PLOT) == []


@pytest.mark.parametrize(
    ("html", "problem"),
    [
        (
            PLOT + "<script>drawLegend()</script>",
            "error: ReferenceError: drawLegend is not defined",
        ),
        (PLOT + "<script>console.error('feed', 404)</script>", "error: console: feed 404"),
        ('<svg width="100" height="50"></svg>', "plot '' draws nothing"),
        (
            '<svg aria-label="lag" width="100" height="50"><rect width="0" height="20"/></svg>',
            "plot 'lag' draws nothing",
        ),
        (
            '<svg aria-label="lag" width="100" height="0"><rect width="40" height="20"/></svg>',
            "plot 'lag' is 100x0 pixels",
        ),
        (PLOT.replace("<svg", '<svg style="display:none"'), "plot '' is 0x0 pixels"),
        ("<p>no figures</p>", "no plot on the page"),
        # Chromium refuses port 9 outright, so nothing is sent even to this machine.
        (PLOT + '<img src="http://127.0.0.1:9/pixel.png">', "request beyond the page"),
    ],
    ids=[
        "script-error",
        "console-error",
        "empty-svg",
        "zero-length-bar",
        "zero-height-svg",
        "hidden-svg",
        "no-svg",
        "network-request",
    ],
)
def test_checker_catches_a_broken_page(
    browser: Chromium, tmp_path: Path, html: str, problem: str
) -> None:
    problems = open_page(browser, tmp_path, html)

    assert any(found.startswith(problem) for found in problems), problems


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [
        ("true", pytest.fail.Exception),
        (None, pytest.skip.Exception),
        ("false", pytest.skip.Exception),
    ],
)
def test_missing_browser_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str | None, outcome: type[BaseException]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)

    with pytest.raises(outcome, match="Chromium is missing"):
        require_chromium()
