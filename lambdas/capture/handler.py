"""The change-capture Lambda: run every minute by a schedule, drains the slot to Kinesis.

``handler(event, context)`` takes any scheduled event (its contents are not
read) and returns the run's counts. Settings and AWS clients are built once
per container; the database connection is reused while it stays open.
Locally the command line calls the same handler in-process on a loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import boto3
import psycopg2
from psycopg2.extensions import make_dsn

from encore.output import output_logger
from encore.settings import Settings, redact_dsn
from lambdas import json_logging
from lambdas.capture.capture import Capture, CaptureLimits, CaptureResult
from lambdas.capture.kinesis_sink import KinesisSink

json_logging.configure()
logger = logging.getLogger(__name__)
#: The EMF metric line: CloudWatch reads it only as a bare JSON line on stdout.
output = output_logger(__name__)

_settings: Settings | None = None
_clients: dict[str, Any] = {}
_conn: Any = None


def _dsn(settings: Settings) -> str:
    """The DSN from settings, else built from the Secrets Manager secret RDS keeps."""
    if settings.database_dsn or not settings.database_secret_id:
        return settings.require_dsn()
    if "secretsmanager" not in _clients:
        _clients["secretsmanager"] = boto3.client("secretsmanager", **settings.boto3_kwargs())
    secret = json.loads(
        _clients["secretsmanager"].get_secret_value(SecretId=settings.database_secret_id)[
            "SecretString"
        ]
    )
    return make_dsn(
        host=secret["host"],
        port=secret.get("port", 5432),
        dbname=secret.get("dbname", "encore"),
        user=secret["username"],
        password=secret["password"],
        sslmode="require",
    )


def _connection(settings: Settings) -> Any:
    global _conn
    if _conn is None or _conn.closed:
        dsn = _dsn(settings)
        try:
            _conn = psycopg2.connect(dsn, connect_timeout=10)
        except psycopg2.OperationalError as exc:
            raise ConnectionError(f"cannot reach Postgres at {redact_dsn(dsn)}: {exc}") from exc
    return _conn


def use_settings(settings: Settings) -> None:
    """Replace the settings read from the environment (local runs and tests)."""
    global _settings, _conn
    if settings == _settings:
        return
    if _conn is not None and not _conn.closed:
        _conn.close()
    _settings, _conn = settings, None
    _clients.clear()


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Drain the slot; with ``capture_linger_s``, keep reading it for that long.

    A schedule fires at most once a minute, so a run that returns as soon as the
    slot is drained leaves a commit made just after waiting up to a minute.
    Lingering, the run polls the slot every ``capture_poll_s`` until
    ``capture_linger_s`` has passed (and never past the Lambda's remaining
    time less ``capture_time_margin_s``), so commits reach Kinesis within
    about a poll. Each poll is a full capture run: what it sent is confirmed
    before the next begins, and the lock keeps a late schedule from reading
    the slot at the same time.
    """
    global _settings
    json_logging.request_id.set(getattr(context, "aws_request_id", None))
    settings = _settings = _settings or Settings.load()
    if not _clients:
        _clients["kinesis"] = boto3.client("kinesis", **settings.boto3_kwargs())
        _clients["s3"] = boto3.client("s3", **settings.boto3_kwargs())
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    remaining_s = (lambda: float("inf")) if remaining is None else (lambda: remaining() / 1000)

    started = time.monotonic()
    results = [_run_once(settings, remaining_s)]
    while results[-1].status not in STOPPING_STATUSES:
        left = min(
            settings.capture_linger_s - (time.monotonic() - started),
            remaining_s() - settings.capture_time_margin_s,
        )
        if left <= settings.capture_poll_s:
            break
        if results[-1].status == "drained":
            time.sleep(settings.capture_poll_s)
        results.append(_run_once(settings, remaining_s))
    summary = merge_summaries([result.summary() for result in results])
    logger.info("capture finished: %s", summary)
    lag_bytes = results[-1].lag_bytes
    if lag_bytes is not None and os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        output.info("%s", slot_lag_metric(settings.slot_name, lag_bytes))
    return summary


#: A run that ends so is not followed by another in the same invocation.
STOPPING_STATUSES = frozenset({"locked", "time"})
_SUMMED = (
    "changes",
    "events",
    "transactions",
    "dead_lettered",
    "kinesis_records",
    "put_requests",
    "retried_entries",
)


def _run_once(settings: Settings, remaining_s: Callable[[], float]) -> CaptureResult:
    sink = KinesisSink(_clients["kinesis"], settings.stream_name, _clients["s3"], settings.bucket)
    capture = Capture(
        _connection(settings),
        sink,
        settings.slot_name,
        settings.publication_name,
        CaptureLimits(settings.capture_max_bytes, settings.capture_time_margin_s),
    )
    try:
        return capture.run(remaining_s)
    except psycopg2.Error:
        # A broken connection is not reused by the next invocation.
        if _conn is not None:
            _conn.close()
        raise


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for the runs of an invocation: counts summed, the rest from the last run."""
    merged = dict(summaries[-1])
    for name in _SUMMED:
        merged[name] = sum(summary[name] for summary in summaries)
    merged["runs"] = len(summaries)
    return merged


def slot_lag_metric(slot_name: str, lag_bytes: int) -> str:
    """One CloudWatch Embedded Metric Format line: Lambda's log turns it into a metric.

    The template's slot-lag alarm watches ``Encore/SlotLagBytes`` by ``SlotName``.
    """
    return json.dumps(
        {
            "_aws": {
                "Timestamp": int(time.time() * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": "Encore",
                        "Dimensions": [["SlotName"]],
                        "Metrics": [{"Name": "SlotLagBytes", "Unit": "Bytes"}],
                    }
                ],
            },
            "SlotName": slot_name,
            "SlotLagBytes": lag_bytes,
        }
    )
