"""``make bench``: measure each stage on the local stack, each beside its reference.

Writes ``bench/results/latest.json`` (and a dated copy) shaped
``{"machine", "versions", "seed", "figures": {NAME: {"value", "unit", "spread"}}}``
and a markdown table, and prints the table. Every figure is the median of
``--repeat`` runs; ``spread`` is max - min. Figures that a stage cannot give
yet are absent, never invented.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import capture_bench, landing_bench, nightly_bench, popularity_bench, traffic
from cli.pipeline import prepare_database
from cli.stack import use_local_credentials
from encore.output import output_logger
from encore.settings import Settings
from infra.provision import provision
from local.services import LocalPostgres, MotoServer, free_port

STAGES = ("capture", "landing", "popularity", "nightly")
RESULTS = Path(__file__).resolve().parent / "results"
output = output_logger(__name__)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _figure(values: list[float], unit: str) -> dict[str, Any]:
    return {
        "value": round(statistics.median(values), 3),
        "unit": unit,
        "spread": round(max(values) - min(values), 3),
        "runs": len(values),
    }


def _repeat(times: int, run: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    return [run() for _ in range(times)]


def _fresh(settings: Settings) -> Settings:
    """A database, slot, stream and bucket of their own for one measurement."""
    import psycopg2

    suffix = uuid.uuid4().hex[:8]
    dsn = settings.require_dsn()
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE bench_{suffix}")
    admin.close()
    fresh = settings.replace(
        database_dsn=" ".join(
            f"dbname=bench_{suffix}" if word.startswith("dbname=") else word for word in dsn.split()
        ),
        slot_name=f"bench_{suffix}",
        bucket=f"bench-{suffix}",
        stream_name=f"bench-{suffix}",
        delivery_stream_name=f"bench-{suffix}",
    )
    provision(fresh)
    prepare_database(fresh)
    return fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000, help="changes per capture run")
    parser.add_argument(
        "--backlog", type=int, default=1_000_000, help="backlog drained once for peak memory"
    )
    parser.add_argument("--landing-events", type=int, default=50_000)
    parser.add_argument("--freshness-samples", type=int, default=20)
    parser.add_argument("--stream-events", type=int, default=50_000)
    parser.add_argument(
        "--day-users",
        type=int,
        default=100_000,
        help="active users of the simulated day landed hour by hour for the popularity job",
    )
    parser.add_argument(
        "--day-batch-hours", type=int, default=1, help="hours of the simulated day per batch"
    )
    parser.add_argument("--nightly-users", type=int, default=100_000)
    parser.add_argument(
        "--nightly-repeat",
        type=int,
        default=1,
        help="measurements of the nightly job (default: 1); each lands the traffic and runs "
        "two nights, a searching one and a reusing one, each publishing every user's document",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated stages to measure (default: all of {', '.join(STAGES)})",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other stages' figures from the existing latest.json (each stage "
        "records when it was measured)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--aws-endpoint-url", help="use this endpoint instead of starting moto")
    parser.add_argument("--postgres-dsn", help="use this server instead of starting one")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages: {', '.join(sorted(unknown))}")

    use_local_credentials()
    root = Path(tempfile.mkdtemp(prefix="encore-bench-"))
    root.chmod(0o755)
    postgres = None if args.postgres_dsn else LocalPostgres(root / "pg", free_port())
    moto = None if args.aws_endpoint_url else MotoServer(root / "moto", free_port())
    figures: dict[str, Any] = {}
    complete = False
    try:
        if moto is not None:
            moto.start()
        if postgres is not None:
            postgres.start()
        base = Settings.load(
            {},
            aws_endpoint_url=args.aws_endpoint_url or (moto.endpoint_url if moto else None),
            database_dsn=args.postgres_dsn or (postgres.dsn if postgres else None),
            spark_shuffle_partitions=2,
        )
        _measure(args, base, figures)
        complete = True
    finally:
        if moto is not None:
            moto.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(root, ignore_errors=True)
        # Written even when a stage fails, so the stages before it keep their figures.
        _write_report(args, figures, complete)
    return 0


def _write_report(args: argparse.Namespace, figures: dict[str, Any], complete: bool) -> None:
    measured_at = datetime.now(UTC).isoformat(timespec="seconds")
    measured = [stage for stage in STAGES if stage in args.stages.split(",")]
    stages = {stage: {"measured_at": measured_at, "complete": complete} for stage in measured}
    earlier_path = args.out / "latest.json"
    if args.merge and earlier_path.exists():
        earlier = json.loads(earlier_path.read_text())
        kept = {
            name: figure
            for name, figure in earlier["figures"].items()
            if _stage_of(name) not in measured
        }
        figures = dict(sorted({**kept, **figures}.items(), key=lambda item: _stage_order(item[0])))
        # A report written before stages were recorded one by one: each figure in it was
        # collected when its measurement had finished, so the figures kept are complete.
        default = {"measured_at": earlier["measured_at"], "complete": True}
        stages = {
            stage: stages.get(stage) or earlier.get("stages", {}).get(stage, default)
            for stage in STAGES
            if stage in stages or any(_stage_of(name) == stage for name in kept)
        }
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "versions": {
            name: version(name)
            for name in ("pyspark", "boto3", "moto", "psycopg2-binary", "aws-kinesis-agg")
        },
        "seed": args.seed,
        "measured_at": measured_at,
        "stages": stages,
        "complete": all(stage["complete"] for stage in stages.values()),
        "figures": figures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    (args.out / "latest.json").write_text(text)
    (args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    table = markdown(report)
    (args.out / "latest.md").write_text(table)
    output.info(
        "%s", table if complete else table + "\n(incomplete: a stage failed; see the error above)"
    )


def _stage_of(figure: str) -> str:
    return figure.split(".")[0]


def _stage_order(figure: str) -> int:
    stage = _stage_of(figure)
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def _measure(args: argparse.Namespace, base: Settings, figures: dict[str, Any]) -> None:
    """Fill ``figures`` stage by stage."""
    stages = set(args.stages.split(","))
    if "capture" in stages:
        _measure_capture(args, base, figures)
    if "landing" in stages:
        _measure_landing(args, base, figures)
    # The nightly job, the larger of the two, goes first: the JVM outlives a session,
    # and it would otherwise start with what the popularity day left in the heap.
    if "nightly" in stages:
        with _spark(base, "encore-bench-nightly") as spark:
            _measure_nightly(args, base, figures, spark)
    if "popularity" in stages:
        with _spark(base, "encore-bench-popularity") as spark:
            _measure_popularity(args, base, figures, spark)


@contextmanager
def _spark(base: Settings, name: str) -> Iterator[Any]:
    """A Spark session for one stage, so that a stage's memory does not weigh on the next;
    a session that was already running (a test's) is used as it is and left running."""
    from pyspark.sql import SparkSession

    from local.spark import local_session

    running = SparkSession.getActiveSession()
    spark = local_session(base, name)
    try:
        yield spark
    finally:
        if running is None:
            spark.stop()


def _collect(
    figures: dict[str, Any], runs: list[dict[str, Any]], names: dict[str, tuple[str, str]]
) -> None:
    """Add a figure for each ``name: (key in a run, unit)`` from the runs of one measurement."""
    for name, (key, unit) in names.items():
        figures[name] = _figure([run[key] for run in runs], unit)


def _measure_capture(args: argparse.Namespace, base: Settings, figures: dict[str, Any]) -> None:
    runs = _repeat(args.repeat, lambda: capture_bench.measure(_fresh(base), args.changes))
    _collect(
        figures,
        runs,
        {
            "capture.events_per_s": ("events_per_s", "events/s"),
            "capture.raw_slot_events_per_s": ("raw_events_per_s", "events/s"),
            "capture.raw_stream_events_per_s": ("raw_stream_events_per_s", "events/s"),
        },
    )
    backlog = capture_bench.measure(_fresh(base), args.backlog)
    _collect(
        figures,
        [backlog],
        {
            "capture.peak_rss_mb": ("peak_rss_mb", "MB"),
            "capture.backlog_events": ("events", "events"),
            "capture.backlog_invocations": ("runs", "invocations"),
        },
    )


def _measure_landing(args: argparse.Namespace, base: Settings, figures: dict[str, Any]) -> None:
    runs = _repeat(args.repeat, lambda: landing_bench.measure(_fresh(base), args.landing_events))
    _collect(
        figures,
        runs,
        {
            "landing.events_per_s": ("events_per_s", "events/s"),
            "landing.raw_put_events_per_s": ("raw_events_per_s", "events/s"),
        },
    )


def _measure_popularity(
    args: argparse.Namespace, base: Settings, figures: dict[str, Any], spark: Any
) -> None:
    freshness = popularity_bench.measure_freshness(spark, _fresh(base), args.freshness_samples)
    _collect(
        figures,
        [freshness],
        {
            "popularity.freshness_p50_s": ("p50_s", "s"),
            "popularity.freshness_p95_s": ("p95_s", "s"),
            "popularity.freshness_max_s": ("max_s", "s"),
            "popularity.first_feed_s": ("first_feed_s", "s"),
        },
    )
    runs = _repeat(
        args.repeat,
        lambda: popularity_bench.measure_throughput(spark, _fresh(base), args.stream_events),
    )
    _collect(
        figures,
        runs,
        {
            "popularity.events_per_s_per_core": ("events_per_s_per_core", "events/s/core"),
            "popularity.plain_count_rows_per_s_per_core": (
                "count_rows_per_s_per_core",
                "rows/s/core",
            ),
        },
    )
    day = popularity_bench.measure_day(
        spark,
        _fresh(base),
        traffic.learn_shape(DATA),
        args.day_users,
        args.seed,
        batch_hours=args.day_batch_hours,
    )
    _collect(
        figures,
        [day],
        {
            "popularity.day_events": ("day_events", "events"),
            "popularity.hourly_batch_median_s": ("hourly_batch_median_s", "s"),
            "popularity.hourly_batch_max_s": ("hourly_batch_max_s", "s"),
            "popularity.largest_state_events": ("largest_state_events", "events"),
            "popularity.last_state_events": ("last_state_events", "events"),
            "popularity.whole_day_batch_s": ("whole_day_batch_s", "s"),
            "popularity.small_batch_events": ("small_batch_events", "events"),
            "popularity.small_batch_s": ("small_batch_s", "s"),
            "popularity.small_batch_state_events": ("small_batch_state_events", "events"),
        },
    )


def _measure_nightly(
    args: argparse.Namespace, base: Settings, figures: dict[str, Any], spark: Any
) -> None:
    shape = traffic.learn_shape(DATA)
    nights = _repeat(
        args.nightly_repeat,
        lambda: nightly_bench.measure(spark, _fresh(base), shape, args.nightly_users, args.seed),
    )
    names = {"nightly.users": ("users", "users"), "nightly.bids": ("bids", "bids")}
    for key in nights[0]:
        if key.endswith("_per_s"):
            names[f"nightly.{key}"] = (key, "per s")
        elif key.endswith("_s"):
            names[f"nightly.{key}"] = (key, "s")
    _collect(figures, nights, names)


def markdown(report: dict[str, Any]) -> str:
    rows = ["| figure | median | spread | unit | runs |", "| --- | ---: | ---: | --- | ---: |"]
    for name, figure in report["figures"].items():
        rows.append(
            f"| {name} | {figure['value']:,} | {figure['spread']:,} | {figure['unit']} "
            f"| {figure['runs']} |"
        )
    lines = ["\n".join(rows), ""]
    for stage, run in report.get("stages", {}).items():
        state = "" if run["complete"] else " (incomplete)"
        lines.append(f"- {stage}: measured {run['measured_at']}{state}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
