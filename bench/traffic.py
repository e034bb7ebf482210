"""Synthetic marketplace traffic shaped by the real data, for benchmarks at scale.

The shape comes from the two real data sets in ``../shared/data``:

* from the marketplace's export: how many bids a user places (the empirical
  distribution of bids per user), the category and sub-category mix, how
  often each title recurs (titles are drawn from the real ones, by their
  share of bids), and bid amounts (per-bid amounts of the export);
* from the eBay bid log: when bids arrive within an auction, as a share of
  its duration (bursts near the end).

Listings open across the simulated day, each lasts one of the eBay durations
(scaled to hours, as on a short video auction), receives bids only while open,
and amounts rise within a listing. Everything is drawn from one seeded
generator, so a seed gives the same traffic; ``users`` scales it from a test's
hundreds to a million.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from producers.loader import read_export

DAY = timedelta(days=1)


@dataclass(frozen=True)
class Shape:
    bids_per_user: np.ndarray
    titles: list[tuple[str, str, str]]  # (category, sub-category, title)
    title_weights: np.ndarray
    amounts: np.ndarray
    bid_time_shares: np.ndarray  # when a bid comes, as a share of the auction's life


@dataclass(frozen=True)
class Traffic:
    start: datetime
    user_ids: list[str]
    listing_ids: np.ndarray  # int64, beyond 32 bits
    listing_titles: np.ndarray  # index into Shape.titles
    listing_starts: np.ndarray  # seconds after start
    listing_ends: np.ndarray
    bid_listing: np.ndarray  # index into the listing arrays
    bid_user: np.ndarray  # index into user_ids
    bid_amount_cents: np.ndarray
    bid_seconds: np.ndarray  # seconds after start

    @property
    def bids(self) -> int:
        return int(self.bid_listing.size)


def learn_shape(data: Path) -> Shape:
    export = read_export(data / "encore" / "user_interaction.csv")
    per_user = Counter[str]()
    title_bids = Counter[tuple[str, str, str]]()
    amounts = []
    for row in export.interactions:
        per_user[row.user_id] += row.bid_count
        title_bids[(row.category, row.sub_category, row.title)] += row.bid_count
        amounts.extend([float(row.bid_total) / row.bid_count] * row.bid_count)
    titles = sorted(title_bids)
    weights = np.array([title_bids[title] for title in titles], dtype=float)

    shares = []
    durations = {"3 day auction": 3.0, "5 day auction": 5.0, "7 day auction": 7.0}
    with open(data / "ebay_auctions" / "auction.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            duration = durations.get(row["auction_type"])
            if duration and row["bidtime"]:
                shares.append(min(max(float(row["bidtime"]) / duration, 0.0), 1.0))
    return Shape(
        bids_per_user=np.array(sorted(per_user.values()), dtype=np.int64),
        titles=titles,
        title_weights=weights / weights.sum(),
        amounts=np.array(amounts),
        bid_time_shares=np.array(shares),
    )


def generate(
    shape: Shape,
    users: int,
    seed: int,
    start: datetime | None = None,
    bids_per_listing: float = 12.0,
    mean_bids_per_user: float = 10.0,
) -> Traffic:
    """One simulated day of traffic from ``users`` active users.

    The export's users are its heaviest bidders over many days (25 bids each on
    average); a day's active user places ``mean_bids_per_user``, with the
    export's spread (its distribution scaled to that mean, at least one bid).
    """
    rng = np.random.default_rng(seed)
    start = start or datetime(2026, 12, 1, tzinfo=UTC)
    day_s = DAY.total_seconds()

    scale = mean_bids_per_user / shape.bids_per_user.mean()
    drawn = rng.choice(shape.bids_per_user, size=users) * scale
    per_user = np.maximum(1, rng.poisson(drawn)).astype(np.int64)
    bid_user = np.repeat(np.arange(users), per_user)
    total = int(bid_user.size)

    listings = max(1, int(total / bids_per_listing))
    listing_titles = rng.choice(len(shape.titles), size=listings, p=shape.title_weights)
    durations_h = rng.choice(np.array([3.0, 5.0, 7.0]), size=listings)
    listing_starts = rng.uniform(0, day_s * 0.75, size=listings)
    listing_ends = np.minimum(listing_starts + durations_h * 3600, day_s)

    # Listing titles follow their share of bids in the export, so popular titles recur.
    bid_listing = rng.integers(0, listings, size=total)
    life = listing_ends[bid_listing] - listing_starts[bid_listing]
    share = rng.choice(shape.bid_time_shares, size=total)
    bid_seconds = listing_starts[bid_listing] + share * life
    bid_amount = rng.choice(shape.amounts, size=total)

    # Amounts rise within a listing: sort each listing's amounts into its time order.
    by_time = np.lexsort((bid_seconds, bid_listing))
    by_amount = np.lexsort((bid_amount, bid_listing))
    cents = np.empty(total, dtype=np.int64)
    cents[by_time] = np.maximum(1, np.round(bid_amount[by_amount] * 100)).astype(np.int64)

    return Traffic(
        start=start,
        user_ids=[f"user-{seed}-{number:07d}" for number in range(users)],
        listing_ids=np.arange(listings, dtype=np.int64) + 10_000_000_000,
        listing_titles=listing_titles,
        listing_starts=listing_starts,
        listing_ends=listing_ends,
        bid_listing=bid_listing,
        bid_user=bid_user,
        bid_amount_cents=cents,
        bid_seconds=bid_seconds,
    )
