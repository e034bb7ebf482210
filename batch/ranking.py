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

import logging
from datetime import datetime

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from batch import model
from batch.interactions import ITEM_COLUMNS

logger = logging.getLogger(__name__)

SOURCE_ALS = "als"
SOURCE_CATEGORY = "popular-category"
SOURCE_GLOBAL = "popular-global"
TIER_ALS, TIER_CATEGORY, TIER_GLOBAL = 0, 1, 2
#: Candidates fetched per user beyond the list length, to survive the rules.
CANDIDATE_FACTOR = 3

LISTING_COLUMNS = ("listing_id", "seller_id", *ITEM_COLUMNS, "price", "ends_at")


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


def won_items(item_bids: DataFrame, listings: DataFrame) -> DataFrame:
    """``user_id`` and item columns of every item a user won (top bid on a sold listing)."""
    sold = listings.filter(F.col("status") == "sold").select("listing_id")
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


def als_candidates(
    fitted: ALSModel, users: DataFrame, items: DataFrame, live: DataFrame, depth: int
) -> DataFrame:
    """Each ALS user's ``depth`` best items that have a live listing, mapped to those listings.

    ``users``: ``user_id``, ``user_idx`` of the users to serve; ``items``: item
    columns and ``item_idx``.
    """
    live_items = items.join(live.select(*ITEM_COLUMNS).distinct(), list(ITEM_COLUMNS))
    user_factors = fitted.userFactors.withColumnRenamed("id", "user_idx").join(users, "user_idx")
    item_factors = fitted.itemFactors.withColumnRenamed("id", "item_idx").join(
        live_items.select("item_idx"), "item_idx"
    )
    scored = model.top_k(user_factors, item_factors, depth)
    return (
        scored.join(users, "user_idx")
        .join(items, "item_idx")
        .join(soonest_listings(live), list(ITEM_COLUMNS))
        .select("user_id", *LISTING_COLUMNS, "listing_bids", "score", F.lit(TIER_ALS).alias("tier"))
    )


def soonest_listings(live: DataFrame) -> DataFrame:
    """Per item, the listings an ALS list can show: at most two, never more.

    A list shows the soonest-ending live listing of an item, unless the user
    is its seller; then the soonest-ending one of another seller. Keeping the
    soonest listing and the soonest of a different seller covers both cases
    for every user, so the candidates do not grow with the number of live
    listings an item has (a popular title can have a thousand).
    """
    per_item = Window.partitionBy(*ITEM_COLUMNS).orderBy(*_soonest_order())
    ranked = live.withColumn("_n", F.row_number().over(per_item))
    first = ranked.filter("_n = 1").drop("_n")
    first_sellers = first.select(*ITEM_COLUMNS, F.col("seller_id").alias("_first_seller"))
    other = (
        live.join(first_sellers, list(ITEM_COLUMNS))
        .filter(~F.col("seller_id").eqNullSafe(F.col("_first_seller")))
        .drop("_first_seller")
        .withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .drop("_n")
    )
    return first.unionByName(other)


def _soonest_order() -> list[Column]:
    return [F.col("ends_at").asc_nulls_last(), F.col("listing_id")]


def popularity_candidates(
    users: DataFrame, user_categories: DataFrame, live: DataFrame, depth: int
) -> DataFrame:
    """For each of ``users``, the most-bid live listings of their categories, then overall.

    Each item is represented by its most-bid live listing; ``score`` is that
    listing's bid count.
    """
    per_item = Window.partitionBy(*ITEM_COLUMNS).orderBy(*_popular_order())
    best_listings = (
        live.withColumn("score", F.col("listing_bids").cast("double"))
        .withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .drop("_n")
    )
    in_category = Window.partitionBy("category").orderBy(*_popular_order())
    category_top = best_listings.withColumn("_n", F.row_number().over(in_category)).filter(
        F.col("_n") <= depth
    )
    global_top = best_listings.withColumn(
        "_n", F.row_number().over(Window.orderBy(*_popular_order()))
    ).filter(F.col("_n") <= depth)

    columns = ["user_id", *LISTING_COLUMNS, "listing_bids", "score", "tier"]
    by_category = (
        users.join(user_categories, "user_id")
        .join(category_top, "category")
        .withColumn("tier", F.lit(TIER_CATEGORY))
        .select(*columns)
    )
    overall = users.crossJoin(global_top).withColumn("tier", F.lit(TIER_GLOBAL)).select(*columns)
    return by_category.unionByName(overall)


def _popular_order() -> list[Column]:
    return [
        F.col("listing_bids").desc(),
        F.col("ends_at").asc_nulls_last(),
        F.col("listing_id"),
    ]


def _list_order() -> list[Column]:
    return [
        F.col("tier"),
        F.col("score").desc(),
        F.col("ends_at").asc_nulls_last(),
        F.col("listing_id"),
    ]


def pick(candidates: DataFrame, won: DataFrame, size: int) -> DataFrame:
    """Apply the rules of the module docstring; number each user's list from 1.

    Returns the candidates' columns plus ``position``.
    """
    allowed = candidates.filter(
        F.col("seller_id").isNull() | (F.col("seller_id") != F.col("user_id"))
    ).join(won, ["user_id", *ITEM_COLUMNS], "left_anti")
    allowed = allowed.filter(~F.isnan("score") & F.col("score").isNotNull())

    per_item = Window.partitionBy("user_id", *ITEM_COLUMNS).orderBy(*_list_order())
    per_user = Window.partitionBy("user_id").orderBy(*_list_order())
    return (
        allowed.withColumn("_n", F.row_number().over(per_item))
        .filter("_n = 1")
        .drop("_n")
        .withColumn("position", F.row_number().over(per_user))
        .filter(F.col("position") <= size)
    )


def source_column() -> Column:
    """The source of a user's list, from the best tier in it (an aggregate over picks)."""
    best = F.min("tier")
    return (
        F.when(best == TIER_ALS, F.lit(SOURCE_ALS))
        .when(best == TIER_CATEGORY, F.lit(SOURCE_CATEGORY))
        .otherwise(F.lit(SOURCE_GLOBAL))
    )
