"""The nightly job at scale: wall time on synthetic traffic, and ALS against ``implicit``.

Synthetic traffic (``bench.traffic``) is landed in S3 as contract events,
straight into ``landing/`` (the capture is measured on its own). Then:

* two nights, each in a fresh interpreter and JVM as on EMR, where every
  night is a new ``spark-submit``: a night on a fresh bucket, which searches
  the tuning grid, then a night an hour later on the same data, which reuses
  that search (``reuse_*``; see ``als_tune_every_days``). For each: the
  stages ``read``, ``evaluate``, ``fit``, ``score`` and ``publish``,
  ``compute_s`` (read to score), ``wall_s`` (read to publish) and
  ``session_s`` (starting Spark);
* ``fit_score_s``: Spark ALS fitting the night's user x title matrix and scoring
  every user's top 10 (``batch.model``), the second time in a session;
  ``fit_score_cold_s`` the first time, in a JVM that had not run ALS yet;
* ``implicit_fit_score_s``: the reference, in the same run: the ``implicit``
  library fitting the same matrix with the same rank, regularisation and
  iterations, and recommending 10 items to every user.
"""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timedelta
from typing import Any

import boto3
import numpy as np

from batch.publish import PUT_THREADS
from batch.recommend import NIGHTLY_STAGES
from bench import child
from bench.child import run_in_child
from bench.traffic import DAY, Shape, Traffic, generate
from encore import events, layout
from encore.settings import Settings

EVENTS_PER_FILE = 100_000
#: Documents PUT for the reference rate of the store.
RAW_PUTS = 2_000


def land_traffic(settings: Settings, shape: Shape, traffic: Traffic) -> int:
    """Write listing and bid insert events as landed CSV files; return the bid count."""
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    start = traffic.start.timestamp()

    def stamp(seconds: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + seconds)) + ".000000Z"

    rows: list[list[str]] = []
    for number, listing_id in enumerate(traffic.listing_ids):
        category, sub_category, title = shape.titles[traffic.listing_titles[number]]
        row = dict.fromkeys(events.COLUMNS, "")
        row.update(
            schema_version="1",
            event_id=f"l{listing_id:x}",
            event_type="listing",
            op="insert",
            commit_lsn="0/1",
            commit_time=stamp(traffic.listing_starts[number]),
            table_key=str(listing_id),
            listing_id=str(listing_id),
            title=title,
            category=category,
            sub_category=sub_category,
            price="1.00",
            status="live",
            ends_at=stamp(traffic.listing_ends[number] + 86_400),
        )
        rows.append([row[name] for name in events.COLUMNS])
    for number in range(traffic.bids):
        row = dict.fromkeys(events.COLUMNS, "")
        listing_id = traffic.listing_ids[traffic.bid_listing[number]]
        cents = int(traffic.bid_amount_cents[number])
        row.update(
            schema_version="1",
            event_id=f"b{number:x}",
            event_type="bid",
            op="insert",
            commit_lsn=f"1/{number:X}",
            commit_time=stamp(traffic.bid_seconds[number]),
            table_key=str(number),
            listing_id=str(listing_id),
            bid_id=str(number),
            bidder_id=traffic.user_ids[traffic.bid_user[number]],
            amount=f"{cents // 100}.{cents % 100:02d}",
            placed_at=stamp(traffic.bid_seconds[number]),
        )
        rows.append([row[name] for name in events.COLUMNS])

    for part, begin in enumerate(range(0, len(rows), EVENTS_PER_FILE)):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows[begin : begin + EVENTS_PER_FILE])
        key = layout.landing_key(traffic.start, f"bench-{part:04d}")
        s3.put_object(Bucket=settings.bucket, Key=key, Body=buffer.getvalue().encode())
    return traffic.bids


def confidence_matrix(traffic: Traffic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, title, bid count) triples: the matrix both libraries fit."""
    pairs = (
        traffic.bid_user.astype(np.int64) * (2**32) + traffic.listing_titles[traffic.bid_listing]
    )
    unique, counts = np.unique(pairs, return_counts=True)
    return (unique // 2**32).astype(np.int32), (unique % 2**32).astype(np.int32), counts


def spark_fit_score(spark: Any, traffic: Traffic, settings: Settings) -> tuple[float, float]:
    """Seconds to fit and score the matrix twice in one session: the first in a JVM
    that has not run ALS yet, the second warm (the library's steady pace, which
    is what ``implicit``, compiled ahead of time, is compared with)."""
    from batch.model import AlsParams, fit, releasing_factors, top_k

    users, items, counts = confidence_matrix(traffic)
    frame = spark.createDataFrame(
        list(zip(users.tolist(), items.tolist(), counts.astype(float).tolist(), strict=True)),
        "user_idx INT, item_idx INT, confidence DOUBLE",
    ).cache()
    frame.count()
    times = []
    for _ in range(2):
        with releasing_factors(spark):
            started = time.perf_counter()
            model = fit(frame, AlsParams.from_settings(settings))
            scored = top_k(
                model.userFactors.withColumnRenamed("id", "user_idx"),
                model.itemFactors.withColumnRenamed("id", "item_idx"),
                10,
            )
            scored.count()
            times.append(time.perf_counter() - started)
    frame.unpersist()
    return times[0], times[1]


def implicit_fit_score(traffic: Traffic, settings: Settings) -> float:
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    users, items, counts = confidence_matrix(traffic)
    matrix = csr_matrix((counts.astype(np.float32) * settings.als_alpha, (users, items)))
    # implicit parallelises itself; a BLAS thread pool underneath it only contends.
    with threadpool_limits(1, "blas"):
        started = time.perf_counter()
        model = AlternatingLeastSquares(
            factors=settings.als_rank,
            regularization=settings.als_reg,
            iterations=settings.als_iterations,
            random_state=settings.als_seed,
        )
        model.fit(matrix, show_progress=False)
        model.recommend(np.arange(matrix.shape[0]), matrix, N=10, filter_already_liked_items=False)
        return time.perf_counter() - started


def raw_put_per_s(settings: Settings, body_bytes: int, count: int, threads: int) -> float:
    """PUTs per second of documents of ``body_bytes`` from ``threads`` threads: the store's own
    pace, the reference for the job's publish stage."""
    from concurrent.futures import ThreadPoolExecutor

    s3 = boto3.client("s3", **settings.boto3_kwargs())
    body = b"x" * body_bytes

    def put(number: int) -> None:
        s3.put_object(
            Bucket=settings.bucket,
            Key=f"bench/raw-put/{number:08d}.json",
            Body=body,
            ContentType="application/json",
            Metadata={"source": "als"},
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(count)))
    return count / (time.perf_counter() - started)


def _night_and_report(overrides: str, now: str) -> None:
    """The child's side of :func:`night_in_child`: one night, then one JSON line."""
    from batch.recommend import run_nightly
    from local.spark import local_session

    settings = Settings.load(**json.loads(overrides))
    started = time.perf_counter()
    spark = local_session(settings, "encore-bench-night")
    session_s = time.perf_counter() - started
    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    started = time.perf_counter()
    summary = run_nightly(spark, base_uri, settings, now=datetime.fromisoformat(now))
    wall_s = time.perf_counter() - started
    spark.stop()
    stages = summary["stage_seconds"]
    report = {
        "users": summary["users"],
        "run_id": summary["run_id"],
        "sample": list(summary["sample"]),
        "reused": summary["evaluation"]["search"]["reused"],
        "session_s": session_s,
        "wall_s": wall_s,
        "compute_s": sum(seconds for stage, seconds in stages.items() if stage != "publish"),
        **{f"{stage}_s": seconds for stage, seconds in stages.items()},
    }
    child.report(report)


def night_in_child(settings: Settings, now: datetime) -> dict[str, Any]:
    """One nightly run in a fresh interpreter (a cold JVM, as every night on EMR)."""
    overrides = {
        "aws_endpoint_url": settings.aws_endpoint_url,
        "bucket": settings.bucket,
        "spark_shuffle_partitions": settings.spark_shuffle_partitions,
    }
    return run_in_child(
        "bench.nightly_bench:_night_and_report", json.dumps(overrides), now.isoformat()
    )


def measure(spark: Any, settings: Settings, shape: Shape, users: int, seed: int) -> dict[str, Any]:
    traffic = generate(shape, users, seed)
    started = time.perf_counter()
    bids = land_traffic(settings, shape, traffic)
    land_s = time.perf_counter() - started
    searched = night_in_child(settings, traffic.start + DAY)
    reused = night_in_child(settings, traffic.start + DAY + timedelta(hours=1))
    if searched["reused"] or not reused["reused"]:
        raise RuntimeError(f"expected a searching night, then a reusing one: {searched, reused}")
    summary = {"run_id": reused["run_id"], "sample": reused["sample"]}
    cold, warm = spark_fit_score(spark, traffic, settings)
    timings = ("session_s", "wall_s", "compute_s", *(f"{s}_s" for s in NIGHTLY_STAGES))
    return {
        "users": searched["users"],
        "bids": bids,
        "land_s": land_s,
        **{name: searched[name] for name in timings},
        **{f"reuse_{name}": reused[name] for name in timings},
        "publish_docs_per_s": searched["users"] / searched["publish_s"],
        "raw_put_per_s": raw_put_per_s(
            settings,
            _document_bytes(settings, summary),
            min(searched["users"], RAW_PUTS),
            PUT_THREADS * int(spark.sparkContext.defaultParallelism),
        ),
        "fit_score_cold_s": cold,
        "fit_score_s": warm,
        "implicit_fit_score_s": implicit_fit_score(traffic, settings),
    }


def _document_bytes(settings: Settings, summary: dict[str, Any]) -> int:
    """The size of one published user document (the first of the sample)."""
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    user = next(iter(summary["sample"]))
    key = layout.user_document_key(summary["run_id"], user)
    return int(s3.head_object(Bucket=settings.bucket, Key=key)["ContentLength"])
