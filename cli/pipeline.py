"""The stages wired together for local runs: the only place that imports more than one stage.

Each function runs one hop of the pipeline against the settings' database and
AWS endpoint and returns its counts, so the demo, the tests and the
benchmarks drive the same code.
"""

from __future__ import annotations

import json
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
from urllib.parse import unquote, urlsplit

import boto3
import psycopg2
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

from cli.progress import ProgressFactory, counting
from encore import events, layout
from encore.settings import Settings
from lambdas.capture import handler as capture_handler
from lambdas.capture.capture import prepare
from local.firehose_bridge import BridgeResult, FirehoseBridge, user_record_bytes
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
    """An export read and its catalogue inserted: the bids planned for the rows that are
    new, and the rows that were loaded before (not loaded again)."""

    export: loader.Export
    listings: list[loader.Listing]
    bids: list[replayer.PlannedBid]
    rejects_path: Path
    already_loaded: list[loader.AlreadyLoaded] = field(default_factory=list)


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
    settings: Settings,
    export_path: Path,
    rejects_path: Path,
    anchor: datetime,
    seed: int = 7,
    progress: ProgressFactory | None = None,
) -> LoadResult:
    """Read the export, write its rejects, insert the catalogue and plan the bids.

    What the database already holds is kept and not loaded again: its categories and
    listings keep their ids and windows, and a row whose bidder already has bids on
    its listing gets no bids planned (it is in ``already_loaded``). ``progress`` makes
    a bar for reading the export (lines) and one for inserting the catalogue (rows).
    """
    total_lines = loader.count_lines(export_path) if progress else None
    with counting(progress, "export", total_lines, "lines") as on_progress:
        export = loader.read_export(export_path, on_progress)
    loader.write_rejects(export, rejects_path)
    conn = psycopg2.connect(settings.require_dsn())
    try:
        loaded = loader.read_loaded(conn)
        listings = loader.plan_listings(export.interactions, loaded)
        new_listings = [listing for listing in listings if listing.key not in loaded.listings]
        windows = {
            listing_id: replayer.Window(*window) for listing_id, window in loaded.windows.items()
        }
        windows.update(replayer.plan_windows(new_listings, anchor, seed))
        to_load, already_loaded = loader.split_loaded(export.interactions, listings, loaded)
        bids = replayer.plan_bids(
            to_load, listings, windows, anchor, seed, first_id=loaded.last_bid_id + 1
        )
        rows = loader.catalogue_rows(
            export,
            listings,
            {listing_id: (w.starts_at, w.ends_at) for listing_id, w in windows.items()},
            loaded,
        )
        total_rows = sum(len(values) for values in rows.values())
        with counting(progress, "catalogue", total_rows, "rows") as on_progress:
            loader.insert_catalogue(conn, rows, on_progress)
    finally:
        conn.close()
    return LoadResult(export, listings, bids, rejects_path, already_loaded)


def capture_once(settings: Settings) -> dict[str, Any]:
    """One invocation of the capture Lambda, in-process."""
    capture_handler.use_settings(settings)
    summary: dict[str, Any] = capture_handler.handler(SCHEDULED_EVENT, LocalContext())
    return summary


def land_once(settings: Settings, on_progress: Callable[[int], None] | None = None) -> BridgeResult:
    """One pass of the local Firehose stand-in; ``on_progress`` gets the records it moved."""
    kwargs = settings.boto3_kwargs()
    bridge = FirehoseBridge(
        boto3.client("kinesis", **kwargs),
        boto3.client("firehose", **kwargs),
        boto3.client("s3", **kwargs),
        settings.stream_name,
        settings.delivery_stream_name,
        settings.bucket,
    )
    return bridge.run_once(on_progress)


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
    return event_counts(landed_events(settings))


def landed_events(settings: Settings, unreadable: list[str] | None = None) -> dict[str, str]:
    """Every distinct landed event: its id and its ``<type>.<op>``.

    A landed record that cannot be read as an event is skipped and named in
    ``unreadable`` (``<key>: <why>``), when given; else it raises ``EventError``.
    """
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    seen: dict[str, str] = {}
    for key in _keys(s3, settings.bucket, layout.LANDING_PREFIX):
        body = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
        report = None if unreadable is None else _noting(unreadable, key)
        seen.update(_typed_ids(body, report))
    return seen


def _noting(unreadable: list[str], key: str) -> Callable[[events.EventError], None]:
    return lambda error: unreadable.append(f"{key}: {error}")


def stream_events(settings: Settings) -> dict[str, str]:
    """Every distinct event the capture put to the Kinesis stream and the stream still
    holds (its retention, 24 hours by default): its id and its ``<type>.<op>``."""
    kinesis = boto3.client("kinesis", **settings.boto3_kwargs())
    seen: dict[str, str] = {}
    for shard in kinesis.list_shards(StreamName=settings.stream_name)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=settings.stream_name,
            ShardId=shard["ShardId"],
            ShardIteratorType="TRIM_HORIZON",
        )["ShardIterator"]
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
            for user in iter_deaggregate_records(page["Records"], data_format="Boto3"):
                seen.update(_typed_ids(user_record_bytes(user["kinesis"])))
            if not page["Records"] or page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")
    return seen


def _typed_ids(
    body: bytes, on_error: Callable[[events.EventError], None] | None = None
) -> dict[str, str]:
    return {
        str(event["event_id"]): f"{event['event_type']}.{event['op']}"
        for event in events.decode(body.decode(), on_error)
    }


def event_counts(typed_ids: dict[str, str]) -> dict[str, int]:
    """How many events of each ``<type>.<op>``."""
    return dict(sorted(Counter(typed_ids.values()).items()))


def unread_landed_files(settings: Settings) -> int:
    """Landed files the popularity job has not read yet: the size of its next catch-up.

    Read from the job's checkpoint. Spark's file source logs the files of each batch
    under ``sources/0/<batch>`` (folded into ``<batch>.compact`` every few batches):
    a ``v1`` line, then one JSON object per file with its ``path`` and ``batchId``.
    Batches commit in order and Spark deletes old commit files, so a batch's files
    count as read when its id is at most the last committed one; a batch cut short
    is run again with the same files.
    """
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    checkpoint = layout.POPULARITY_CHECKPOINT_PREFIX
    commits = [key.rsplit("/", 1)[1] for key in _keys(s3, settings.bucket, checkpoint + "commits/")]
    last_commit = max((int(name) for name in commits if name.isdigit()), default=-1)
    read: set[str] = set()
    for key in _keys(s3, settings.bucket, checkpoint + "sources/0/"):
        body = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().decode()
        for line in body.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry["batchId"] <= last_commit:
                    read.add(unquote(urlsplit(entry["path"]).path).lstrip("/"))
    landed = _keys(s3, settings.bucket, layout.LANDING_PREFIX)
    return sum(1 for key in landed if key not in read)


def _keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def popularity_catch_up(
    spark: Any,
    settings: Settings,
    progress: ProgressFactory | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Run the popularity job over everything landed and not yet read, then stop.

    ``progress`` makes a bar of the landed files read, advanced batch by batch.
    """
    from spark_streaming.popularity import run_popularity

    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    total = unread_landed_files(settings) if progress else None
    with counting(progress, "stream", total, "files") as on_batch:
        return run_popularity(
            spark, base_uri, settings, available_now=True, now=now, on_batch=on_batch
        )


def nightly_run(
    spark: Any, settings: Settings, progress: ProgressFactory | None = None
) -> dict[str, Any]:
    """Run the nightly job once; ``progress`` makes a bar of its stages."""
    from batch.recommend import NIGHTLY_STAGES, run_nightly

    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    with counting(progress, "nightly", len(NIGHTLY_STAGES), "stages") as advance:

        def on_stage(stage: str) -> None:
            if advance is not None:
                advance(1)

        return run_nightly(spark, base_uri, settings, on_stage=on_stage)
