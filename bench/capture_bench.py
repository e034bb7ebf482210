"""Capture throughput: events per second from the slot to Kinesis, and peak memory.

Inserts a backlog of bid changes into a fresh local Postgres, then drains it
through the real capture (pgoutput decoding, contract encoding, aggregation,
PutRecords to moto's server over HTTP) in a child process whose peak RSS and
CPU time are read at the end. The reference, in the same run, is a raw read of
the same slot: ``pg_logical_slot_peek_binary_changes`` fetched to the client,
with no decoding or sending. A second reference reads the slot the way the
capture does, through the replication protocol, again with no decoding or
sending.
"""

from __future__ import annotations

import json
import resource
import select
import time
from typing import Any

import psycopg2
from psycopg2.extras import LogicalReplicationConnection

from bench import child
from bench.child import run_in_child
from encore import events
from encore.settings import Settings


def seed_listing(conn: Any) -> None:
    """User ``bench`` and live listing 1 (with its category) for the bids a benchmark places."""
    with conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO users VALUES ('bench', 'bench') ON CONFLICT DO NOTHING")
        cursor.execute("INSERT INTO categories VALUES (1, 'Toys') ON CONFLICT DO NOTHING")
        cursor.execute("INSERT INTO sub_categories VALUES (1, 1, 'Funko') ON CONFLICT DO NOTHING")
        cursor.execute(
            "INSERT INTO listings (id, title, category_id, sub_category_id, price, ends_at)"
            " VALUES (1, 'bench', 1, 1, 1, now() + interval '1 day') ON CONFLICT DO NOTHING"
        )


def insert_backlog(settings: Settings, changes: int) -> None:
    conn = psycopg2.connect(settings.require_dsn())
    seed_listing(conn)
    step = 50_000
    for start in range(0, changes, step):
        with conn, conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bids (listing_id, bidder_id, amount, placed_at)"
                " SELECT 1, 'bench', 1 + n / 100.0, now() FROM generate_series(%s, %s) n",
                (start, min(start + step, changes) - 1),
            )
    conn.close()


def raw_slot_read(settings: Settings) -> tuple[int, float]:
    """Rows and seconds to fetch every message of the slot to the client, nothing decoded."""
    conn = psycopg2.connect(settings.require_dsn())
    started = time.perf_counter()
    rows = 0
    with conn.cursor(name="raw_slot_read") as cursor:
        cursor.itersize = 2_000
        cursor.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL,"
            " 'proto_version', '1', 'publication_names', %s)",
            (settings.slot_name, settings.publication_name),
        )
        for _ in cursor:
            rows += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return rows, elapsed


def raw_stream_read(settings: Settings) -> tuple[int, float]:
    """Messages and seconds to stream the slot up to the current WAL position through the
    replication protocol, nothing decoded and nothing confirmed."""
    conn = psycopg2.connect(settings.require_dsn())
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        target = events.parse_lsn(cursor.fetchone()[0])
    conn.close()
    started = time.perf_counter()
    replication = psycopg2.connect(
        settings.require_dsn(), connection_factory=LogicalReplicationConnection
    )
    stream = replication.cursor()
    stream.start_replication(
        slot_name=settings.slot_name,
        decode=False,
        options={"proto_version": "1", "publication_names": settings.publication_name},
    )
    rows = 0
    inside_transaction = False
    asked_at = 0.0
    while True:
        message = stream.read_message()
        if message is not None:
            rows += 1
            kind = message.payload[:1]
            if kind == b"B":
                inside_transaction = True
            elif kind == b"C":
                inside_transaction = False
            continue
        # Between transactions, a position at or past the target means everything
        # committed before it has arrived; a keepalive, asked for, carries the position.
        if not inside_transaction and stream.wal_end >= target:
            break
        if time.monotonic() - asked_at >= 0.02:
            stream.send_feedback(reply=True)
            asked_at = time.monotonic()
        select.select([stream], [], [], 0.02)
    elapsed = time.perf_counter() - started
    replication.close()
    return rows, elapsed


def _peak_rss_mb() -> float:
    """This program's peak resident set size.

    ``ru_maxrss`` survives exec, so in a child it is never below the parent's
    size at the fork; Linux's ``VmHWM`` belongs to the program alone.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _drain_and_report(overrides: str) -> None:
    """The child's side of :func:`drain_in_child`: drain, then print one JSON line."""
    from cli.pipeline import capture_once

    settings = Settings.load(**json.loads(overrides))
    events = runs = 0
    started = time.perf_counter()
    cpu_started = time.process_time()
    while True:
        summary = capture_once(settings)
        runs += 1
        events += summary["events"]
        if summary["status"] == "drained" and summary["changes"] == 0:
            break
    report = {
        "events": events,
        "runs": runs,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "peak_rss_mb": _peak_rss_mb(),
    }
    child.report(report)


def drain_in_child(settings: Settings) -> dict[str, Any]:
    """Run the capture until drained in a fresh interpreter; returns its counts and peak RSS."""
    overrides = {
        "aws_endpoint_url": settings.aws_endpoint_url,
        "database_dsn": settings.database_dsn,
        "stream_name": settings.stream_name,
        "bucket": settings.bucket,
        "slot_name": settings.slot_name,
    }
    return run_in_child("bench.capture_bench:_drain_and_report", json.dumps(overrides))


def measure(settings: Settings, changes: int) -> dict[str, Any]:
    insert_backlog(settings, changes)
    raw_rows, raw_s = raw_slot_read(settings)
    stream_rows, stream_s = raw_stream_read(settings)
    drained = drain_in_child(settings)
    return {
        "changes": changes,
        "raw_rows": raw_rows,
        "raw_s": raw_s,
        "raw_events_per_s": raw_rows / raw_s,
        "raw_stream_rows": stream_rows,
        "raw_stream_s": stream_s,
        "raw_stream_events_per_s": stream_rows / stream_s,
        "events": drained["events"],
        "capture_s": drained["seconds"],
        "events_per_s": drained["events"] / drained["seconds"],
        # The capture process's own CPU time (all threads): steadier than the rate
        # when other work shares the machine.
        "capture_cpu_s": drained["cpu_seconds"],
        "peak_rss_mb": drained["peak_rss_mb"],
        "runs": drained["runs"],
        "parent_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
