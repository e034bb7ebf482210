"""Replay the export's aggregated rows as individual bids over a simulated period.

The export says only that a user placed ``bid_count`` bids totalling
``bid_total`` on a listing; the replayer invents the rest, deterministically
for a given seed:

* a user's bids on a listing rise (weights 1, 2, ..., n) and sum exactly to the
  export's total, to the cent;
* each listing gets an auction window inside a simulated period that ends at
  ``anchor`` (the replay's "now"); its bids, from all users, are ordered by
  amount and spread over the window, so amounts rise over time;
* bids are inserted in time order, a few per transaction, so the change
  capture sees live traffic; auctions whose window closed before ``anchor``
  are then marked ``sold``.

Bid ids are planned too, after the largest already in use, and inserts skip
ids that exist, so a second replay of the same plan inserts nothing.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from producers.loader import CENT, Interaction, Listing

logger = logging.getLogger(__name__)

PERIOD = timedelta(days=3)
DURATIONS = (timedelta(days=1), timedelta(days=2), timedelta(days=3))


@dataclass(frozen=True)
class PlannedBid:
    id: int
    listing_id: int
    bidder_id: str
    amount: Decimal
    placed_at: datetime


@dataclass(frozen=True)
class Window:
    starts_at: datetime
    ends_at: datetime


def split_total(total: Decimal, count: int) -> list[Decimal]:
    """``count`` positive, rising amounts (to the cent) that sum exactly to ``total``."""
    cents = int(total / CENT)
    weight_sum = count * (count + 1) // 2
    shares = [cents * weight // weight_sum for weight in range(1, count + 1)]
    if min(shares) < 1:
        shares = [cents // count] * count
    shares[-1] += cents - sum(shares)
    return [Decimal(share) * CENT for share in shares]


def plan_windows(listings: list[Listing], anchor: datetime, seed: int) -> dict[int, Window]:
    rng = random.Random(seed)
    start = anchor - PERIOD
    windows = {}
    for listing in listings:
        opens = start + timedelta(seconds=rng.uniform(0, (PERIOD - DURATIONS[0]).total_seconds()))
        windows[listing.id] = Window(opens, opens + rng.choice(DURATIONS))
    return windows


def plan_bids(
    interactions: list[Interaction],
    listings: list[Listing],
    windows: dict[int, Window],
    anchor: datetime,
    seed: int,
    first_id: int = 1,
) -> list[PlannedBid]:
    """Every bid of ``interactions``, in the order it is placed, numbered from ``first_id``.

    ``windows`` holds the window of every listing that gets a bid.
    """
    rng = random.Random(seed)
    listing_ids = {
        (listing.category, listing.sub_category, listing.title, listing.price): listing.id
        for listing in listings
    }
    per_listing: dict[int, list[tuple[Decimal, str]]] = defaultdict(list)
    for row in sorted(interactions, key=lambda r: (r.listing_key, r.user_id)):
        for amount in split_total(row.bid_total, row.bid_count):
            per_listing[listing_ids[row.listing_key]].append((amount, row.user_id))

    timed = []
    for listing_id in sorted(per_listing):
        window = windows[listing_id]
        closes = min(window.ends_at, anchor)
        span = (closes - window.starts_at).total_seconds()
        bids = sorted(per_listing[listing_id])
        offsets = sorted(rng.uniform(0, span) for _ in bids)
        for (amount, bidder), offset in zip(bids, offsets, strict=True):
            placed_at = window.starts_at + timedelta(seconds=offset)
            timed.append((placed_at, listing_id, amount, bidder))

    timed.sort()
    return [
        PlannedBid(number, listing_id, bidder, amount, placed_at)
        for number, (placed_at, listing_id, amount, bidder) in enumerate(timed, start=first_id)
    ]


def insert_bids(
    conn: Any,
    bids: list[PlannedBid],
    per_transaction: int = 50,
    pause_s: float = 0.0,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Insert the planned bids in time order; return how many were new."""
    inserted = 0
    for start in range(0, len(bids), per_transaction):
        chunk = bids[start : start + per_transaction]
        with conn, conn.cursor() as cursor:
            for bid in chunk:
                cursor.execute(
                    "INSERT INTO bids (id, listing_id, bidder_id, amount, placed_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                    (bid.id, bid.listing_id, bid.bidder_id, bid.amount, bid.placed_at),
                )
                inserted += cursor.rowcount
        if on_progress:
            on_progress(len(chunk))
        if pause_s:
            time.sleep(pause_s)
    with conn, conn.cursor() as cursor:
        # The replay gives ids itself: move the identity past them, so the marketplace's
        # own inserts (which let Postgres pick the id) do not collide with a replayed bid.
        cursor.execute(
            "SELECT setval(pg_get_serial_sequence('bids', 'id'),"
            " GREATEST((SELECT max(id) FROM bids), 1))"
        )
    logger.info("replayed %d bids (%d new)", len(bids), inserted)
    return inserted


def close_auctions(conn: Any, anchor: datetime) -> int:
    """Mark auctions that ended before ``anchor``: ``sold`` with bids, else ``ended``."""
    with conn, conn.cursor() as cursor:
        cursor.execute(
            "UPDATE listings SET status = CASE WHEN EXISTS"
            " (SELECT 1 FROM bids WHERE bids.listing_id = listings.id) THEN 'sold' ELSE 'ended' END"
            " WHERE status = 'live' AND ends_at <= %s",
            (anchor,),
        )
        closed: int = cursor.rowcount
    logger.info("closed %d auctions", closed)
    return closed
