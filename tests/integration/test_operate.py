"""The operator's view of a stack: `encore status`, and the progress of loading and landing.

A slice of the real export goes through Postgres, the capture, Kinesis and the
landing hop; feeds and a nightly manifest are put in place by hand, so no Spark
is needed.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import psycopg2
import pytest

from cli import main, operate, pipeline
from cli.progress import Progress
from cli.stack import LocalStack
from encore import layout
from encore.settings import Settings
from producers import loader

pytestmark = pytest.mark.integration

ANCHOR = datetime(2026, 12, 1, 12, tzinfo=UTC)
SLICE_ROWS = 30


def use_stack(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Make the command line's stack the test's own database and bucket."""
    monkeypatch.setattr(operate, "current", lambda: LocalStack(settings, None, None))


@pytest.fixture
def export_slice(export_head: Callable[..., Path]) -> Path:
    return export_head(SLICE_ROWS)


@pytest.fixture
def replayed(
    fresh_database: Settings, export_slice: Path, tmp_path: Path
) -> tuple[Settings, pipeline.FlowCounts, str]:
    """A stack after the slice was loaded (with progress bars) and replayed to the end."""
    settings = fresh_database
    bars = io.StringIO()
    pipeline.prepare_database(settings)
    load = pipeline.load_export(
        settings,
        export_slice,
        tmp_path / "rejects.csv",
        ANCHOR,
        progress=partial(Progress, stream=bars),
    )
    flow = pipeline.replay_live(settings, load, ANCHOR, per_transaction=25)
    return settings, flow, bars.getvalue()


def test_loading_the_export_shows_the_lines_read_and_the_rows_inserted(
    replayed: tuple[Settings, pipeline.FlowCounts, str], export_slice: Path
) -> None:
    settings, _, bars = replayed
    with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM categories)"
            " + (SELECT count(*) FROM sub_categories) + (SELECT count(*) FROM listings)"
        )
        rows = cursor.fetchone()[0]
    conn.close()
    lines = export_slice.read_bytes().count(b"\n")

    export_line, catalogue_line = bars.splitlines()
    assert export_line.startswith("export ") and f" 100% {lines}/{lines} lines" in export_line
    assert catalogue_line.startswith("catalogue ")
    assert f" 100% {rows}/{rows} rows" in catalogue_line


def test_status_shows_slot_lag_events_captured_and_landed_feed_age_and_last_night(
    replayed: tuple[Settings, pipeline.FlowCounts, str],
) -> None:
    settings, flow, _ = replayed
    s3 = boto3.client("s3", **settings.boto3_kwargs())

    drained = operate.status(settings)

    landed = pipeline.landed_event_counts(settings)
    assert drained["captured_events"] == drained["landed_events"] == landed
    assert landed["bid.insert"] == flow.bids_inserted == drained["bids_in_database"]
    assert drained["not_yet_landed"] == drained["dead_lettered"] == 0
    assert drained["landed_unreadable"] == []
    assert drained["slot"]["name"] == settings.slot_name and drained["slot"]["lag_bytes"] >= 0
    assert drained["newest_feed"] is None and drained["last_night"] is None

    # One more bid, captured but not landed yet.
    with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bids (id, listing_id, bidder_id, amount, placed_at)"
            " SELECT max(id) + 1, min(listing_id), min(bidder_id), 1.00, now() FROM bids"
        )
    conn.close()
    lag_before_capture = operate.status(settings)["slot"]["lag_bytes"]
    pipeline.capture_once(settings)
    behind = operate.status(settings)

    assert lag_before_capture > 0
    assert behind["captured_events"]["bid.insert"] == landed["bid.insert"] + 1
    assert behind["landed_events"] == landed
    assert behind["not_yet_landed"] == 1

    feeds = [layout.global_feed_key(), layout.category_feed_key("Toys")]
    for key in feeds:
        s3.put_object(Bucket=settings.bucket, Key=key, Body=b"{}")
        time.sleep(1.1)  # S3 keeps LastModified to the second
    manifest: dict[str, Any] = {"run_id": "20261201T120000Z", "counts": {"users": 3}}
    s3.put_object(
        Bucket=settings.bucket,
        Key=layout.manifest_key(manifest["run_id"]),
        Body=json.dumps(manifest).encode(),
    )
    s3.put_object(
        Bucket=settings.bucket,
        Key=layout.RECOMMENDATIONS_POINTER,
        Body=json.dumps({"run_id": manifest["run_id"]}).encode(),
    )
    published = operate.status(settings)

    assert published["newest_feed"]["key"] == feeds[-1]
    assert 0 <= published["newest_feed"]["age_s"] < 60
    assert published["last_night"] == manifest

    # A hand-made file with a broken record: named, and the events around it still count.
    broken = layout.landing_key(datetime.now(UTC), "hand-made")
    s3.put_object(Bucket=settings.bucket, Key=broken, Body=b"1,only,three fields\n")
    with_broken = operate.status(settings)

    assert with_broken["landed_events"] == landed
    assert with_broken["landed_unreadable"] == [f"{broken}: record 1 has 3 fields, expected 22"]


def test_land_command_shows_the_records_it_moved(
    replayed: tuple[Settings, pipeline.FlowCounts, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, _, _ = replayed
    use_stack(monkeypatch, settings)
    with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
        cursor.execute(
            "UPDATE listings SET price = price + 1 WHERE id = (SELECT min(id) FROM listings)"
        )
    conn.close()
    pipeline.capture_once(settings)

    code = main.main(["land"])

    printed = capsys.readouterr()
    assert code == main.EXIT_OK
    assert json.loads(printed.out)["landed"] == 1
    assert printed.err.startswith("land       1 records (")
    assert operate.status(settings)["not_yet_landed"] == 0


def test_status_command_prints_the_report_as_json(
    replayed: tuple[Settings, pipeline.FlowCounts, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, flow, _ = replayed
    use_stack(monkeypatch, settings)

    code = main.main(["status"])

    printed = json.loads(capsys.readouterr().out)
    assert code == main.EXIT_OK
    assert printed["landed_events"]["bid.insert"] == flow.bids_inserted
    assert set(printed) >= {
        "slot",
        "captured_events",
        "landed_events",
        "not_yet_landed",
        "newest_feed",
        "last_night",
    }


def test_unread_landed_files_follow_the_checkpoint_through_compaction_and_a_cut_batch(
    fresh_bucket: Settings,
) -> None:
    settings = fresh_bucket
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    arrival = datetime(2026, 12, 1, 12, tzinfo=UTC)
    landed = [layout.landing_key(arrival, f"encore landing-{number}") for number in range(5)]
    for key in landed:
        s3.put_object(Bucket=settings.bucket, Key=key, Body=b"")

    def entries(batch: int, keys: list[str]) -> str:
        """The file source's log lines for ``keys``, their paths URL-encoded as Spark writes."""
        paths = [f"s3a://{settings.bucket}/{key.replace(' ', '%20')}" for key in keys]
        return "".join(
            json.dumps({"path": path, "timestamp": 0, "batchId": batch}) + "\n" for path in paths
        )

    checkpoint = layout.POPULARITY_CHECKPOINT_PREFIX
    written = {
        # Batches 0 to 9 folded into one file; only the last commit is kept.
        "sources/0/9.compact": "v1\n" + entries(0, landed[:1]) + entries(9, landed[1:2]),
        "commits/9": "v1\n{}\n",
        "commits/.9.crc": "",
        # Batch 10 was planned, then cut short before its commit.
        "sources/0/10": "v1\n" + entries(10, landed[2:3]),
    }
    for name, body in written.items():
        s3.put_object(Bucket=settings.bucket, Key=checkpoint + name, Body=body.encode())

    assert pipeline.unread_landed_files(settings) == 3


def test_url_refuses_a_document_not_published_yet_then_says_when_expiry_was_shortened(
    fresh_bucket: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = fresh_bucket
    use_stack(monkeypatch, settings)

    code = main.main(["url", "u-1"])

    error = capsys.readouterr().err
    assert code == main.EXIT_ERROR
    assert error.count("\n") == 1
    assert f"s3://{settings.bucket}/{layout.global_feed_key()}" in error
    assert "encore batch" in error

    boto3.client("s3", **settings.boto3_kwargs()).put_object(
        Bucket=settings.bucket, Key=layout.global_feed_key(), Body=b"{}"
    )
    code = main.main(["url", "u-1", "--expires-in", str(8 * 24 * 3600)])

    printed = capsys.readouterr()
    assert code == main.EXIT_OK
    assert json.loads(printed.out)["expires_in"] == 7 * 24 * 3600
    assert "expiry shortened to 604800 s" in printed.err


@pytest.fixture
def loading_stack(
    fresh_database: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The command line's stack for ``encore load``, its state folder under ``tmp_path``."""
    use_stack(monkeypatch, fresh_database)
    monkeypatch.setenv("ENCORE_STATE_DIR", str(tmp_path))
    return fresh_database


def test_load_command_replays_an_export_into_the_running_stack(
    loading_stack: Settings,
    export_slice: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = loading_stack

    code = main.main(["load", str(export_slice)])

    loaded = json.loads(capsys.readouterr().out)
    assert code == main.EXIT_OK
    assert loaded["bids_inserted"] > 0
    assert loaded["rejects_file"] == str(tmp_path / "rejects" / "slice.rejects.csv")
    assert operate.status(settings)["not_yet_landed"] == 0
    # The marketplace's own inserts let Postgres pick the id: it must not collide with a
    # replayed bid.
    with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT listing_id, bidder_id FROM bids LIMIT 1")
        listing_id, bidder_id = cursor.fetchone()
        cursor.execute(
            "INSERT INTO bids (listing_id, bidder_id, amount) VALUES (%s, %s, 1) RETURNING id",
            (listing_id, bidder_id),
        )
        (new_id,) = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM bids")
        (bids,) = cursor.fetchone()
    conn.close()
    assert bids == loaded["bids_inserted"] + 1
    assert new_id > 0


def test_loading_again_loads_only_the_new_rows_and_names_those_skipped(
    loading_stack: Settings,
    export_head: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = loading_stack

    def bids_in_database() -> tuple[int, Decimal, int]:
        with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*), sum(amount), (SELECT count(*) FROM listings) FROM bids"
            )
            found = cursor.fetchone()
        conn.close()
        return found

    export = export_head(SLICE_ROWS)
    assert main.main(["load", str(export)]) == main.EXIT_OK
    capsys.readouterr()
    first = bids_in_database()

    code = main.main(["load", str(export)])

    printed = capsys.readouterr()
    again = json.loads(printed.out)
    assert code == main.EXIT_OK
    assert (again["rows_already_loaded"], again["bids_inserted"]) == (SLICE_ROWS, 0)
    assert f"encore load: {SLICE_ROWS} rows of {export} were already loaded" in printed.err
    assert bids_in_database() == first

    # A longer export: its first rows are loaded, the rest are new.
    longer = export_head(SLICE_ROWS + 10)
    code = main.main(["load", str(longer)])

    printed = capsys.readouterr()
    expected = loader.read_export(longer)
    assert code == main.EXIT_OK
    counts = json.loads(printed.out)
    assert (counts["rows_already_loaded"], counts["rows_loaded"]) == (SLICE_ROWS, 10)
    assert counts["rows_read"] == counts["rows_rejected"] + counts["rows_merged"] + SLICE_ROWS + 10
    assert bids_in_database() == (
        expected.bid_count,
        sum(row.bid_total for row in expected.interactions),
        len(loader.plan_listings(expected.interactions)),
    )
    assert operate.status(settings)["landed_events"]["bid.insert"] == expected.bid_count

    # One bid the marketplace placed itself: that row no longer matches the database.
    with psycopg2.connect(settings.require_dsn()) as conn, conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO bids (listing_id, bidder_id, amount)"
            " SELECT listing_id, bidder_id, 1 FROM bids ORDER BY id LIMIT 1"
        )
    conn.close()
    code = main.main(["load", str(longer)])

    printed = capsys.readouterr()
    assert code == main.EXIT_CHECK_FAILED
    assert json.loads(printed.out)["bids_inserted"] == 0
    assert "check failed: 1 of the skipped rows disagree with the bids in the database" in (
        printed.err
    )
