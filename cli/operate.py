"""Commands for a stack left running by ``encore up``: one stage at a time, status, URLs.

Each command finds the stack through ``.encore/stack.json``; with no stack up it
says so and how to start one.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import boto3
import psycopg2
from botocore.exceptions import EndpointConnectionError

from cli import pipeline
from cli.progress import ProgressFactory
from cli.stack import LocalStack, running_stack
from encore import layout
from encore.settings import Settings, redact_dsn

logger = logging.getLogger(__name__)


class StackDown(RuntimeError):
    """No local stack is running."""


def current() -> LocalStack:
    stack = running_stack()
    if stack is None:
        raise StackDown("no local stack is up: start one with `encore up`")
    return stack


def status(settings: Settings) -> dict[str, Any]:
    """Slot lag, events captured and landed, the newest feed's age and last night's manifest.

    ``captured_events`` are the distinct events in the Kinesis stream, ``landed_events``
    those under the landing prefix, both by ``<type>.<op>``; ``not_yet_landed`` counts
    the captured events that have not landed; ``landed_unreadable`` names the landed
    records that are no event (file and why). ``newest_feed`` and ``last_night`` are
    None until the popularity job and the nightly job have published.

    Limitations: the stream keeps events for its retention period (24 hours by
    default), so on an older stack ``captured_events`` covers that period only; and
    both counts read every event, which suits the local stack, not a large bucket.
    """
    report: dict[str, Any] = {
        "aws_endpoint_url": settings.aws_endpoint_url,
        "database": redact_dsn(settings.require_dsn()),
        **_database_status(settings),
    }
    from batch.publish import read_manifest

    try:
        captured = pipeline.stream_events(settings)
        unreadable: list[str] = []
        landed = pipeline.landed_events(settings, unreadable)
        s3 = boto3.client("s3", **settings.boto3_kwargs())
        report["captured_events"] = pipeline.event_counts(captured)
        report["landed_events"] = pipeline.event_counts(landed)
        report["not_yet_landed"] = len(captured.keys() - landed.keys())
        # The popularity job quarantines these with their reasons; here they are named.
        report["landed_unreadable"] = unreadable
        report["dead_lettered"] = _count(s3, settings.bucket, layout.CAPTURE_DEAD_LETTER_PREFIX)
        report["newest_feed"] = _newest(s3, settings.bucket, layout.FEEDS_PREFIX)
        report["last_night"] = read_manifest(s3, settings.bucket)
    except EndpointConnectionError as exc:
        raise ConnectionError(
            f"the AWS endpoint {settings.aws_endpoint_url} is down: `encore up` starts it"
        ) from exc
    return report


def _database_status(settings: Settings) -> dict[str, Any]:
    """The slot's lag behind the server's WAL and the bids in the database."""
    try:
        conn = psycopg2.connect(settings.require_dsn(), connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ConnectionError(
            f"Postgres at {redact_dsn(settings.require_dsn())} is unreachable: `encore up` "
            f"starts it ({str(exc).strip().splitlines()[0]})"
        ) from exc
    found: dict[str, Any] = {}
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint,"
                " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (settings.slot_name,),
            )
            row = cursor.fetchone()
            found["slot"] = (
                {"name": settings.slot_name, "lag_bytes": row[0], "confirmed": row[1]}
                if row
                else {"name": settings.slot_name, "missing": True}
            )
            cursor.execute("SELECT to_regclass('bids') IS NOT NULL")
            if cursor.fetchone()[0]:
                cursor.execute("SELECT count(*) FROM bids")
                found["bids_in_database"] = cursor.fetchone()[0]
    finally:
        conn.close()
    return found


def _count(s3: Any, bucket: str, prefix: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(len(page.get("Contents", [])) for page in pages)


def _newest(s3: Any, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The most recently written object under ``prefix``: its key and age."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    objects = [item for page in pages for item in page.get("Contents", [])]
    if not objects:
        return None
    newest = max(objects, key=lambda item: item["LastModified"])
    age = datetime.now(UTC) - newest["LastModified"]
    return {"key": newest["Key"], "age_s": round(age.total_seconds(), 1)}


def run_spark_job(
    settings: Settings, job: str, progress: ProgressFactory | None = None
) -> dict[str, Any]:
    """Run the popularity job (catch-up) or the nightly job once on local Spark.

    ``progress`` makes a bar of the catch-up's landed files.
    """
    from local.spark import local_session

    spark = local_session(settings, f"encore-{job}")
    try:
        if job == "stream":
            return pipeline.popularity_catch_up(spark, settings, progress)
        return pipeline.nightly_run(spark, settings, progress)
    finally:
        spark.stop()
