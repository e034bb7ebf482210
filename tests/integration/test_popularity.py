"""The popularity job end to end: landed CSV on moto's S3, local Spark over s3a, JSON feeds.

One marketplace is played through in three landed files. ``restarted_runs`` lands
the first two, runs the job, lands the third and runs it again from the checkpoint,
then runs it once more with nothing new; other tests compare against those runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest_popularity import Bucket, Changes, encoded, new_bucket

from cli import pipeline
from cli.progress import Progress
from encore import events, layout
from encore.settings import Settings
from spark_streaming import feeds, popularity

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 4, 17, 0, tzinfo=UTC)
TITLE = 'Signed "Pop", 12\\" vinyl,\nfirst press — é'


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


@dataclass(frozen=True)
class LandedFile:
    arrival: datetime
    name: str
    lines: list[bytes]


def marketplace() -> list[LandedFile]:
    """Three landed files of one marketplace, in arrival order."""
    c = Changes()
    first = [
        c.listing("1001", ago(days=3), title=TITLE, category="Music & Vinyl", sub_category="LP"),
        c.listing(
            "1002", ago(days=20), title="Cartier watch", category="Watches", sub_category="Wrist"
        ),
        c.listing("1003", ago(days=1), title="Xbox", category="Games", sub_category="Consoles"),
        c.listing(
            "9000000000", ago(days=2), title="Lamp", category="Home", sub_category="Lighting"
        ),
        c.bid("1", "1001", "u1", "10.00", ago(seconds=600)),
        c.bid("2", "1001", "u2", "12.50", ago(seconds=1800)),
        c.bid("3", "1001", None, "15.00", ago(seconds=5400)),
        c.bid("4", "1002", "u1", "100.00", ago(days=3)),
        c.bid("5", "1002", "u3", "250.25", ago(days=14)),
    ]
    # LSN 0/11 sells listing 1003, inserted at 0/A: string order would call it still live.
    sold = c.listing(
        "1003",
        ago(seconds=120),
        title="Xbox",
        category="Games",
        sub_category="Consoles",
        status="sold",
        op="update",
    )
    bad_amount = events.encode(c.bid("91", "1001", "u9", "12.50", ago(seconds=5)))
    bad_time = events.encode(c.bid("92", "1001", "u9", "13.00", ago(seconds=5)))
    second = [
        *encoded(
            [
                first[4],  # bid 1 delivered twice
                sold,
                c.bid("6", "1003", "u2", "30.00", ago(seconds=300)),
                c.bid("7", "9000000000", "u4", "5.00", ago(seconds=60)),
                c.bid("8", "9000000000", "u4", "6.00", ago(seconds=30)),
                c.bid("8", "9000000000", None, "", ago(seconds=20), op="delete"),
            ]
        ),
        b"1,only,three fields\n",
        bad_amount.replace(b",12.50,", b",12.5.0,"),
        bad_time.replace(b",13.00," + iso_bytes(ago(seconds=5)), b",13.00,2026-02-30T00:00:00Z"),
    ]
    third = [
        first[4],  # bid 1 a third time, in a later batch
        c.listing(
            "1002",
            ago(seconds=50),
            title="Cartier Tank watch",
            category="Watches",
            sub_category="Wrist",
            op="update",
        ),
        c.bid("9", "1002", "u5", "300.00", ago(seconds=10)),
        c.bid("10", "1001", "u3", "20.00", ago(days=2)),  # late: arrives after newer bids
    ]
    return [
        LandedFile(ago(hours=2), "encore-landing-1", encoded(first)),
        LandedFile(ago(hours=1), "encore-landing-2", second),
        LandedFile(NOW, "encore-landing-3", encoded(third)),
    ]


def iso_bytes(moment: datetime) -> bytes:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()


def item(
    rank: int,
    listing_id: str,
    title: str,
    category: str,
    sub_category: str,
    windows: tuple[int, int, int],
    bidders_7d: int,
    amount_7d: str,
    ages_s: list[float],
) -> dict[str, Any]:
    return {
        "rank": rank,
        "listing_id": listing_id,
        "title": title,
        "category": category,
        "sub_category": sub_category,
        "bids_1h": windows[0],
        "bids_24h": windows[1],
        "bids_7d": windows[2],
        "bidders_7d": bidders_7d,
        "amount_7d": amount_7d,
        "trending_score": pytest.approx(
            sum(feeds.decay_weight(age, 3600.0) for age in ages_s), rel=1e-12, abs=1e-27
        ),
    }


DAY = 24 * 3600.0
VINYL_AFTER_FIRST = item(
    1, "1001", TITLE, "Music & Vinyl", "LP", (2, 3, 3), 3, "37.50", [600, 1800, 5400]
)
LAMP = item(2, "9000000000", "Lamp", "Home", "Lighting", (1, 1, 1), 1, "5.00", [60])
WATCH_AFTER_FIRST = item(
    3, "1002", "Cartier watch", "Watches", "Wrist", (0, 0, 1), 1, "100.00", [3 * DAY, 14 * DAY]
)
VINYL_AFTER_ALL = item(
    1, "1001", TITLE, "Music & Vinyl", "LP", (2, 3, 4), 4, "57.50", [600, 1800, 5400, 2 * DAY]
)
WATCH_AFTER_ALL = item(
    2,
    "1002",
    "Cartier Tank watch",
    "Watches",
    "Wrist",
    (1, 1, 2),
    2,
    "400.00",
    [10, 3 * DAY, 14 * DAY],
)
LAMP_AFTER_ALL = {**LAMP, "rank": 3}

CATEGORY_KEYS = [
    layout.category_feed_key(name) for name in ("Games", "Home", "Music & Vinyl", "Watches")
]


@dataclass
class Run:
    summary: dict[str, Any]
    feeds: dict[str, Any]
    warnings: list[str]


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run(spark: Any, bucket: Bucket) -> Run:
    """One call of the job, with the feeds it left and the warnings it logged."""
    handler = _Warnings()
    logging.getLogger(popularity.__name__).addHandler(handler)
    try:
        summary = popularity.run_popularity(spark, bucket.base_uri, bucket.settings, now=NOW)
    finally:
        logging.getLogger(popularity.__name__).removeHandler(handler)
    published = {key: bucket.json(key) for key in bucket.keys(layout.FEEDS_PREFIX)}
    return Run(summary, published, handler.messages)


@pytest.fixture(scope="module")
def restarted_runs(spark: Any, base_settings: Settings) -> tuple[Bucket, list[Run]]:
    bucket = new_bucket(base_settings)
    first, second, third = marketplace()
    bucket.land(first.arrival, first.name, first.lines)
    bucket.land(second.arrival, second.name, second.lines)
    runs = [run(spark, bucket)]
    bucket.land(third.arrival, third.name, third.lines)
    runs.append(run(spark, bucket))
    runs.append(run(spark, bucket))
    return bucket, runs


def without_computed_at(document: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != "computed_at"}


#: Summary keys that count what one call did; the others describe all stored events.
RUN_COUNTERS = ("batches", "events_read", "quarantined", "feeds_written")


def state_figures(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if key not in RUN_COUNTERS}


def test_first_run_counts_every_row_once(restarted_runs: tuple[Bucket, list[Run]]) -> None:
    summary = restarted_runs[1][0].summary

    assert {key: value for key, value in summary.items() if key != "top"} == {
        "batches": 1,
        "events_read": 15,
        "quarantined": 3,
        "feeds_written": 5,
        "distinct_events": 14,
        "bid_events": 9,
        "duplicates_removed": 1,
        "late_events": 0,
        "unapplied_events": 0,
        "state_events": 14,
        "folded_listings": 0,
        "total_bids": 7,
        "total_amount": "422.75",
        "listings": 4,
        "reference_time": "2026-12-04T17:00:00.000000Z",
        "complete_up_to": "2026-12-04T16:59:40.000000Z",
    }


def test_first_run_global_feed_ranks_live_listings(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    first = restarted_runs[1][0]
    feed = first.feeds[layout.global_feed_key()]

    assert feed["items"] == [VINYL_AFTER_FIRST, LAMP, WATCH_AFTER_FIRST]
    assert first.summary["top"] == feed["items"]
    assert without_computed_at(feed) | {"items": []} == {
        "schema_version": 1,
        "feed": "global",
        "category": None,
        "complete_up_to": "2026-12-04T16:59:40.000000Z",
        "totals": {"bids": 7, "amount": "422.75", "listings": 4},
        "items": [],
    }
    assert feed["computed_at"].endswith("Z")


def test_sold_listing_leaves_feeds_but_stays_in_totals(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    published = restarted_runs[1][0].feeds

    assert sorted(published) == sorted([layout.global_feed_key(), *CATEGORY_KEYS])
    games = published[layout.category_feed_key("Games")]
    assert games["items"] == []
    assert games["totals"] == {"bids": 1, "amount": "30.00", "listings": 1}
    assert published[layout.category_feed_key("Music & Vinyl")]["items"] == [VINYL_AFTER_FIRST]
    assert published[layout.category_feed_key("Home")]["items"] == [{**LAMP, "rank": 1}]


def test_malformed_rows_are_quarantined_with_source_and_reason(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    bucket = restarted_runs[0]
    rows = bucket.quarantined()
    source = f"{bucket.base_uri}/{layout.landing_key(ago(hours=1), 'encore-landing-2')}"

    assert sorted(row["reason"] for row in rows) == [
        "amount is not a decimal(18,2)",
        "malformed csv record: expected 22 fields",
        "placed_at is not an ISO-8601 UTC time",
    ]
    assert {row["source_file"] for row in rows} == {source}
    assert any(row["record"] == "1,only,three fields" for row in rows)
    assert all(
        key.startswith(f"{layout.POPULARITY_QUARANTINE_PREFIX}batch_id=0/")
        for key in bucket.keys(layout.POPULARITY_QUARANTINE_PREFIX)
    )


def test_restart_continues_without_double_counting(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    second = restarted_runs[1][1]

    assert {key: value for key, value in second.summary.items() if key != "top"} == {
        "batches": 1,
        "events_read": 4,
        "quarantined": 0,
        "feeds_written": 5,
        "distinct_events": 17,
        "bid_events": 11,
        "duplicates_removed": 2,
        "late_events": 1,
        "unapplied_events": 0,
        "state_events": 17,
        "folded_listings": 0,
        "total_bids": 9,
        "total_amount": "742.75",
        "listings": 4,
        "reference_time": "2026-12-04T17:00:00.000000Z",
        "complete_up_to": "2026-12-04T16:59:50.000000Z",
    }
    assert second.feeds[layout.global_feed_key()]["items"] == [
        VINYL_AFTER_ALL,
        WATCH_AFTER_ALL,
        LAMP_AFTER_ALL,
    ]


def test_late_event_is_counted_and_logged_as_a_warning(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    first, second, _ = restarted_runs[1]

    assert second.summary["late_events"] == 1
    assert any("1 late bid events" in message for message in second.warnings)
    assert not any("late" in message for message in first.warnings)


def test_rerun_without_new_data_changes_nothing(
    restarted_runs: tuple[Bucket, list[Run]],
) -> None:
    _, (_, second, third) = restarted_runs

    assert [third.summary[key] for key in RUN_COUNTERS] == [0, 0, 0, 0]
    assert state_figures(third.summary) == state_figures(second.summary)
    assert third.feeds == second.feeds  # not even rewritten: computed_at is unchanged


def test_crash_in_a_batch_then_rerun_equals_the_restarted_runs(
    spark: Any,
    base_settings: Settings,
    restarted_runs: tuple[Bucket, list[Run]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket = new_bucket(base_settings)
    for landed in marketplace():
        bucket.land(landed.arrival, landed.name, landed.lines)

    def crash(*_: Any, **__: Any) -> None:
        raise RuntimeError("injected crash after the batch stored its events")

    monkeypatch.setattr(feeds, "compute_snapshot", crash)
    with pytest.raises(popularity.PopularityError, match="rerun to retry"):
        popularity.run_popularity(spark, bucket.base_uri, bucket.settings, now=NOW)
    assert bucket.keys(layout.FEEDS_PREFIX) == []
    assert pipeline.unread_landed_files(bucket.settings) == 3  # the batch never committed
    monkeypatch.undo()

    rerun = run(spark, bucket)

    expected = restarted_runs[1][1]
    assert rerun.summary["batches"] == 1  # batch 0 again, same files, same id
    assert rerun.summary["duplicates_removed"] == 2
    assert rerun.summary["total_bids"] == 9
    # All three files came in one batch, so nothing arrived after a newer bid.
    assert rerun.summary["late_events"] == 0
    assert {k: without_computed_at(v) for k, v in rerun.feeds.items()} == {
        k: without_computed_at(v) for k, v in expected.feeds.items()
    }


def test_catch_up_shows_the_landed_files_it_reads(spark: Any, base_settings: Settings) -> None:
    bucket = new_bucket(base_settings)
    first, second, third = marketplace()
    bars = io.StringIO()
    progress = partial(Progress, stream=bars)

    bucket.land(first.arrival, first.name, first.lines)
    bucket.land(second.arrival, second.name, second.lines)
    unread = [pipeline.unread_landed_files(bucket.settings)]
    pipeline.popularity_catch_up(spark, bucket.settings, progress, now=NOW)
    bucket.land(third.arrival, third.name, third.lines)
    unread.append(pipeline.unread_landed_files(bucket.settings))
    pipeline.popularity_catch_up(spark, bucket.settings, progress, now=NOW)
    unread.append(pipeline.unread_landed_files(bucket.settings))

    assert unread == [2, 1, 0]
    first_run, second_run = bars.getvalue().splitlines()
    assert first_run.startswith("stream ") and " 100% 2/2 files" in first_run
    assert " 100% 1/1 files" in second_run


def test_command_line_with_nothing_landed_yet_reports_zeros(
    spark: Any, base_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = new_bucket(base_settings)

    code = popularity.main(["--bucket", bucket.name, "--scheme", "s3a"])

    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["batches"] == summary["total_bids"] == summary["feeds_written"] == 0
    assert summary["total_amount"] == "0.00"
    assert bucket.keys("") == []


AUCTION_START = datetime(2026, 11, 2, tzinfo=UTC)


@dataclass(frozen=True)
class AuctionBid:
    bid_id: str
    auction_id: str
    bidder: str | None
    amount: str
    placed_at: datetime


def auction_replay(
    path: Path, *, close_within_days: int = 0
) -> tuple[list[dict[str, str | None]], list[AuctionBid], dict]:
    """The eBay auctions as contract events in event-time order, and the plain rows.

    Every auction is listed at ``AUCTION_START``; a bid is placed ``bidtime`` days later.
    An auction of at most ``close_within_days`` days ends (a listing update) when its
    time is up. Commit LSNs start just below 1/0, so the replay crosses into the high half.
    """
    with path.open(newline="") as source:
        rows = list(csv.DictReader(source))
    auctions: dict[str, dict[str, str]] = {}
    bids = []
    for number, row in enumerate(rows, start=1):
        auctions.setdefault(row["auctionid"], row)
        bids.append(
            AuctionBid(
                bid_id=str(number),
                auction_id=row["auctionid"],
                bidder=row["bidder"] or None,
                amount=row["bid"],
                placed_at=AUCTION_START + timedelta(days=float(row["bidtime"])),
            )
        )

    changes = Changes(next_lsn=0xFFFFFF00)
    replay = [
        changes.listing(
            auction_id,
            AUCTION_START,
            title=f"{row['item']} ({auction_id})",
            category=row["item"],
            sub_category=row["auction_type"],
        )
        for auction_id, row in auctions.items()
    ]
    timeline: list[tuple[datetime, int, AuctionBid | str]] = [
        (bid.placed_at, int(bid.bid_id), bid) for bid in bids
    ]
    for auction_id, row in auctions.items():
        days = auction_days(row)
        if days <= close_within_days:
            timeline.append((AUCTION_START + timedelta(days=days), 0, auction_id))
    for at, _, change in sorted(timeline, key=lambda entry: entry[:2]):
        if isinstance(change, AuctionBid):
            replay.append(
                changes.bid(change.bid_id, change.auction_id, change.bidder, change.amount, at)
            )
        else:
            row = auctions[change]
            replay.append(
                changes.listing(
                    change,
                    at,
                    title=f"{row['item']} ({change})",
                    category=row["item"],
                    sub_category=row["auction_type"],
                    status="ended",
                    op="update",
                )
            )
    return replay, bids, auctions


def auction_days(row: dict[str, str]) -> int:
    """How long an eBay auction ran: ``7 day auction`` is 7."""
    return int(row["auction_type"].split()[0])


def reference_top(
    bids: list[AuctionBid],
    auctions: dict[str, dict[str, str]],
    settings: Settings,
    *,
    reference: datetime | None = None,
) -> list[dict[str, Any]]:
    """The global feed, computed in plain Python from the same rows, as of ``reference``
    (by default the newest bid)."""
    reference = reference or max(bid.placed_at for bid in bids)
    by_listing: dict[str, list[AuctionBid]] = defaultdict(list)
    for bid in bids:
        by_listing[bid.auction_id].append(bid)

    scored = []
    for auction_id, listing_bids in by_listing.items():
        ages = [(reference - bid.placed_at).total_seconds() for bid in listing_bids]
        week = [bid for bid, age in zip(listing_bids, ages, strict=True) if age < 7 * DAY]
        row = auctions[auction_id]
        windows = (
            sum(age < 3600 for age in ages),
            sum(age < DAY for age in ages),
            sum(age < 7 * DAY for age in ages),
        )
        entry = item(
            0,
            auction_id,
            f"{row['item']} ({auction_id})",
            row["item"],
            row["auction_type"],
            windows,
            len({bid.bidder or "" for bid in week}),
            f"{sum((Decimal(bid.amount) for bid in week), Decimal('0.00')):f}",
            ages,
        )
        score = sum(feeds.decay_weight(age, settings.trending_half_life_s) for age in ages)
        scored.append((-score, auction_id, entry))
    scored.sort(key=lambda entry: entry[:2])
    return [
        {**entry, "rank": rank}
        for rank, (_, _, entry) in enumerate(scored[: settings.feed_top_n], start=1)
    ]


def test_auction_replay_equals_a_plain_count_as_auctions_close_and_fold(
    spark: Any, base_settings: Settings, shared_data: Path
) -> None:
    """The eBay log in event-time order, landed in four files two days apart with the job
    run after each; the 3- and 5-day auctions end on time and fold out of the state."""
    bucket = new_bucket(base_settings)
    replay, bids, auctions = auction_replay(
        shared_data / "ebay_auctions" / "auction.csv", close_within_days=5
    )
    lines = encoded(replay)
    parts = 4
    size = -(-len(lines) // parts)
    for part in range(parts):
        arrival = AUCTION_START + timedelta(days=2 * part)
        bucket.land(arrival, f"encore-landing-{part}", lines[part * size : (part + 1) * size])
        summary = popularity.run_popularity(spark, bucket.base_uri, bucket.settings)

    closed = {auction_id for auction_id, row in auctions.items() if auction_days(row) <= 5}
    amount = sum((Decimal(bid.amount) for bid in bids), Decimal("0.00"))
    assert len(bids) == 4764
    assert max(int(auction_id) for auction_id in auctions) > 2**31
    assert summary["distinct_events"] == 4764 + len(auctions) + len(closed)
    assert summary["bid_events"] == summary["total_bids"] == 4764
    assert summary["total_amount"] == f"{amount:f}"
    assert summary["listings"] == len(auctions) == 285
    assert summary["quarantined"] == summary["duplicates_removed"] == summary["late_events"] == 0
    assert summary["folded_listings"] == len(closed) > 0
    assert summary["unapplied_events"] == 0
    # What stays in the state: the open auctions' listing events and bids.
    open_bids = [bid for bid in bids if bid.auction_id not in closed]
    assert summary["state_events"] == len(auctions) - len(closed) + len(open_bids)

    feed = bucket.json(layout.global_feed_key())
    assert feed["totals"] == {"bids": 4764, "amount": f"{amount:f}", "listings": 285}
    assert feed["items"] == reference_top(
        open_bids, auctions, bucket.settings, reference=max(bid.placed_at for bid in bids)
    )

    per_item: dict[str, list[AuctionBid]] = defaultdict(list)
    for bid in bids:
        per_item[auctions[bid.auction_id]["item"]].append(bid)
    for name, item_bids in per_item.items():
        category = bucket.json(layout.category_feed_key(name))
        assert category["totals"] == {
            "bids": len(item_bids),
            "amount": f"{sum((Decimal(bid.amount) for bid in item_bids), Decimal('0.00')):f}",
            "listings": len({bid.auction_id for bid in item_bids}),
        }


def test_continuous_mode_publishes_each_batch_until_stopped(
    spark: Any, base_settings: Settings
) -> None:
    bucket = new_bucket(base_settings.replace(stream_trigger_s=0.5))
    first = marketplace()[0]
    bucket.land(first.arrival, first.name, first.lines)
    outcome: dict[str, Any] = {}

    def run_until_stopped() -> None:
        outcome.update(
            popularity.run_popularity(
                spark, bucket.base_uri, bucket.settings, available_now=False, now=NOW
            )
        )

    runner = threading.Thread(target=run_until_stopped)
    runner.start()
    try:
        query = wait_for_batch(spark, "popularity", batch_id=0)
        assert bucket.json(layout.global_feed_key())["totals"]["bids"] == 5
    finally:
        for active in spark.streams.active:
            if active.name == "popularity":
                active.stop()
        runner.join(timeout=60)

    assert not runner.is_alive()
    assert query.isActive is False
    assert outcome["batches"] == 1
    assert outcome["total_bids"] == 5


def wait_for_batch(spark: Any, name: str, batch_id: int, timeout_s: float = 60) -> Any:
    """The active query ``name`` once it has finished batch ``batch_id``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for query in spark.streams.active:
            if query.name == name and any(
                progress["batchId"] >= batch_id for progress in query.recentProgress
            ):
                return query
        time.sleep(0.2)
    raise AssertionError(f"query {name} did not finish batch {batch_id} within {timeout_s} s")


def closing_marketplace() -> list[LandedFile]:
    """Four landed files in which auctions close, so that the state folds them away.

    * File 1: a Game Boy is bid on and sold (one bid deleted by its key alone); a
      poster gets a bid; a bid on listing 2003, never listed, is nine days old.
    * File 2: the Game Boy's first bid again, long after it sold; a second poster bid.
    * File 3: the poster's auction ends; a robot is listed and bid on.
    * File 4: the Game Boy's listing event again.
    """
    c = Changes()
    game_boy = c.listing("2001", ago(days=2), title="Game Boy", category="Games", sub_category="H")
    first_bid = c.bid("21", "2001", "u1", "10.00", ago(hours=5))
    retracted = c.bid("22", "2001", "u2", "12.00", ago(hours=4, minutes=30))
    by_key_only = {**c.bid("22", "2001", None, "", ago(hours=4), op="delete"), "listing_id": None}
    poster = c.listing("2002", ago(days=1), title="Poster", category="Home", sub_category="Wall")
    first = [
        game_boy,
        first_bid,
        retracted,
        by_key_only,
        closing(c, game_boy, ago(hours=3, minutes=30), "sold"),
        poster,
        c.bid("23", "2002", "u1", "7.00", ago(hours=3)),
        c.bid("24", "2003", "u9", "5.00", ago(days=9)),
    ]
    second = [first_bid, c.bid("25", "2002", "u3", "9.00", ago(hours=1))]
    third = [
        closing(c, poster, ago(minutes=50), "ended"),
        c.listing("2004", ago(minutes=5), title="Robot", category="Toys", sub_category="Tin"),
        c.bid("26", "2004", "u1", "3.00", ago(seconds=10)),
    ]
    return [
        LandedFile(ago(hours=3), "encore-landing-1", encoded(first)),
        LandedFile(ago(hours=2), "encore-landing-2", encoded(second)),
        LandedFile(ago(hours=1), "encore-landing-3", encoded(third)),
        LandedFile(NOW, "encore-landing-4", encoded([game_boy])),
    ]


def closing(
    c: Changes, listing: dict[str, str | None], at: datetime, status: str
) -> dict[str, str | None]:
    """An update that closes ``listing`` with ``status``, its other fields unchanged."""
    return c.listing(
        str(listing["listing_id"]),
        at,
        title=listing["title"],
        category=listing["category"],
        sub_category=listing["sub_category"],
        status=status,
        op="update",
    )


def test_closed_listings_fold_out_of_the_state_and_the_figures_stay_exact(
    spark: Any, base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Copy the folded ids into one folder as soon as a second one is in effect.
    monkeypatch.setattr(popularity.state, "MAX_FOLDED_PARTS", 1)
    bucket = new_bucket(base_settings)
    runs = []
    for landed in closing_marketplace():
        bucket.land(landed.arrival, landed.name, landed.lines)
        runs.append(run(spark, bucket))
    figures = ("state_events", "folded_listings", "unapplied_events", "total_bids", "listings")

    assert [[one.summary[key] for key in figures] for one in runs] == [
        [2, 2, 0, 3, 3],  # the Game Boy (sold) and listing 2003 (quiet for a week) fold
        [3, 2, 1, 4, 3],  # the Game Boy's bid came too late to apply
        [2, 3, 1, 5, 4],  # the ended poster folds
        [2, 3, 2, 5, 4],  # so does the Game Boy's listing event, again
    ]
    last = runs[-1]
    assert last.summary["total_amount"] == "34.00"
    assert last.summary["distinct_events"] == 12
    assert last.summary["duplicates_removed"] == 0
    assert [item["listing_id"] for item in last.summary["top"]] == ["2004"]
    home = last.feeds[layout.category_feed_key("Home")]
    assert home["items"] == []
    assert home["totals"] == {"bids": 2, "amount": "16.00", "listings": 1}
    assert last.feeds[layout.category_feed_key("Games")]["totals"] == {
        "bids": 1,
        "amount": "10.00",
        "listings": 1,
    }

    too_late = [row for row in bucket.quarantined() if "folded" in row["reason"]]
    assert sorted((row["source_file"].rsplit("/", 1)[-1], row["reason"]) for row in too_late) == [
        (name, "listing 2001 closed and was folded into the totals before this event arrived")
        for name in ("encore-landing-2", "encore-landing-4")
    ]
    assert any("not applied" in message for message in runs[1].warnings)
    # Each quarantined as it was read: every field the string that landed.
    bid, listing = (
        json.loads(row["record"]) for row in sorted(too_late, key=lambda row: row["source_file"])
    )
    assert (bid["bid_id"], bid["amount"], bid["placed_at"]) == (
        "21",
        "10.00",
        "2026-12-04T12:00:00.000000Z",
    )
    assert (listing["listing_id"], listing["title"], listing["status"]) == (
        "2001",
        "Game Boy",
        "live",
    )

    # Only the last two versions remain, and the folded ids were copied into batch 2's.
    state_keys = bucket.keys(layout.POPULARITY_STATE_PREFIX)
    assert {key.split("/")[3] for key in state_keys if "/events/" in key} == {
        "batch_id=2",
        "batch_id=3",
    }
    assert {key.split("/")[3] for key in state_keys if "/folded/" in key} == {"batch_id=2"}

    # The same files in one batch: nothing is too late, and every feed is the same.
    together = new_bucket(base_settings)
    for landed in closing_marketplace():
        together.land(landed.arrival, landed.name, landed.lines)
    at_once = run(spark, together)
    assert at_once.summary["duplicates_removed"] == 2
    assert at_once.summary["unapplied_events"] == 0
    assert {k: without_computed_at(v) for k, v in at_once.feeds.items()} == {
        k: without_computed_at(v) for k, v in last.feeds.items()
    }
