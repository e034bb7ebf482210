"""The stages wired together for local runs: the only place that imports more than one stage.

Each function runs one hop of the pipeline against the settings' database and
AWS endpoint and returns its counts, so the demo, the tests and the
benchmarks drive the same code.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg2

from encore import events, layout
from encore.settings import Settings
from lambdas.capture import handler as capture_handler
from lambdas.capture.capture import prepare
from local.firehose_bridge import BridgeResult, FirehoseBridge
from producers import loader, replayer
from producers.schema import migrate

logger = logging.getLogger(__name__)

#: What EventBridge Scheduler sends the capture Lambda; its contents are not read.
SCHEDULED_EVENT = {"source": "aws.scheduler", "detail-type": "Scheduled Event", "detail": {}}
LAMBDA_TIMEOUT_S = 60.0


@dataclass
class LocalContext:
    """The parts of a Lambda context the handlers read."""

    timeout_s: float = LAMBDA_TIMEOUT_S
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int((self.timeout_s - (time.monotonic() - self.started)) * 1000)


@dataclass
class LoadResult:
    export: loader.Export
    listings: list[loader.Listing]
    bids: list[replayer.PlannedBid]
    rejects_path: Path


@dataclass
class FlowCounts:
    capture_runs: int = 0
    changes_captured: int = 0
    events_captured: int = 0
    dead_lettered: int = 0
    landed: int = 0
    landing_errors: int = 0
    bids_inserted: int = 0
    auctions_closed: int = 0
    last_lag_bytes: int | None = None
    #: (seconds since the replay began, bids inserted, records landed), one per loop.
    timeline: list[dict[str, float]] = field(default_factory=list)

    def add_capture(self, summary: dict[str, Any]) -> None:
        self.capture_runs += 1
        self.changes_captured += summary["changes"]
        self.events_captured += summary["events"]
        self.dead_lettered += summary["dead_lettered"]
        self.last_lag_bytes = summary["lag_bytes"]

    def add_landing(self, result: BridgeResult) -> None:
        self.landed += result.landed
        self.landing_errors += result.errors


def prepare_database(settings: Settings) -> None:
    """Apply migrations and create the publication and slot (before any data)."""
    conn = psycopg2.connect(settings.require_dsn())
    try:
        migrate(conn)
        prepare(conn, settings.slot_name, settings.publication_name)
    finally:
        conn.close()


def load_export(
    settings: Settings, export_path: Path, rejects_path: Path, anchor: datetime, seed: int = 7
) -> LoadResult:
    """Read the export, write its rejects, insert the catalogue and plan the bids."""
    export = loader.read_export(export_path)
    loader.write_rejects(export, rejects_path)
    listings = loader.plan_listings(export.interactions)
    windows = replayer.plan_windows(listings, anchor, seed)
    bids = replayer.plan_bids(export.interactions, listings, windows, anchor, seed)
    conn = psycopg2.connect(settings.require_dsn())
    try:
        loader.load_catalogue(
            conn,
            export,
            listings,
            {listing_id: (w.starts_at, w.ends_at) for listing_id, w in windows.items()},
        )
    finally:
        conn.close()
    return LoadResult(export, listings, bids, rejects_path)


def capture_once(settings: Settings) -> dict[str, Any]:
    """One invocation of the capture Lambda, in-process."""
    capture_handler.use_settings(settings)
    summary: dict[str, Any] = capture_handler.handler(SCHEDULED_EVENT, LocalContext())
    return summary


def land_once(settings: Settings) -> BridgeResult:
    """One pass of the local Firehose stand-in."""
    kwargs = settings.boto3_kwargs()
    bridge = FirehoseBridge(
        boto3.client("kinesis", **kwargs),
        boto3.client("firehose", **kwargs),
        boto3.client("s3", **kwargs),
        settings.stream_name,
        settings.delivery_stream_name,
        settings.bucket,
    )
    return bridge.run_once()


def drain(settings: Settings, counts: FlowCounts) -> None:
    """Capture and land until the slot has nothing left."""
    while True:
        summary = capture_once(settings)
        counts.add_capture(summary)
        counts.add_landing(land_once(settings))
        if summary["status"] == "drained" and summary["changes"] == 0:
            return


def replay_live(
    settings: Settings,
    load: LoadResult,
    anchor: datetime,
    per_transaction: int = 50,
    pause_s: float = 0.0,
    interval_s: float = 0.5,
    on_progress: Callable[[int], None] | None = None,
) -> FlowCounts:
    """Insert the planned bids in a thread while the capture and landing run on a loop."""
    counts = FlowCounts()
    failure: list[BaseException] = []
    inserted = [0]
    started = time.monotonic()

    def progress(count: int) -> None:
        inserted[0] += count
        if on_progress:
            on_progress(count)

    def insert() -> None:
        conn = psycopg2.connect(settings.require_dsn())
        try:
            counts.bids_inserted = replayer.insert_bids(
                conn, load.bids, per_transaction, pause_s, progress
            )
            counts.auctions_closed = replayer.close_auctions(conn, anchor)
        except BaseException as exc:  # reported in the caller's thread
            failure.append(exc)
        finally:
            conn.close()

    producer = threading.Thread(target=insert, name="replayer")
    producer.start()
    while producer.is_alive():
        counts.add_capture(capture_once(settings))
        counts.add_landing(land_once(settings))
        counts.timeline.append(
            {
                "t": round(time.monotonic() - started, 2),
                "inserted": inserted[0],
                "landed": counts.landed,
            }
        )
        producer.join(interval_s)
    if failure:
        raise failure[0]
    drain(settings, counts)
    counts.timeline.append(
        {
            "t": round(time.monotonic() - started, 2),
            "inserted": inserted[0],
            "landed": counts.landed,
        }
    )
    return counts


def landed_event_counts(settings: Settings) -> dict[str, int]:
    """Distinct landed events by type, read back from the landing prefix."""
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    seen: dict[str, str] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=settings.bucket, Prefix=layout.LANDING_PREFIX):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=settings.bucket, Key=item["Key"])["Body"].read()
            for event in events.decode(body.decode()):
                seen[str(event["event_id"])] = f"{event['event_type']}.{event['op']}"
    counted = Counter(seen.values())
    return dict(sorted(counted.items()))
