"""The popularity job's rules that need no Spark: decay, feed documents."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pyspark.sql.types import DecimalType, StringType, TimestampType

from encore import events
from spark_streaming import feeds, landing


@pytest.mark.parametrize(
    ("age_s", "weight"),
    [(0.0, 1.0), (3600.0, 0.5), (7200.0, 0.25), (1800.0, 0.5**0.5), (-60.0, 1.0)],
)
def test_decay_weight_halves_every_half_life(age_s: float, weight: float) -> None:
    assert feeds.decay_weight(age_s, 3600.0) == pytest.approx(weight, rel=1e-15)


def test_time_conversions_round_trip_in_utc() -> None:
    moment = datetime(2026, 12, 4, 15, 52, 59, 123456, tzinfo=UTC)
    shifted = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))

    assert feeds.to_micros(shifted) == feeds.to_micros(moment) == 1_796_399_579_123_456
    assert feeds.to_micros(moment.replace(tzinfo=None)) == feeds.to_micros(moment)
    assert feeds.iso_time(feeds.to_micros(moment)) == "2026-12-04T15:52:59.123456Z"
    assert feeds.iso_time(None) is None


def test_totals_add_up_and_keep_amounts_as_decimal_strings() -> None:
    total = feeds.Totals(2, Decimal("10.50"), 1) + feeds.Totals(3, Decimal("0.25"), 2)

    assert total == feeds.Totals(5, Decimal("10.75"), 3)
    assert total.as_json() == {"bids": 5, "amount": "10.75", "listings": 3}
    assert feeds.Totals().as_json() == {"bids": 0, "amount": "0.00", "listings": 0}


def test_feed_document_has_the_published_shape() -> None:
    row = {
        "listing_id": "8215610555",
        "title": 'Signed "Pop", 12" vinyl',
        "category": "Music",
        "sub_category": None,
        "bids_1h": 1,
        "bids_24h": 2,
        "bids_7d": 3,
        "bidders_7d": 2,
        "amount_7d": Decimal("1234567890123456.75"),
        "trending_score": Decimal("1.5000000000000000000000000001"),
    }
    feed = feeds.Feed("Music", feeds.Totals(3, Decimal("30.00"), 1), [feeds.feed_item(1, row)])

    document = feeds.feed_document(
        feed,
        computed_at=datetime(2026, 12, 4, 16, 0, tzinfo=UTC),
        complete_up_to_us=feeds.to_micros(datetime(2026, 12, 4, 15, 59, tzinfo=UTC)),
    )

    assert document == {
        "schema_version": 1,
        "feed": "category",
        "category": "Music",
        "computed_at": "2026-12-04T16:00:00.000000Z",
        "complete_up_to": "2026-12-04T15:59:00.000000Z",
        "totals": {"bids": 3, "amount": "30.00", "listings": 1},
        "items": [
            {
                "rank": 1,
                "listing_id": "8215610555",
                "title": 'Signed "Pop", 12" vinyl',
                "category": "Music",
                "sub_category": None,
                "bids_1h": 1,
                "bids_24h": 2,
                "bids_7d": 3,
                "bidders_7d": 2,
                "amount_7d": "1234567890123456.75",
                "trending_score": 1.5,
            }
        ],
    }


def test_empty_global_feed_document() -> None:
    document = feeds.feed_document(
        feeds.Feed(None), computed_at=datetime(2026, 12, 4, tzinfo=UTC), complete_up_to_us=None
    )

    assert document["feed"] == "global"
    assert document["category"] is None
    assert document["complete_up_to"] is None
    assert document["items"] == []


def test_snapshot_counts_duplicates_as_stored_rows_beyond_distinct_events() -> None:
    assert feeds.Snapshot(stored_rows=7, distinct_events=5).duplicates_removed == 2


def test_progress_survives_its_json_with_exact_amounts_and_no_category() -> None:
    progress = feeds.Progress(
        batch_id=7,
        stored_rows=120,
        state_events=40,
        newest_bid_us=1_700_000_000_000_001,
        complete_up_to_us=1_700_000_000_000_002,
        newest_change_us=1_700_000_000_000_003,
        unapplied_events=2,
        fold_checked_at=35,
        event_parts=(5, 6, 7),
        folded=feeds.Folded(
            listings=3,
            events=70,
            bid_events=60,
            late_events=1,
            late_in_batch=1,
            parts=(2, 7),
            totals={
                "Watches": feeds.Totals(5, Decimal("1234567890123456.05"), 2),
                None: feeds.Totals(1, Decimal("0.10"), 1),
            },
        ),
    )

    assert feeds.Progress.from_json(json.loads(json.dumps(progress.as_json()))) == progress


def test_watermark_is_the_newest_bid_less_the_watermark() -> None:
    assert feeds.Progress(batch_id=0).watermark_us(600) is None
    assert feeds.Progress(batch_id=0, newest_bid_us=10_000_000).watermark_us(2.5) == 7_500_000


@pytest.mark.parametrize(
    ("column", "spark_type"),
    [
        ("event_id", StringType()),
        ("amount", DecimalType(18, 2)),
        ("price", DecimalType(18, 2)),
        ("placed_at", TimestampType()),
    ],
)
def test_contract_type_follows_the_event_contract(column: str, spark_type: object) -> None:
    assert landing.contract_type(column) == spark_type


def test_raw_schema_reads_the_contract_columns_in_order_then_the_corrupt_record() -> None:
    names = [field.name for field in landing.RAW_SCHEMA.fields]

    assert names == [*events.COLUMNS, landing.CORRUPT_COLUMN]
    assert {type(field.dataType) for field in landing.RAW_SCHEMA.fields} == {StringType}
