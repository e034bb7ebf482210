"""Fixtures for the nightly recommendation job: landed events made from the real export.

The marketplace export (one row per user, title, price with bid counts and
totals) is turned into contract events the way the capture would emit them,
without Postgres: one listing per (category, sub-category, title, price),
its bids spread over an auction window before ``ANCHOR``, then the closing
updates. On top of that, the cases the job must get right:

* every item is relisted once, live, sold by the item's keenest bidder (so
  the "never your own listing" rule has work to do);
* listing ids above 2**32 and two bidders whose ids are 64-bit numbers;
* a bidder with a single bid, and a bid event with no bidder;
* a bid inserted and then deleted, and a slice of the events landed twice;
* LSNs whose high half goes from ``9`` to ``10`` (hex): compared as text the
  closing updates would sort before the inserts they close;
* a listing still ``live`` whose ``ends_at`` has passed.

``test_recommend.py`` imports the fixtures from here; the services (moto,
Spark) come from ``tests/conftest.py``.
"""

from __future__ import annotations

import csv
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest

from encore import events, layout
from encore.settings import Settings
from infra.provision import provision

ANCHOR = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
RUN_NOW = ANCHOR + timedelta(minutes=5)
FIRST_LISTING_ID = 10_000_000_000
BIG_BIDDERS = ("18446744073709551615", "9223372036854775807")
SINGLE_BIDDER = "single-bid-user"
CENT = Decimal("0.01")
DUPLICATED = 300


@dataclass
class Marketplace:
    """The events landed for a test, and what the test needs to know about them."""

    lines: list[bytes] = field(default_factory=list)
    listings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sellers: dict[str, str] = field(default_factory=dict)
    won: dict[str, set[tuple[str, str, str]]] = field(default_factory=lambda: defaultdict(set))
    bid_inserts: int = 0
    stale_live_listing: str = ""
    high: int = 9
    low: int = 0
    clock: datetime = ANCHOR

    def lsn(self) -> str:
        self.low += 256
        return events.format_lsn((self.high << 32) | self.low)

    def add(self, change: dict[str, Any], at: datetime | None = None) -> dict[str, Any]:
        commit_lsn = self.lsn()
        table = "bids" if change["event_type"] == "bid" else "listings"
        key = str(change.get("bid_id") or change["listing_id"])
        event = {
            "event_id": events.event_id(commit_lsn, commit_lsn, table, key, change["op"]),
            "commit_lsn": commit_lsn,
            "commit_time": (at or self.clock).isoformat(),
            "table_key": key,
            **{name: None if value is None else str(value) for name, value in change.items()},
        }
        self.lines.append(events.encode(event))
        return event


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_export(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        {
            "user_id": row["uid"].strip(),
            "category": _clean(row["catagory"]),
            "sub_category": _clean(row["sub_catagory"]),
            "title": _clean(row["product"]),
            "price": Decimal(row["listing_amount"].strip()),
            "count": int(row["counts"]),
            "total": Decimal(row["total_bid_amount"].strip()),
        }
        for row in rows
    ]


def _split(total: Decimal, count: int) -> list[Decimal]:
    cents = int(total / CENT)
    shares = [cents // count] * count
    shares[-1] += cents - sum(shares)
    return [Decimal(max(share, 1)) * CENT for share in shares]


def build_marketplace(export: Path, seed: int = 7) -> Marketplace:
    rng = random.Random(seed)
    market = Marketplace()
    rows = read_export(export)
    keys = sorted({(r["category"], r["sub_category"], r["title"], r["price"]) for r in rows})
    listing_ids = {key: str(FIRST_LISTING_ID + number) for number, key in enumerate(keys)}
    windows = {}
    for key in keys:
        opens = ANCHOR - timedelta(days=20) + timedelta(hours=rng.uniform(0, 18 * 24))
        windows[key] = (opens, opens + timedelta(days=rng.choice((1, 2, 3))))

    bids: list[tuple[datetime, str, Decimal, str, tuple[str, str, str]]] = []
    keen: dict[tuple[str, str, str], tuple[int, str]] = {}
    for row in rows:
        key = (row["category"], row["sub_category"], row["title"], row["price"])
        opens, closes = windows[key]
        end = min(closes, ANCHOR)
        item = key[:3]
        keen[item] = max(keen.get(item, (0, "")), (row["count"], row["user_id"]))
        for amount in _split(row["total"], row["count"]):
            at = opens + (end - opens) * rng.random()
            bids.append((at, listing_ids[key], amount, row["user_id"], item))
    popular_item = max(keen, key=lambda item: keen[item][0])
    extra_items = sorted(keen, key=lambda item: -keen[item][0])[:4]
    for bidder in BIG_BIDDERS:
        for number, item in enumerate(extra_items):
            key = next(k for k in keys if k[:3] == item)
            at = windows[key][0] + timedelta(minutes=30 + number)
            bids.append((at, listing_ids[key], Decimal("5.00"), bidder, item))
    single_key = next(k for k in keys if k[:3] == popular_item)
    bids.append(
        (
            windows[single_key][0] + timedelta(minutes=1),
            listing_ids[single_key],
            Decimal("3.00"),
            SINGLE_BIDDER,
            popular_item,
        )
    )
    bids.sort()

    market.clock = ANCHOR - timedelta(days=21)
    for key in keys:
        _list(market, listing_ids[key], key, "live", windows[key][1], seller=None)

    by_listing: dict[str, list[tuple[Decimal, datetime, str, str]]] = defaultdict(list)
    for number, (at, listing_id, amount, bidder, _item) in enumerate(bids, start=1):
        market.clock = at
        market.add(
            {
                "event_type": "bid",
                "op": "insert",
                "listing_id": listing_id,
                "bid_id": number,
                "bidder_id": bidder,
                "amount": amount,
                "placed_at": at.isoformat(),
            }
        )
        market.bid_inserts += 1
        by_listing[listing_id].append((amount, at, str(number), bidder))

    market.clock = ANCHOR - timedelta(minutes=10)
    deleted = len(bids) + 1
    market.add(
        {
            "event_type": "bid",
            "op": "insert",
            "listing_id": listing_ids[keys[0]],
            "bid_id": deleted,
            "bidder_id": SINGLE_BIDDER,
            "amount": "1.00",
            "placed_at": market.clock.isoformat(),
        }
    )
    market.add(
        {"event_type": "bid", "op": "delete", "listing_id": listing_ids[keys[0]], "bid_id": deleted}
    )
    market.add(
        {
            "event_type": "bid",
            "op": "insert",
            "listing_id": listing_ids[keys[0]],
            "bid_id": deleted + 1,
            "bidder_id": None,
            "amount": "2.00",
            "placed_at": market.clock.isoformat(),
        }
    )
    market.bid_inserts += 2

    # Closing updates land with LSN high half 0x10: as text, "10/..." < "9/...".
    market.high, market.low = 0x10, 0
    market.clock = ANCHOR
    for key in keys:
        listing_id = listing_ids[key]
        if windows[key][1] > ANCHOR:
            continue
        placed = by_listing.get(listing_id)
        status = "sold" if placed else "ended"
        _list(market, listing_id, key, status, windows[key][1], seller=None, op="update")
        if placed:
            winner = max(placed, key=lambda bid: (bid[0], -bid[1].timestamp()))[3]
            market.won[winner].add(key[:3])

    # Every item relisted, live, by its keenest bidder.
    for number, item in enumerate(sorted(keen)):
        listing_id = str(FIRST_LISTING_ID + 100_000 + number)
        seller = keen[item][1]
        market.sellers[listing_id] = seller
        _list(
            market,
            listing_id,
            (*item, Decimal("1.00")),
            "live",
            ANCHOR + timedelta(days=2, minutes=number),
            seller=seller,
        )

    # Live by status, but its auction is over by the time of the run.
    stale = str(FIRST_LISTING_ID + 200_000)
    market.stale_live_listing = stale
    _list(
        market,
        stale,
        (*popular_item, Decimal("1.00")),
        "live",
        ANCHOR - timedelta(hours=1),
        seller=None,
    )
    for number in range(20):
        market.add(
            {
                "event_type": "bid",
                "op": "insert",
                "listing_id": stale,
                "bid_id": 900_000 + number,
                "bidder_id": keen[popular_item][1],
                "amount": f"{number + 2}.00",
                "placed_at": ANCHOR.isoformat(),
            }
        )
        market.bid_inserts += 1
    return market


def _list(
    market: Marketplace,
    listing_id: str,
    key: tuple[str, str, str, Decimal],
    status: str,
    ends_at: datetime,
    seller: str | None,
    op: str = "insert",
) -> None:
    category, sub_category, title, price = key
    market.listings[listing_id] = {
        "category": category,
        "sub_category": sub_category,
        "title": title,
        "status": status,
        "seller_id": seller,
        "ends_at": ends_at,
        "price": price,
    }
    market.add(
        {
            "event_type": "listing",
            "op": op,
            "listing_id": listing_id,
            "seller_id": seller,
            "title": title,
            "category": category,
            "sub_category": sub_category,
            "price": price,
            "status": status,
            "ends_at": ends_at.isoformat(),
            "description": f'{title}\nas listed, "mint", boxed',
        }
    )


def land(settings: Settings, lines: list[bytes], files: int, hour: datetime, tag: str) -> None:
    """Put ``lines`` into ``files`` objects under the landing prefix, Firehose-style."""
    s3 = boto3.client("s3", **settings.boto3_kwargs())
    per_file = -(-len(lines) // files)
    for number in range(files):
        chunk = lines[number * per_file : (number + 1) * per_file]
        if chunk:
            key = layout.landing_key(hour, f"{tag}-{number:04d}")
            s3.put_object(Bucket=settings.bucket, Key=key, Body=b"".join(chunk))


@pytest.fixture(scope="module", name="marketplace")
def marketplace_fixture(shared_data: Path) -> Marketplace:
    return build_marketplace(shared_data / "encore" / "user_interaction.csv")


@pytest.fixture(scope="module", name="recommend_settings")
def recommend_settings_fixture(base_settings: Settings, marketplace: Marketplace) -> Settings:
    """A bucket of the module's own with the marketplace's events landed, a slice twice."""
    suffix = uuid.uuid4().hex[:8]
    settings = base_settings.replace(
        bucket=f"encore-recs-{suffix}",
        stream_name=f"encore-recs-{suffix}",
        delivery_stream_name=f"encore-recs-{suffix}",
        als_iterations=5,
    )
    provision(settings)
    land(settings, marketplace.lines, files=12, hour=ANCHOR, tag="events")
    land(settings, marketplace.lines[:DUPLICATED], files=1, hour=ANCHOR, tag="redelivered")
    return settings
