from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from producers.loader import plan_listings, read_export
from producers.replayer import plan_bids, plan_windows, split_total

ANCHOR = datetime(2026, 12, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("total", "count"), [("29", 4), ("1", 1), ("0.03", 3), ("33528", 37), ("10.01", 7)]
)
def test_split_total_sums_exactly_with_positive_rising_amounts(total: str, count: int) -> None:
    amounts = split_total(Decimal(total), count)

    assert len(amounts) == count
    assert sum(amounts) == Decimal(total)
    assert all(amount > 0 for amount in amounts)
    assert amounts == sorted(amounts)


def test_replay_plan_keeps_each_users_totals_and_rising_amounts_per_listing(shared_data) -> None:
    export = read_export(shared_data / "encore" / "user_interaction.csv")
    listings = plan_listings(export.interactions)
    windows = plan_windows(listings, ANCHOR, seed=7)
    bids = plan_bids(export.interactions, listings, windows, ANCHOR, seed=7)

    assert len(bids) == export.bid_count
    ids = {(item.category, item.sub_category, item.title, item.price): item.id for item in listings}
    expected = {(ids[row.listing_key], row.user_id): row.bid_total for row in export.interactions}
    totals: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    per_listing = defaultdict(list)
    for bid in bids:
        totals[(bid.listing_id, bid.bidder_id)] += bid.amount
        per_listing[bid.listing_id].append(bid)
        window = windows[bid.listing_id]
        assert window.starts_at <= bid.placed_at <= min(window.ends_at, ANCHOR)
    assert totals == expected
    for listing_bids in per_listing.values():
        in_time_order = sorted(listing_bids, key=lambda bid: (bid.placed_at, bid.id))
        amounts = [bid.amount for bid in in_time_order]
        assert amounts == sorted(amounts)
    assert [bid.placed_at for bid in bids] == sorted(bid.placed_at for bid in bids)
    assert plan_bids(export.interactions, listings, windows, ANCHOR, seed=7) == bids


def test_replay_plan_numbers_bids_after_those_already_in_the_database(shared_data) -> None:
    export = read_export(shared_data / "encore" / "user_interaction.csv")
    listings = plan_listings(export.interactions[:5])
    windows = plan_windows(listings, ANCHOR, seed=7)

    bids = plan_bids(export.interactions[:5], listings, windows, ANCHOR, seed=7, first_id=306)

    assert [bid.id for bid in bids] == list(range(306, 306 + len(bids)))
