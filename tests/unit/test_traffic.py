from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.traffic import Shape, generate, learn_shape


@pytest.fixture(scope="module")
def shape(shared_data: Path) -> Shape:
    return learn_shape(shared_data)


def test_traffic_is_the_same_for_a_seed_and_differs_for_another(shape: Shape) -> None:
    first, again, other = generate(shape, 500, 1), generate(shape, 500, 1), generate(shape, 500, 2)

    assert np.array_equal(first.bid_amount_cents, again.bid_amount_cents)
    assert np.array_equal(first.bid_seconds, again.bid_seconds)
    assert not np.array_equal(first.bid_amount_cents[:100], other.bid_amount_cents[:100])


def test_no_bid_falls_outside_its_auction_and_amounts_rise_within_a_listing(shape: Shape) -> None:
    traffic = generate(shape, 2_000, 7)

    starts = traffic.listing_starts[traffic.bid_listing]
    ends = traffic.listing_ends[traffic.bid_listing]
    assert np.all(traffic.bid_seconds >= starts) and np.all(traffic.bid_seconds <= ends)
    assert np.all(traffic.bid_amount_cents > 0)
    order = np.lexsort((traffic.bid_seconds, traffic.bid_listing))
    listing, cents = traffic.bid_listing[order], traffic.bid_amount_cents[order]
    same_listing = listing[1:] == listing[:-1]
    assert np.all(cents[1:][same_listing] >= cents[:-1][same_listing])


def test_bids_per_user_follow_the_exports_spread_at_the_daily_mean(shape: Shape) -> None:
    traffic = generate(shape, 20_000, 3, mean_bids_per_user=10.0)

    per_user = np.bincount(traffic.bid_user, minlength=20_000)
    assert per_user.min() >= 1
    assert 9.5 < per_user.mean() < 11.5
    assert per_user.max() > 5 * per_user.mean()  # the export's heavy bidders survive scaling
    assert traffic.bids == per_user.sum()
    assert all(listing_id > 2**32 for listing_id in traffic.listing_ids[:5])
