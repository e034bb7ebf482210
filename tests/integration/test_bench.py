"""A tiny run of the benchmark command, so that it cannot rot. Timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run

pytestmark = pytest.mark.integration


def test_bench_command_writes_every_figure_with_its_reference(tmp_path: Path) -> None:
    assert (
        run.main(
            [
                "--changes",
                "500",
                "--backlog",
                "700",
                "--landing-events",
                "300",
                "--repeat",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )

    report = json.loads((tmp_path / "latest.json").read_text())
    figures = report["figures"]
    for name in (
        "capture.events_per_s",
        "capture.raw_slot_events_per_s",
        "capture.peak_rss_mb",
        "landing.events_per_s",
        "landing.raw_put_events_per_s",
    ):
        assert figures[name]["value"] > 0, name
        assert set(figures[name]) >= {"value", "unit", "spread"}
    assert figures["capture.backlog_events"]["value"] == 701  # the backlog plus its listing
    assert {"machine", "versions", "seed"} <= set(report)
    assert (tmp_path / "latest.md").read_text().startswith("| figure |")
