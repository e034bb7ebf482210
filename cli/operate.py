"""Commands for a stack left running by ``encore up``: one stage at a time, status, URLs.

Each command finds the stack through ``.encore/stack.json``; with no stack up it
says so and how to start one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import boto3
import psycopg2
from botocore.exceptions import ClientError, EndpointConnectionError

from cli import pipeline
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
    """Slot lag, events captured and landed, the newest feed's age and last night's manifest."""
    report: dict[str, Any] = {
        "aws_endpoint_url": settings.aws_endpoint_url,
        "database": redact_dsn(settings.require_dsn()),
    }
    try:
        conn = psycopg2.connect(settings.require_dsn(), connect_timeout=5)
    except psycopg2.OperationalError as exc:
        raise ConnectionError(
            f"Postgres at {redact_dsn(settings.require_dsn())} is unreachable: `encore up` "
            f"starts it ({str(exc).strip().splitlines()[0]})"
        ) from exc
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, confirmed_flush_lsn::text"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot_name,),
        )
        row = cursor.fetchone()
        report["slot"] = (
            {"name": settings.slot_name, "lag_bytes": row[0], "confirmed": row[1]}
            if row
            else {"name": settings.slot_name, "missing": True}
        )
        cursor.execute("SELECT to_regclass('bids') IS NOT NULL")
        if cursor.fetchone()[0]:
            cursor.execute("SELECT count(*) FROM bids")
            report["bids_in_database"] = cursor.fetchone()[0]
    conn.close()

    s3 = boto3.client("s3", **settings.boto3_kwargs())
    try:
        report["landed_events"] = pipeline.landed_event_counts(settings)
        report["feed"] = _object_age(s3, settings.bucket, layout.global_feed_key())
        report["last_night"] = _manifest(s3, settings.bucket)
    except EndpointConnectionError as exc:
        raise ConnectionError(
            f"the AWS endpoint {settings.aws_endpoint_url} is down: `encore up` starts it"
        ) from exc
    return report


def _object_age(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return None
    age = datetime.now(UTC) - head["LastModified"]
    return {"key": key, "age_s": round(age.total_seconds(), 1)}


def _manifest(s3: Any, bucket: str) -> dict[str, Any] | None:
    try:
        pointer = json.loads(
            s3.get_object(Bucket=bucket, Key=layout.RECOMMENDATIONS_POINTER)["Body"].read()
        )
        manifest: dict[str, Any] = json.loads(
            s3.get_object(Bucket=bucket, Key=layout.manifest_key(pointer["run_id"]))["Body"].read()
        )
    except ClientError:
        return None
    return manifest


def run_spark_job(settings: Settings, job: str) -> dict[str, Any]:
    """Run the popularity job (catch-up) or the nightly job once on local Spark."""
    from local.spark import local_session

    spark = local_session(settings, f"encore-{job}")
    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    try:
        if job == "stream":
            from spark_streaming.popularity import run_popularity

            return run_popularity(spark, base_uri, settings, available_now=True)
        from batch.recommend import run_nightly

        return run_nightly(spark, base_uri, settings)
    finally:
        spark.stop()
