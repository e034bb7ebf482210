"""Popularity freshness and throughput on the local stack.

Freshness: the time from a bid's commit in Postgres to the first global feed
that counts it, with the continuous popularity job running (one micro-batch
every ``stream_trigger_s``), the capture and the landing hop run right after
the commit (zero buffering), and the feed polled in S3. The first bid also waits
for the stream to start; it is reported on its own (``first_feed_s``) and the
percentiles are over the bids after it, as a running service sees them.

Throughput: one catch-up run of the job over a landed backlog, in events per
second per core; the reference, in the same run, is a plain Spark count of
the same landed rows.

A day: simulated traffic (:mod:`bench.traffic`) landed hour by hour, the job
run after each hour, so that the state keeps only the listings in play while
closed auctions fold away. Each batch's time is reported beside the state's
size; the reference is one batch over the whole day in a fresh bucket, which is
what each batch would cost if the state kept every event.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from datetime import timedelta
from typing import Any

import boto3
import psycopg2
from botocore.exceptions import ClientError

from bench import capture_bench, landing_bench
from bench.traffic import Shape, Traffic, generate
from cli import pipeline
from encore import events, layout
from encore.settings import Settings
from lambdas.capture.kinesis_sink import KinesisSink


def _feed_bids(s3: Any, bucket: str) -> int:
    try:
        body = s3.get_object(Bucket=bucket, Key=layout.global_feed_key())["Body"].read()
    except ClientError:
        return -1
    return int(json.loads(body)["totals"]["bids"])


def measure_freshness(spark: Any, settings: Settings, samples: int) -> dict[str, Any]:
    from spark_streaming.popularity import run_popularity

    settings = settings.replace(stream_trigger_s=0.5)
    conn = psycopg2.connect(settings.require_dsn())
    capture_bench.seed_listing(conn)
    pipeline.drain(settings, pipeline.FlowCounts())

    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    failure: list[BaseException] = []

    def stream() -> None:
        try:
            run_popularity(spark, base_uri, settings, available_now=False)
        except BaseException as exc:
            failure.append(exc)

    runner = threading.Thread(target=stream, name="popularity")
    runner.start()
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    latencies: list[float] = []
    try:
        # Bid 0 starts the stream (its first batch plans the query and opens the
        # checkpoint): it is reported as first_feed_s, apart from the running figures.
        for number in range(0, samples + 1):
            with conn, conn.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO bids (listing_id, bidder_id, amount) VALUES (1, 'bench', %s)",
                    (number + 1,),
                )
            committed = time.monotonic()
            pipeline.capture_once(settings)
            pipeline.land_once(settings)
            deadline = committed + 120
            while _feed_bids(s3, settings.bucket) < number + 1:
                if failure or time.monotonic() > deadline:
                    raise RuntimeError(f"bid {number} never reached the feed: {failure}")
                time.sleep(0.05)
            latencies.append(time.monotonic() - committed)
    finally:
        for query in spark.streams.active:
            query.stop()
        runner.join(60)
        conn.close()
    first, running = latencies[0], sorted(latencies[1:])
    return {
        "first_feed_s": first,
        "samples": latencies[1:],
        "p50_s": running[len(running) // 2],
        # Nearest rank: with 20 samples the p95 is the 19th fastest.
        "p95_s": running[math.ceil(0.95 * len(running)) - 1],
        "max_s": running[-1],
    }


def measure_throughput(spark: Any, settings: Settings, count: int) -> dict[str, Any]:
    """One catch-up run over ``count`` landed bid events, against a plain count of them."""
    from spark_streaming.popularity import run_popularity

    sink = KinesisSink.from_settings(settings)
    for line in landing_bench.sample_lines(count):
        sink.add(line.split(b",")[7].decode(), line)
    sink.flush()
    pipeline.land_once(settings)

    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    landing_uri = f"{base_uri}/{layout.LANDING_PREFIX}"
    started = time.perf_counter()
    plain = (
        spark.read.option("recursiveFileLookup", "true")
        .option("multiLine", "true")
        .csv(landing_uri)
        .count()
    )
    count_s = time.perf_counter() - started

    started = time.perf_counter()
    summary = run_popularity(spark, base_uri, settings, available_now=True)
    job_s = time.perf_counter() - started
    cores = int(spark.sparkContext.defaultParallelism)
    return {
        "events": summary["bid_events"],
        "plain_count": plain,
        "job_s": job_s,
        "count_s": count_s,
        "cores": cores,
        "events_per_s_per_core": summary["bid_events"] / job_s / cores,
        "count_rows_per_s_per_core": plain / count_s / cores,
    }


#: Events of the midday batch timed on its own: a couple of seconds of a busy day.
SMALL_BATCH = 100


def day_of_changes(shape: Shape, traffic: Traffic) -> list[tuple[int, bytes]]:
    """A day of contract events, in commit order, each with the hour it lands in.

    Each listing is inserted when it opens and updated to ``ended`` when it closes;
    each bid is inserted when it is placed. Commit LSNs grow with time.
    """
    start = traffic.start.timestamp()
    timeline: list[tuple[float, int, int]] = []  # (seconds, kind: 0 open 1 bid 2 close, index)
    for number in range(traffic.listing_ids.size):
        timeline.append((float(traffic.listing_starts[number]), 0, number))
        timeline.append((float(traffic.listing_ends[number]), 2, number))
    timeline.extend(
        (float(seconds), 1, number) for number, seconds in enumerate(traffic.bid_seconds)
    )
    timeline.sort()

    lines = []
    for position, (seconds, kind, number) in enumerate(timeline, start=1):
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + seconds)) + ".000000Z"
        lsn = f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"
        if kind == 1:
            listing_id = str(traffic.listing_ids[traffic.bid_listing[number]])
            cents = int(traffic.bid_amount_cents[number])
            event = {
                "event_id": f"b{number:x}",
                "event_type": "bid",
                "op": "insert",
                "table_key": str(number),
                "listing_id": listing_id,
                "bid_id": str(number),
                "bidder_id": traffic.user_ids[traffic.bid_user[number]],
                "amount": f"{cents // 100}.{cents % 100:02d}",
                "placed_at": at,
            }
        else:
            category, sub_category, title = shape.titles[traffic.listing_titles[number]]
            listing_id = str(traffic.listing_ids[number])
            event = {
                "event_id": f"l{listing_id}-{kind}",
                "event_type": "listing",
                "op": "insert" if kind == 0 else "update",
                "table_key": listing_id,
                "listing_id": listing_id,
                "title": title,
                "category": category,
                "sub_category": sub_category,
                "status": "live" if kind == 0 else "ended",
            }
        event.update(commit_lsn=lsn, commit_time=at)
        lines.append((int(seconds // 3600), events.encode(event)))
    return lines


def measure_day(
    spark: Any, settings: Settings, shape: Shape, users: int, seed: int, *, batch_hours: int = 1
) -> dict[str, Any]:
    """A simulated day landed hour by hour, the job run after every ``batch_hours``.

    Reports each hourly batch's time and the state's size after it, and the time of a
    batch of :data:`SMALL_BATCH` events at midday; the reference, in the same run, is
    one batch over the whole day's events in a fresh bucket, what every batch cost when
    the state kept every event.
    """
    from spark_streaming.popularity import run_popularity

    traffic = generate(shape, users, seed)
    changes = day_of_changes(shape, traffic)
    hours: dict[int, list[bytes]] = {}
    for hour, line in changes:
        hours.setdefault(hour // batch_hours * batch_hours, []).append(line)

    s3 = boto3.client("s3", **settings.boto3_kwargs())
    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")

    def land_and_run(hour: int, name: str, lines: list[bytes]) -> dict[str, Any]:
        key = layout.landing_key(traffic.start + timedelta(hours=hour), name)
        s3.put_object(Bucket=settings.bucket, Key=key, Body=b"".join(lines))
        started = time.perf_counter()
        summary = run_popularity(spark, base_uri, settings, available_now=True)
        return {
            "hour": hour,
            "events": len(lines),
            "seconds": time.perf_counter() - started,
            "state_events": summary["state_events"],
            "history_events": summary["distinct_events"],
        }

    # At midday the first few events of the hour come in a batch of their own: what a
    # continuous job's batch of a couple of seconds costs with the state at its fullest.
    middle = sorted(hours)[len(hours) // 2]
    batches, small = [], {}
    for hour in sorted(hours):
        lines = hours[hour]
        if hour == middle:
            small = land_and_run(hour, f"bench-hour-{hour:02d}-first", lines[:SMALL_BATCH])
            lines = lines[SMALL_BATCH:]
        batches.append(land_and_run(hour, f"bench-hour-{hour:02d}", lines))

    whole = settings.replace(bucket=f"{settings.bucket}-whole")
    s3.create_bucket(Bucket=whole.bucket)
    for hour, lines in hours.items():
        key = layout.landing_key(traffic.start + timedelta(hours=hour), f"bench-hour-{hour:02d}")
        s3.put_object(Bucket=whole.bucket, Key=key, Body=b"".join(lines))
    started = time.perf_counter()
    run_popularity(
        spark, layout.uri(whole.bucket, "", "s3a").rstrip("/"), whole, available_now=True
    )
    whole_day_s = time.perf_counter() - started

    busiest = max(batches, key=lambda batch: batch["state_events"])
    return {
        "day_events": len(changes),
        "hourly_batch_median_s": statistics.median(batch["seconds"] for batch in batches),
        "hourly_batch_max_s": max(batch["seconds"] for batch in batches),
        "largest_state_events": busiest["state_events"],
        "last_batch_s": batches[-1]["seconds"],
        "last_state_events": batches[-1]["state_events"],
        "whole_day_batch_s": whole_day_s,
        "small_batch_events": small["events"],
        "small_batch_s": small["seconds"],
        "small_batch_state_events": small["state_events"],
        "batches": batches,
    }
