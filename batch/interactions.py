"""Interactions: how strongly a bidder is drawn to an item, and dense ids for ALS.

An **item** is what recurs in the marketplace: ``(category, sub_category,
title)``. A listing is one auction of an item; it ends within days, so a
model learnt on listings would only ever recommend what is already over.
The model learns on items, and recommendations are mapped back to the live
listings of each item (:mod:`batch.ranking`).

Confidence
----------
Every bid counts less as it ages: its weight halves every
``recency_half_life_days``, measured back from the newest event landed (not
the wall clock, so a rerun over the same events gives the same numbers).
For one (bidder, item)::

    confidence = weight_bid_count * sum(w) + weight_amount * log1p(sum(w * amount))

where ``w`` is each bid's recency weight. The logarithm keeps one large bid
on a watch from drowning a hundred bids on trading cards. ALS with implicit
preferences reads this as ``1 + alpha * confidence``.

Dense ids
---------
ALS wants ``int`` ids, and user ids here are UUIDs or 64-bit numbers. Each
distinct user and item is numbered ``0..n-1`` in sorted order (so the
numbering is the same on every run over the same data), and the mapping is
kept to translate the model's answers back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from encore.settings import Settings

logger = logging.getLogger(__name__)

ITEM_COLUMNS = ("category", "sub_category", "title")
MAX_INDEX = 2**31 - 1
#: The most rows of a dense index (or a frame of one row per user or item) sent whole to
#: every task that joins with it: tens of bytes a row.
BROADCAST_INDEX_ROWS = 2_000_000
SECONDS_PER_DAY = 86_400.0


class IndexOverflowError(ValueError):
    """More distinct ids than ALS can number with 32-bit integers."""


def item_bids(bids: DataFrame, listings: DataFrame, listing_count: int) -> DataFrame:
    """Each usable bid with its bidder as ``user_id`` and its listing's item columns.

    The listings' item columns are broadcast while the ``listing_count``
    listings are few enough (:func:`broadcast_if_small`): tens of bytes per
    listing, while the bids, many times more, then stay where they are.
    """
    items = listings.select("listing_id", *ITEM_COLUMNS)
    return bids.join(broadcast_if_small(items, listing_count), "listing_id").select(
        F.col("bidder_id").alias("user_id"),
        *ITEM_COLUMNS,
        "listing_id",
        "bid_key",
        "amount",
        "placed_at",
        "commit_time",
    )


def confidence(settings: Settings, weighted_bids: Column, weighted_amount: Column) -> Column:
    """The confidence formula of the module docstring, over already weighted sums."""
    return F.lit(settings.weight_bid_count) * weighted_bids + F.lit(
        settings.weight_amount
    ) * F.log1p(weighted_amount)


def recency_weight(settings: Settings, at: Column, as_of: datetime) -> Column:
    """``0.5 ** (age_days / half_life)``; a bid newer than ``as_of`` weighs 1."""
    if settings.recency_half_life_days <= 0:
        raise ValueError(
            f"recency_half_life_days={settings.recency_half_life_days!r} must be positive"
        )
    age_days = F.greatest(F.lit(as_of.timestamp()) - at.cast("double"), F.lit(0.0)) / F.lit(
        SECONDS_PER_DAY
    )
    return F.pow(F.lit(0.5), age_days / F.lit(settings.recency_half_life_days))


def interactions(bids: DataFrame, settings: Settings, as_of: datetime) -> DataFrame:
    """One row per (user, item): bid count, amount, confidence and first bid time.

    ``first_bid_at`` is null when any of the pair's bids has no ``placed_at``.
    """
    weight = recency_weight(settings, F.coalesce("placed_at", "commit_time"), as_of)
    grouped = bids.groupBy("user_id", *ITEM_COLUMNS).agg(
        F.count(F.lit(1)).alias("bids"),
        F.sum("amount").alias("amount"),
        F.sum(weight).alias("_weighted_bids"),
        F.sum(weight * F.col("amount").cast("double")).alias("_weighted_amount"),
        F.min("placed_at").alias("_first"),
        F.max(F.col("placed_at").isNull().cast("int")).alias("_untimed"),
    )
    return grouped.select(
        "user_id",
        *ITEM_COLUMNS,
        "bids",
        "amount",
        confidence(settings, F.col("_weighted_bids"), F.col("_weighted_amount")).alias(
            "confidence"
        ),
        F.when(F.col("_untimed") == 0, F.col("_first")).alias("first_bid_at"),
    )


def dense_index(
    frame: DataFrame,
    columns: Sequence[str],
    name: str,
    keep: Callable[[DataFrame], DataFrame] = lambda numbered: numbered,
) -> tuple[DataFrame, int]:
    """Number the distinct values of ``columns`` ``0..n-1`` in sorted order.

    Returns ``columns`` plus the integer column ``name``, as ``keep`` gives it
    back (the numbering is computed once when ``keep`` stores it), and how
    many values there are. Raises :class:`IndexOverflowError` when there are
    more values than ``int`` holds.

    An index of up to :data:`BROADCAST_INDEX_ROWS` values comes back marked
    for broadcast, and so does every frame selected or filtered from it:
    every join with it then sends it whole to each task, and the other side,
    the bids or the lists, is not shuffled to meet it.
    """
    distinct = frame.select(*columns).distinct()
    # One partition sorts the distinct values: millions of ids fit, and the
    # numbering must be global.
    in_order = Window.orderBy(*columns)
    numbered = keep(distinct.withColumn(name, (F.row_number().over(in_order) - 1).cast("int")))
    size = numbered.count()
    if size > MAX_INDEX:
        raise IndexOverflowError(f"{size} distinct {list(columns)!r}: more than ALS can number")
    return broadcast_if_small(numbered, size), size


def broadcast_if_small(frame: DataFrame, rows: int) -> DataFrame:
    """``frame`` marked for broadcast when its ``rows`` are no more than
    :data:`BROADCAST_INDEX_ROWS`, else as it is (joined by shuffling both sides)."""
    return F.broadcast(frame) if rows <= BROADCAST_INDEX_ROWS else frame
