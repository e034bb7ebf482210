"""Change capture against a real Postgres and the local AWS endpoint, checked in S3.

Each test gets a database, slot, stream and bucket of its own; the assertions
read back what reached the landing prefix, record by record.
"""

from __future__ import annotations

import random
import string
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from cli import pipeline
from encore import events
from encore.settings import Settings
from lambdas.capture.capture import (
    CAUGHT_UP_S,
    Capture,
    CaptureError,
    CaptureLimits,
    CaptureResult,
    lock_key,
    prepare,
)
from lambdas.capture.kinesis_sink import KinesisSink
from local.services import LocalPostgres
from producers.schema import migrate

pytestmark = pytest.mark.integration

BIG_ID = 1234567890123456789


@pytest.fixture
def capture_settings(fresh_database: Settings) -> Iterator[Settings]:
    settings = fresh_database
    dsn = settings.require_dsn()
    conn = psycopg2.connect(dsn)
    migrate(conn)
    prepare(conn, settings.slot_name, settings.publication_name)
    with conn, conn.cursor() as cursor:
        cursor.execute("INSERT INTO users VALUES ('u1', 'one'), ('u2', 'two'), ('seller', 's')")
        cursor.execute("INSERT INTO categories VALUES (1, 'Collectible Toys')")
        cursor.execute("INSERT INTO sub_categories VALUES (1, 1, 'Funko')")
    conn.close()
    yield settings
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
    conn.close()


def execute(settings: Settings, *statements: tuple[str, tuple[Any, ...]] | str) -> None:
    conn = psycopg2.connect(settings.require_dsn())
    with conn, conn.cursor() as cursor:
        for statement in statements:
            if isinstance(statement, str):
                cursor.execute(statement)
            else:
                cursor.execute(*statement)
    conn.close()


def insert_listing(
    settings: Settings, listing_id: int, title: str = "Pop!", description: str | None = None
) -> None:
    execute(
        settings,
        (
            "INSERT INTO listings (id, seller_id, title, category_id, sub_category_id, price,"
            " ends_at, description)"
            " VALUES (%s, 'seller', %s, 1, 1, 1, now() + interval '1 day', %s)",
            (listing_id, title, description),
        ),
    )


def landed(settings: Settings) -> list[dict[str, str | None]]:
    """Every landed event, in landing order (duplicates kept)."""
    import boto3

    s3 = boto3.client("s3", **settings.boto3_kwargs())
    found = []
    listing = s3.list_objects_v2(Bucket=settings.bucket, Prefix="landing/")
    for item in sorted(listing.get("Contents", []), key=lambda item: item["Key"]):
        body = s3.get_object(Bucket=settings.bucket, Key=item["Key"])["Body"].read()
        found.extend(events.decode(body.decode()))
    return found


def wait_until_shutting_down(settings: Settings) -> None:
    """Return once the server refuses new connections."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            psycopg2.connect(settings.require_dsn()).close()
        except psycopg2.OperationalError:
            return
        time.sleep(0.02)
    raise AssertionError("the server did not begin to shut down")


def capture_and_land(settings: Settings) -> dict[str, Any]:
    summary = pipeline.capture_once(settings)
    pipeline.land_once(settings)
    return summary


def test_capture_lands_inserts_updates_and_deletes_field_by_field(
    capture_settings: Settings,
) -> None:
    settings = capture_settings
    title = 'Funko "Pop", signed\nby the artist'
    description = "".join(random.Random(3).choices(string.ascii_letters, k=10_240))
    insert_listing(settings, BIG_ID, title, description)
    execute(
        settings,
        (
            "INSERT INTO bids (id, listing_id, bidder_id, amount, placed_at) VALUES"
            " (1, %s, 'u1', 1.5, '2026-12-04 16:52:59+01'),"
            " (2, %s, 'u2', 123456789.125, '2026-12-04 21:22:59.5+05:30'),"
            " (3, %s, 'u1', 7, '2026-12-04 15:52:59.123456+00')",
            (BIG_ID, BIG_ID, BIG_ID),
        ),
    )
    execute(settings, ("UPDATE listings SET price = 9.99 WHERE id = %s", (BIG_ID,)))
    execute(
        settings,
        ("UPDATE listings SET status = 'sold' WHERE id = %s", (BIG_ID,)),
        "DELETE FROM bids WHERE id = 3",
    )

    summary = capture_and_land(settings)

    assert summary["changes"] == 7
    found = landed(settings)
    assert [(e["event_type"], e["op"], e["table_key"]) for e in found] == [
        ("listing", "insert", str(BIG_ID)),
        ("bid", "insert", "1"),
        ("bid", "insert", "2"),
        ("bid", "insert", "3"),
        ("listing", "update", str(BIG_ID)),
        ("listing", "update", str(BIG_ID)),
        ("bid", "delete", "3"),
    ]
    inserted = found[0]
    assert inserted["title"] == title
    assert inserted["description"] == description
    assert (inserted["category"], inserted["sub_category"]) == ("Collectible Toys", "Funko")
    assert inserted["listing_id"] == "1234567890123456789"
    assert [e["amount"] for e in found[1:4]] == ["1.50", "123456789.13", "7.00"]
    assert [e["placed_at"] for e in found[1:4]] == [
        "2026-12-04T15:52:59.000000Z",
        "2026-12-04T15:52:59.500000Z",
        "2026-12-04T15:52:59.123456Z",
    ]
    repriced, sold = found[4], found[5]
    assert (repriced["price"], repriced["status"]) == ("9.99", "live")
    assert sold["status"] == "sold"
    assert repriced["description"] == description, "an unchanged TOASTed column became NULL"
    assert sold["description"] == description
    assert found[6]["bid_id"] == "3" and found[6]["listing_id"] == str(BIG_ID)
    assert len({e["event_id"] for e in found}) == 7
    assert found[1]["commit_lsn"] == found[2]["commit_lsn"]  # one transaction
    assert found[5]["commit_lsn"] == found[6]["commit_lsn"]


def test_crash_between_put_and_confirm_replays_the_batch_with_the_same_ids(
    capture_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = capture_settings
    insert_listing(settings, 10)
    execute(
        settings,
        "INSERT INTO bids (listing_id, bidder_id, amount)"
        " SELECT 10, 'u1', n FROM generate_series(1, 20) AS n",
    )

    def crash(self: Capture, lsn: int) -> None:
        raise RuntimeError("the process died before confirming")

    monkeypatch.setattr(Capture, "_advance", crash)
    with pytest.raises(RuntimeError, match="before confirming"):
        pipeline.capture_once(settings)
    pipeline.land_once(settings)
    first = landed(settings)
    monkeypatch.undo()

    assert capture_and_land(settings)["changes"] == 21
    assert capture_and_land(settings)["changes"] == 0
    found = landed(settings)
    assert len(first) == 21 and len(found) == 42
    assert [e["event_id"] for e in found[21:]] == [e["event_id"] for e in first]


def test_postgres_restarted_between_runs_loses_nothing(
    capture_settings: Settings, postgres: LocalPostgres
) -> None:
    settings = capture_settings
    insert_listing(settings, 11)
    execute(settings, "INSERT INTO bids (listing_id, bidder_id, amount) VALUES (11, 'u1', 1)")
    assert capture_and_land(settings)["changes"] == 2

    postgres.restart()
    execute(settings, "INSERT INTO bids (listing_id, bidder_id, amount) VALUES (11, 'u2', 2)")
    with pytest.raises(psycopg2.Error):
        pipeline.capture_once(settings)  # the connection kept between runs died with the server
    assert capture_and_land(settings)["changes"] == 1

    found = landed(settings)
    assert [(e["op"], e["bidder_id"]) for e in found if e["event_type"] == "bid"] == [
        ("insert", "u1"),
        ("insert", "u2"),
    ]


def test_postgres_restarted_mid_run_replays_what_was_not_confirmed(
    capture_settings: Settings, postgres: LocalPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = capture_settings
    insert_listing(settings, 14)
    for _ in range(3):
        execute(
            settings,
            "INSERT INTO bids (listing_id, bidder_id, amount)"
            " SELECT 14, 'u1', n FROM generate_series(1, 100) AS n",
        )
    restart = threading.Thread(target=postgres.restart)
    queued = [0]
    add = KinesisSink.add

    def add_then_restart(self: KinesisSink, *args: Any) -> None:
        add(self, *args)
        queued[0] += 1
        if queued[0] == 150:
            restart.start()
            wait_until_shutting_down(settings)

    monkeypatch.setattr(KinesisSink, "add", add_then_restart)
    with pytest.raises(psycopg2.Error):
        pipeline.capture_once(settings)
    # A fast shutdown ends the normal connections at once; the WAL sender waits for the
    # run, which fails at its next query and closes the replication connection.
    restart.join()
    monkeypatch.undo()

    assert capture_and_land(settings)["changes"] == 301
    assert capture_and_land(settings)["changes"] == 0
    assert len({e["event_id"] for e in landed(settings)}) == 301


def test_a_failed_run_leaves_the_slot_free(
    capture_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = capture_settings
    insert_listing(settings, 15)

    def fail(self: KinesisSink) -> None:
        raise RuntimeError("Kinesis is unreachable")

    monkeypatch.setattr(KinesisSink, "flush", fail)
    with pytest.raises(RuntimeError, match="unreachable"):
        pipeline.capture_once(settings)

    conn = psycopg2.connect(settings.require_dsn())
    conn.autocommit = True
    deadline = time.monotonic() + 5
    with conn.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                (settings.slot_name,),
            )
            (active_pid,) = cursor.fetchone()
            if active_pid is None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    conn.close()
    assert active_pid is None, "the replication connection outlived the run"


def test_a_captured_table_without_a_primary_key_is_refused_by_name(
    capture_settings: Settings,
) -> None:
    settings = capture_settings
    execute(
        settings,
        "CREATE TABLE bids_archive (listing_id bigint, amount numeric)",
        "CREATE PUBLICATION broken FOR TABLE bids_archive",
    )
    conn = psycopg2.connect(settings.require_dsn())

    with pytest.raises(CaptureError, match=r"'bids_archive' has no primary key.*ADD PRIMARY KEY"):
        prepare(conn, "slot_broken_" + uuid.uuid4().hex[:6], "broken")
    conn.close()


@pytest.mark.parametrize("identity", ["NOTHING", "DEFAULT"])
def test_a_replica_identity_that_loses_old_rows_is_refused_with_the_fix(
    capture_settings: Settings, identity: str
) -> None:
    settings = capture_settings
    execute(settings, f"ALTER TABLE bids REPLICA IDENTITY {identity}")

    with pytest.raises(
        CaptureError,
        match=rf"'bids' has REPLICA IDENTITY {identity}.*ALTER TABLE bids REPLICA IDENTITY FULL",
    ):
        pipeline.capture_once(settings)


def test_an_idle_captured_table_beside_a_busy_one_still_advances_the_slot(
    capture_settings: Settings,
) -> None:
    settings = capture_settings
    execute(settings, "CREATE TABLE page_views (id bigserial PRIMARY KEY, path text)")
    capture_and_land(settings)
    execute(
        settings, "INSERT INTO page_views (path) SELECT 'p' || n FROM generate_series(1, 5000) n"
    )

    summary = capture_and_land(settings)

    assert summary["changes"] == 0
    assert summary["lag_bytes"] is not None and summary["lag_bytes"] < 1024
    assert landed(settings) == []


def test_a_target_past_the_last_record_ends_the_run_once_the_server_has_caught_up(
    capture_settings: Settings,
) -> None:

    settings = capture_settings
    sink = KinesisSink.from_settings(settings)
    conn = psycopg2.connect(settings.require_dsn())
    capture = Capture(conn, sink, settings.slot_name, settings.publication_name)
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        written = events.parse_lsn(cursor.fetchone()[0])
    # No WAL will reach a gigabyte further: only the server's unchanging answers end the read.
    stream = capture._start_stream()
    try:
        started = time.monotonic()
        reading = capture._read(stream, written + 2**30, CaptureResult(), lambda: float("inf"))
        elapsed = time.monotonic() - started
    finally:
        stream.connection.close()
        conn.close()

    assert reading.stopped == "drained"
    assert reading.confirm is not None and reading.confirm < written + 2**30
    assert CAUGHT_UP_S <= elapsed < CAUGHT_UP_S + 10


def test_a_second_reader_finds_the_slot_locked(capture_settings: Settings) -> None:
    settings = capture_settings
    holder = psycopg2.connect(settings.require_dsn())
    holder.autocommit = True
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", (lock_key(settings.slot_name),))
    insert_listing(settings, 12)

    assert pipeline.capture_once(settings)["status"] == "locked"
    # Unlock before closing: a closed connection's backend drops its locks only
    # when it exits, which the next capture could outrun (it then found "locked").
    with holder.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s)", (lock_key(settings.slot_name),))
    holder.close()
    assert capture_and_land(settings)["changes"] == 1


def test_a_backlog_drains_over_several_runs_within_the_limits(capture_settings: Settings) -> None:

    settings = capture_settings
    insert_listing(settings, 13)
    for _ in range(6):
        execute(
            settings,
            "INSERT INTO bids (listing_id, bidder_id, amount)"
            " SELECT 13, 'u1', n FROM generate_series(1, 100) AS n",
        )
    runs = []
    while True:
        sink = KinesisSink.from_settings(settings)
        capture = Capture(
            psycopg2.connect(settings.require_dsn()),
            sink,
            settings.slot_name,
            settings.publication_name,
            CaptureLimits(max_bytes=20_000),
        )
        result = capture.run()
        runs.append((result.status, result.changes))
        capture.conn.close()
        if result.status == "drained" and result.changes == 0:
            break
    pipeline.land_once(settings)

    assert sum(changes for _, changes in runs) == 601
    assert all(status == "bytes" for status, _ in runs[:-2])
    assert len(runs) > 3
    assert len({e["event_id"] for e in landed(settings)}) == 601


def test_a_lingering_run_picks_up_a_commit_made_after_the_slot_was_drained(
    capture_settings: Settings,
) -> None:
    from lambdas.capture import handler as capture_handler

    settings = capture_settings.replace(capture_linger_s=4.0, capture_poll_s=0.2)
    insert_listing(settings, 21)
    late = threading.Timer(1.5, insert_listing, (settings, 22))
    late.start()
    capture_handler.use_settings(settings)
    try:
        started = time.monotonic()
        summary = capture_handler.handler({}, None)
        elapsed = time.monotonic() - started
    finally:
        late.join()
    pipeline.land_once(settings)

    # The first run drains listing 21; a later poll of the same invocation finds listing 22.
    assert summary["runs"] > 2
    assert summary["changes"] == 2
    assert 3.5 <= elapsed < 8
    assert sorted(e["listing_id"] for e in landed(settings)) == ["21", "22"]


def test_a_run_without_lingering_reads_the_slot_once(capture_settings: Settings) -> None:
    from lambdas.capture import handler as capture_handler

    insert_listing(capture_settings, 23)
    capture_handler.use_settings(capture_settings)

    summary = capture_handler.handler({}, None)

    assert (summary["runs"], summary["changes"]) == (1, 1)
