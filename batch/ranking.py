"""Turn item scores into each user's list of live listings, with popularity as the fallback.

Who is served how
-----------------
* **als**: users with at least two interactions (distinct items), who
  therefore have factors the model learnt from more than one signal. Their
  best-scoring items among those with a live listing tonight are mapped to
  those listings.
* **popular-category**: everyone else, and ALS users left with nothing once
  the rules below are applied, get the most-bid live listings in the
  categories they have bid in, topped up from the global list.
* **popular-global**: users for whom none of their categories has anything
  left; they get the most-bid live listings overall.

Rules for every list
--------------------
* Only live listings: status ``live`` and not past ``ends_at`` at the run's
  time (an auction whose close has not been captured yet is still over).
* Never the user's own listing (``seller_id``).
* Never an item the user has already won (highest bid on a sold listing of
  it). A sold listing is never live, so this rule is about the item: a
  collector who won a title is not offered the same title again.
* One listing per item: for ALS the soonest-ending one (every listing of an
  item has the item's score), for popularity the most-bid one. No listing
  appears twice, and a list holds at most ``recs_per_user`` entries.
* Scores are finite: ALS scores are dot products of factors, popularity
  scores are bid counts. A list is ordered best first; the two kinds of
  score are not comparable and never mixed in one list except where the
  global list tops up a category list, which comes first.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import partial
from typing import Any

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import Column, DataFrame, Row, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DoubleType, StringType, StructField, StructType

from batch import model
from batch.interactions import ITEM_COLUMNS, broadcast_if_small

logger = logging.getLogger(__name__)

SOURCE_ALS = "als"
SOURCE_CATEGORY = "popular-category"
SOURCE_GLOBAL = "popular-global"
TIER_ALS, TIER_CATEGORY, TIER_GLOBAL = 0, 1, 2
#: Popularity candidates per category and overall, as a multiple of the list length,
#: so that a list survives the rules.
CANDIDATE_FACTOR = 3

LISTING_COLUMNS = ("listing_id", "seller_id", *ITEM_COLUMNS, "price", "ends_at")
#: What a document says of each entry, in this order.
ENTRY_FIELDS = ("listing_id", "title", "category", "sub_category", "price", "score")
SOURCES = {TIER_ALS: SOURCE_ALS, TIER_CATEGORY: SOURCE_CATEGORY, TIER_GLOBAL: SOURCE_GLOBAL}


def live_listings(listings: DataFrame, bids: DataFrame, now: datetime) -> DataFrame:
    """Listings open at ``now``, with ``listing_bids``: how many usable bids each has."""
    bid_counts = bids.groupBy("listing_id").agg(F.count(F.lit(1)).alias("listing_bids"))
    live = listings.filter(
        (F.col("status") == "live")
        & F.col("title").isNotNull()
        & (F.col("ends_at").isNull() | (F.col("ends_at") > F.lit(now)))
    )
    return (
        live.select(*LISTING_COLUMNS)
        .join(bid_counts, "listing_id", "left")
        .fillna(0, subset=["listing_bids"])
    )


def won_items(item_bids: DataFrame, listings: DataFrame, listing_count: int) -> DataFrame:
    """``user_id`` and item columns of every item a user won (top bid on a sold listing)."""
    # Under the same limit as the landing's check of every listing id, the sold ids are
    # broadcast, so the bids are not shuffled to find the few on sold listings.
    sold = broadcast_if_small(
        listings.filter(F.col("status") == "sold").select("listing_id"), listing_count
    )
    top_bid_first = Window.partitionBy("listing_id").orderBy(
        F.col("amount").desc(), F.col("placed_at").asc_nulls_last(), F.col("bid_key")
    )
    return (
        item_bids.join(sold, "listing_id")
        .withColumn("_n", F.row_number().over(top_bid_first))
        .filter("_n = 1")
        .select("user_id", *ITEM_COLUMNS)
        .distinct()
    )


def als_picks(
    fitted: ALSModel,
    users: DataFrame,
    everyone: DataFrame,
    items: DataFrame,
    live: DataFrame,
    won: DataFrame,
    size: int,
) -> DataFrame:
    """Each of ``users``' ALS list: one row per entry, numbered by ``position`` from 1.

    Columns: ``user_idx``, ``user_id``, :data:`LISTING_COLUMNS`,
    ``listing_bids``, ``score``, ``tier`` and ``position``, partitioned by
    ``user_idx`` (:func:`als_lists` groups them without moving them).

    ``users``: ``user_id``, ``user_idx`` of the users to serve; ``everyone``:
    the same for every user, to recognise sellers among them; ``items``: item
    columns and ``item_idx``; ``won`` as :func:`won_items` gives it. The
    first three are joined several times: marked for broadcast, as
    :func:`batch.interactions.dense_index` marks the small ones, they are
    sent to the tasks instead of the other side being shuffled.

    The rules are applied on integer ids while the items are scored, so the
    scored candidates are never joined to strings. Before the best ``size``
    are chosen, a user's won items are excluded, and so are the items whose
    only live listings are the user's own. Every other item has a listing the
    user may get (one row of :func:`listing_choices`: the user's own listing
    gives way to the soonest of another seller), so the best ``size`` items
    make the whole list. Only the chosen entries are joined to their listings.
    """
    # One row per item: sent whole to every task that joins with it.
    choices = F.broadcast(
        listing_choices(live)
        .join(items, list(ITEM_COLUMNS))
        .join(
            everyone.select(
                F.col("user_id").alias("first_seller"), F.col("user_idx").alias("_seller_idx")
            ),
            "first_seller",
            "left",
        )
        .select(
            "item_idx",
            "first_listing",
            "first_ends_at",
            "other_listing",
            "other_ends_at",
            "_seller_idx",
        )
    )
    won_ids = (
        won.join(items, list(ITEM_COLUMNS)).join(users, "user_id").select("user_idx", "item_idx")
    )
    only_own = choices.filter(
        F.col("other_listing").isNull() & F.col("_seller_idx").isNotNull()
    ).select(F.col("_seller_idx").alias("user_idx"), "item_idx")
    excluded = (
        won_ids.unionByName(only_own)
        .groupBy("user_idx")
        .agg(F.collect_list("item_idx").alias("_excluded"))
    )
    user_factors = (
        fitted.userFactors.withColumnRenamed("id", "user_idx")
        .join(users.select("user_idx"), "user_idx")
        .join(excluded, "user_idx", "left")
    )
    item_factors = fitted.itemFactors.withColumnRenamed("id", "item_idx").join(
        choices.select("item_idx"), "item_idx"
    )
    scored = model.top_k(user_factors, item_factors, size, exclude="_excluded")

    own = F.col("_seller_idx").eqNullSafe(F.col("user_idx"))
    chosen = (
        scored.join(choices, "item_idx")
        .select(
            "user_idx",
            "score",
            F.when(own, F.col("other_listing")).otherwise(F.col("first_listing")).alias("_id"),
            F.when(own, F.col("other_ends_at")).otherwise(F.col("first_ends_at")).alias("_ends"),
        )
        .filter(F.col("_id").isNotNull())
    )
    per_user = Window.partitionBy("user_idx").orderBy(
        F.col("score").desc(), F.col("_ends").asc_nulls_last(), F.col("_id")
    )
    listed = chosen.withColumn("position", F.row_number().over(per_user))
    details = live.select(*LISTING_COLUMNS, "listing_bids")
    return (
        listed.join(users, "user_idx")
        .join(F.broadcast(details), F.col("_id") == F.col("listing_id"))
        .select(
            "user_idx",
            "user_id",
            *LISTING_COLUMNS,
            "listing_bids",
            "score",
            F.lit(TIER_ALS).alias("tier"),
            "position",
        )
    )


def als_lists(picks: DataFrame) -> DataFrame:
    """One row per user of :func:`als_picks`: ``user_id``, ``source`` and ``items``.

    ``items`` holds :data:`ENTRY_FIELDS` of each entry, best first. The picks
    are grouped by ``user_idx`` as the picks' last step left them, so a
    kept frame of picks is not shuffled again.
    """
    entry = F.struct("position", *ENTRY_FIELDS)
    return (
        picks.groupBy("user_idx", "user_id")
        .agg(
            F.transform(
                F.array_sort(F.collect_list(entry)), lambda e: e.dropFields("position")
            ).alias("items")
        )
        .select("user_id", F.lit(SOURCE_ALS).alias("source"), "items")
    )


def listing_choices(live: DataFrame) -> DataFrame:
    """Per item, the listings an ALS list can show: at most two, never more.

    A list shows the soonest-ending live listing of an item
    (``first_listing``, sold by ``first_seller``), unless the user is its
    seller; then the soonest-ending one of another seller (``other_listing``,
    null when there is none). These two cover every user, so the choice does
    not grow with the number of live listings an item has (a popular title
    can have a thousand). One row per item: item columns, ``first_listing``,
    ``first_seller``, ``first_ends_at``, ``other_listing``, ``other_ends_at``.
    """
    per_item = Window.partitionBy(*ITEM_COLUMNS).orderBy(*_soonest_order())
    first = (
        live.withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .select(
            *ITEM_COLUMNS,
            F.col("listing_id").alias("first_listing"),
            F.col("seller_id").alias("first_seller"),
            F.col("ends_at").alias("first_ends_at"),
        )
    )
    other = (
        live.join(first.select(*ITEM_COLUMNS, "first_seller"), list(ITEM_COLUMNS))
        .filter(~F.col("seller_id").eqNullSafe(F.col("first_seller")))
        .withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .select(
            *ITEM_COLUMNS,
            F.col("listing_id").alias("other_listing"),
            F.col("ends_at").alias("other_ends_at"),
        )
    )
    return first.join(other, list(ITEM_COLUMNS), "left")


def _soonest_order() -> list[Column]:
    return [F.col("ends_at").asc_nulls_last(), F.col("listing_id")]


def popularity_lists(
    users: DataFrame, user_categories: DataFrame, live: DataFrame, won: DataFrame, size: int
) -> DataFrame:
    """For each of ``users``, the most-bid live listings of their categories, then overall.

    ``user_categories``: ``user_id``, ``category`` for every category a user
    has bid in; ``won`` as :func:`won_items` gives it. Each item is
    represented by its most-bid live listing, and ``score`` is that listing's
    bid count. Returns one row per user, as :func:`als_lists` does:
    ``user_id``, ``source`` (the best tier the list holds; popular-global for
    an empty list) and ``items``.

    The candidates are few: the ``size * CANDIDATE_FACTOR`` best of each
    category and overall. They are collected, with what a document says of
    them, and sent to the Python workers, which walk each user's categories'
    lists merged in order, then the global list, and keep the first ``size``
    that are neither the user's own nor won by them, each listing once, at its
    best tier. Users reach the workers with their categories and won listings
    as arrays, and leave with their whole list: no row is made per user and
    candidate, and none per entry.
    """
    depth = size * CANDIDATE_FACTOR
    spark = users.sparkSession
    per_item = Window.partitionBy(*ITEM_COLUMNS).orderBy(*_popular_order())
    best_listings = (
        live.withColumn("score", F.col("listing_bids").cast("double"))
        .withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .drop("_n")
    )
    candidate = (*ENTRY_FIELDS, "seller_id", F.unix_micros("ends_at").alias("ends_us"))
    in_category = Window.partitionBy("category").orderBy(*_popular_order())
    category_top = (
        best_listings.withColumn("_n", F.row_number().over(in_category))
        .filter(F.col("_n") <= depth)
        .select(*candidate)
    )
    global_top = (
        best_listings.withColumn("_n", F.row_number().over(Window.orderBy(*_popular_order())))
        .filter(F.col("_n") <= depth)
        .select(*candidate)
    )
    by_category: dict[str, list[_Candidate]] = {}
    for row in category_top.collect():
        by_category.setdefault(row["category"], []).append(_candidate(row))
    lists = (
        {category: sorted(found) for category, found in by_category.items()},
        sorted(_candidate(row) for row in global_top.collect()),
    )

    won_listings = (
        won.join(best_listings.select(*ITEM_COLUMNS, "listing_id"), list(ITEM_COLUMNS))
        .groupBy("user_id")
        .agg(F.collect_list("listing_id").alias("_won"))
    )
    categories = user_categories.groupBy("user_id").agg(
        F.collect_set("category").alias("_categories")
    )
    asking = (
        users.select("user_id")
        .join(categories, "user_id", "left")
        .join(won_listings, "user_id", "left")
        .select("user_id", "_categories", "_won")
    )
    entry = StructType(
        [
            StructField(name, live.schema[name].dataType if name != "score" else DoubleType())
            for name in ENTRY_FIELDS
        ]
    )
    schema = StructType(
        [
            StructField("user_id", users.schema["user_id"].dataType, False),
            StructField("source", StringType(), False),
            StructField("items", ArrayType(entry, False), False),
        ]
    )
    shared = spark.sparkContext.broadcast(lists)
    return asking.mapInArrow(partial(_popular_batches, shared, size, schema), schema)


#: A popularity candidate: its sort key (most bids, then soonest end, then listing id),
#: listing id, seller id and its entry (:data:`ENTRY_FIELDS`). Sorting candidates sorts
#: them best first.
_Candidate = tuple[tuple[float, bool, int, Any], Any, Any, dict[str, Any]]


def _candidate(row: Row) -> _Candidate:
    ends = row["ends_us"]
    key = (-row["score"], ends is None, ends or 0, row["listing_id"])
    return key, row["listing_id"], row["seller_id"], {name: row[name] for name in ENTRY_FIELDS}


def _popular_batches(
    shared: Any, size: int, schema: StructType, batches: Iterable[Any]
) -> Iterator[Any]:
    """Arrow batches of (user, categories, won listings) in; their popular lists out."""
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    arrow_schema = to_arrow_schema(schema)
    by_category, overall = shared.value
    for batch in batches:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        rows = zip(*(column.to_pylist() for column in batch.columns), strict=True)
        for user, user_categories, won in rows:
            in_categories = (by_category.get(category, ()) for category in user_categories or ())
            tiers = ((TIER_CATEGORY, heapq.merge(*in_categories)), (TIER_GLOBAL, iter(overall)))
            best, entries = _popular_list(user, set(won or ()), tiers, size)
            columns["user_id"].append(user)
            columns["source"].append(SOURCES[best])
            columns["items"].append(entries)
        yield pa.RecordBatch.from_pydict(columns, schema=arrow_schema)


def _popular_list(
    user: Any, won: set[Any], tiers: Iterable[tuple[int, Iterator[_Candidate]]], size: int
) -> tuple[int, list[dict[str, Any]]]:
    """``user``'s list: the first ``size`` allowed candidates by tier, and the best tier in it
    (:data:`TIER_GLOBAL` when it is empty)."""
    seen: set[Any] = set()
    entries: list[dict[str, Any]] = []
    best = TIER_GLOBAL
    for tier, candidates in tiers:
        for _, listing, seller, entry in candidates:
            if len(entries) == size:
                return best, entries
            if listing in seen or listing in won or (seller is not None and seller == user):
                continue
            seen.add(listing)
            entries.append(entry)
            best = min(best, tier)
    return best, entries


def _popular_order() -> list[Column]:
    return [
        F.col("listing_bids").desc(),
        F.col("ends_at").asc_nulls_last(),
        F.col("listing_id"),
    ]
