"""A tiny run of the benchmark command, so that it cannot rot. Timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import run
from encore.settings import Settings
from local.services import LocalPostgres

pytestmark = pytest.mark.integration

FIGURES = (
    "capture.events_per_s",
    "capture.raw_slot_events_per_s",
    "capture.peak_rss_mb",
    "landing.events_per_s",
    "landing.raw_put_events_per_s",
    "popularity.freshness_p50_s",
    "popularity.freshness_p95_s",
    "popularity.freshness_max_s",
    "popularity.first_feed_s",
    "popularity.events_per_s_per_core",
    "popularity.plain_count_rows_per_s_per_core",
    "popularity.day_events",
    "popularity.hourly_batch_median_s",
    "popularity.largest_state_events",
    "popularity.whole_day_batch_s",
    "popularity.small_batch_s",
    "nightly.users",
    "nightly.wall_s",
    "nightly.compute_s",
    "nightly.session_s",
    "nightly.read_s",
    "nightly.evaluate_s",
    "nightly.fit_s",
    "nightly.score_s",
    "nightly.publish_s",
    "nightly.reuse_compute_s",
    "nightly.reuse_evaluate_s",
    "nightly.reuse_publish_s",
    "nightly.publish_docs_per_s",
    "nightly.raw_put_per_s",
    "nightly.fit_score_s",
    "nightly.fit_score_cold_s",
    "nightly.implicit_fit_score_s",
)


def test_bench_command_writes_every_figure_with_its_reference(
    tmp_path: Path, base_settings: Settings, postgres: LocalPostgres, spark: Any
) -> None:
    # The shared endpoint and Spark session: a session fixes its s3a endpoint when created.
    argv = [
        "--changes", "300", "--backlog", "400", "--landing-events", "200",
        "--freshness-samples", "2", "--stream-events", "200", "--day-users", "300",
        "--day-batch-hours", "8", "--nightly-users", "300",
        "--repeat", "1", "--nightly-repeat", "1",
        "--out", str(tmp_path), "--aws-endpoint-url", str(base_settings.aws_endpoint_url),
        "--postgres-dsn", postgres.dsn,
    ]  # fmt: skip
    assert run.main(argv) == 0

    report = json.loads((tmp_path / "latest.json").read_text())
    figures = report["figures"]
    for name in FIGURES:
        assert figures[name]["value"] > 0, name
        assert set(figures[name]) >= {"value", "unit", "spread"}
    assert figures["capture.backlog_events"]["value"] == 401  # the backlog plus its listing
    # Closed auctions fold away, so the state stays below the day's events.
    assert (
        figures["popularity.largest_state_events"]["value"]
        < figures["popularity.day_events"]["value"]
    )
    assert {"machine", "versions", "seed"} <= set(report)
    assert report["complete"] is True
    assert (tmp_path / "latest.md").read_text().startswith("| figure |")


def test_bench_command_measures_only_the_stages_asked_for(
    tmp_path: Path, base_settings: Settings, postgres: LocalPostgres
) -> None:
    argv = [
        "--stages", "landing", "--landing-events", "100", "--repeat", "1",
        "--out", str(tmp_path), "--aws-endpoint-url", str(base_settings.aws_endpoint_url),
        "--postgres-dsn", postgres.dsn,
    ]  # fmt: skip
    assert run.main(argv) == 0

    figures = json.loads((tmp_path / "latest.json").read_text())["figures"]
    assert set(figures) == {"landing.events_per_s", "landing.raw_put_events_per_s"}


def test_bench_command_refuses_an_unknown_stage(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--stages", "capture,training", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_bench_merge_keeps_the_other_stages_figures_with_when_they_were_measured(
    tmp_path: Path, base_settings: Settings, postgres: LocalPostgres
) -> None:
    earlier = {
        "measured_at": "2026-12-01T00:00:00+00:00",
        "complete": True,
        "figures": {
            "capture.events_per_s": {"value": 1.0, "spread": 0, "unit": "events/s", "runs": 1},
            "landing.events_per_s": {"value": 2.0, "spread": 0, "unit": "events/s", "runs": 1},
        },
    }
    (tmp_path / "latest.json").write_text(json.dumps(earlier))
    argv = [
        "--stages", "landing", "--landing-events", "100", "--repeat", "1", "--merge",
        "--out", str(tmp_path), "--aws-endpoint-url", str(base_settings.aws_endpoint_url),
        "--postgres-dsn", postgres.dsn,
    ]  # fmt: skip
    assert run.main(argv) == 0

    report = json.loads((tmp_path / "latest.json").read_text())
    assert list(report["figures"]) == [
        "capture.events_per_s",
        "landing.events_per_s",
        "landing.raw_put_events_per_s",
    ]
    assert report["figures"]["capture.events_per_s"]["value"] == 1.0
    assert report["figures"]["landing.events_per_s"]["value"] != 2.0
    assert report["stages"]["capture"]["measured_at"] == "2026-12-01T00:00:00+00:00"
    assert report["stages"]["landing"]["measured_at"] == report["measured_at"]
    assert report["complete"] is True
    assert "- capture: measured 2026-12-01T00:00:00+00:00" in (tmp_path / "latest.md").read_text()
