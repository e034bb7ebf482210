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
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

import boto3
import psycopg2
from botocore.exceptions import ClientError

from bench import capture_bench, landing_bench
from cli import pipeline
from encore import layout
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

    kwargs = settings.boto3_kwargs()
    sink = KinesisSink(
        boto3.client("kinesis", **kwargs),
        settings.stream_name,
        boto3.client("s3", **kwargs),
        settings.bucket,
    )
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
