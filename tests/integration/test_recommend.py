"""The nightly job on the real export's bids, landed as events in the local S3.

Two nights share one bucket: the first publishes; then a listing ends, and
the second run is interrupted before its pointer switch, so readers must
still get the first night's documents while the second night's documents
already leave the ended listing out. The eBay bid log is evaluated too.
"""

from __future__ import annotations

import json
import math
import re
import sys
import urllib.request
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from conftest_recommend import (
    ANCHOR,
    BIG_BIDDERS,
    DUPLICATED,
    RUN_NOW,
    SINGLE_BIDDER,
    Marketplace,
    land,
    marketplace_fixture,  # noqa: F401 - registers the fixture
    recommend_settings_fixture,  # noqa: F401 - registers the fixture
)
from pyspark.sql import functions as F

from batch import evaluation, interactions, landing, model, publish, ranking
from batch.model import AlsParams
from batch.recommend import NIGHTLY_STAGES, Kept, evaluate_bid_log, run_nightly
from encore import layout
from encore.settings import Settings
from lambdas.presign.handler import presigned_url_for_user

pytestmark = pytest.mark.integration

FIRST, SECOND = "night-1", "night-2"
#: The nights tune over the configured parameters only; the whole grid is tried on eBay.
QUICK_TUNING: dict[str, tuple[Any, ...]] = {"rank": (), "reg": (), "alpha": (), "iterations": ()}
BLANKED_BIDDERS = 3


class Bucket:
    def __init__(self, settings: Settings) -> None:
        self.name = settings.bucket
        self.s3 = boto3.client("s3", **settings.boto3_kwargs())

    def json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())

    def documents(self, run_id: str) -> dict[str, dict[str, Any]]:
        prefix = layout.run_prefix(run_id) + "users/"
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        keys = [entry["Key"] for page in pages for entry in page.get("Contents", [])]
        return {key[len(prefix) : -len(".json")]: self.json(key) for key in keys}


@pytest.fixture(scope="module")
def first_night(spark: Any, recommend_settings: Settings) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "TUNING_GRID", QUICK_TUNING)
        stages: list[str] = []
        summary = run_nightly(
            spark,
            f"s3a://{recommend_settings.bucket}",
            recommend_settings,
            run_id=FIRST,
            now=RUN_NOW,
            on_stage=stages.append,
        )
    return {
        "summary": summary,
        "stages": stages,
        "documents": Bucket(recommend_settings).documents(FIRST),
    }


@pytest.fixture(scope="module")
def ended_listing(first_night: dict[str, Any]) -> str:
    """The listing recommended most often on the first night."""
    counts = Counter(
        item["listing_id"]
        for document in first_night["documents"].values()
        for item in document["items"]
    )
    return counts.most_common(1)[0][0]


@pytest.fixture(scope="module")
def interrupted_night(
    spark: Any,
    recommend_settings: Settings,
    marketplace: Marketplace,
    ended_listing: str,
) -> dict[str, Any]:
    """The listing ends; the second run writes everything but dies before the switch."""
    listing = marketplace.listings[ended_listing]
    marketplace.lines.clear()
    marketplace.high, marketplace.low = 0x11, 0
    marketplace.add(
        {
            "event_type": "listing",
            "op": "update",
            "listing_id": ended_listing,
            "seller_id": listing["seller_id"],
            "title": listing["title"],
            "category": listing["category"],
            "sub_category": listing["sub_category"],
            "price": listing["price"],
            "status": "ended",
            "ends_at": listing["ends_at"].isoformat(),
        },
        at=ANCHOR + timedelta(minutes=1),
    )
    land(recommend_settings, marketplace.lines, files=1, hour=ANCHOR, tag="closing")

    def crash(*args: Any, **kwargs: Any) -> None:
        raise publish.PublishError("the driver died before the switch")

    searches: list[AlsParams] = []

    def search(train: Any, base: AlsParams, k: int = 10) -> Any:
        searches.append(base)
        return tune(train, base, k)

    tune = evaluation.tune
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish, "switch_pointer", crash)
        patch.setattr(evaluation, "TUNING_GRID", QUICK_TUNING)
        patch.setattr(evaluation, "tune", search)
        with pytest.raises(publish.PublishError, match="before the switch"):
            run_nightly(
                spark,
                f"s3a://{recommend_settings.bucket}",
                recommend_settings,
                run_id=SECOND,
                now=RUN_NOW,
            )
    return {
        "documents": Bucket(recommend_settings).documents(SECOND),
        "manifest": Bucket(recommend_settings).json(layout.manifest_key(SECOND)),
        "searches": searches,
    }


def test_every_bid_event_is_read_once(
    first_night: dict[str, Any],
    marketplace: Marketplace,
) -> None:
    summary = first_night["summary"]
    counts = summary["counts"]

    assert summary["interactions_read"] == marketplace.bid_inserts
    assert counts["duplicates_removed"] == DUPLICATED
    assert counts["malformed_rows"] == 0
    assert counts["bids_without_bidder"] == 1
    # Every bid insert but the deleted one and the one without a bidder is learnt from.
    assert counts["bids"] - counts["bids_without_bidder"] == marketplace.bid_inserts - 2
    assert summary["users"] == summary["users_als"] + summary["users_fallback"]
    assert summary["users"] == len(first_night["documents"]) == counts["documents_written"]


def test_closing_updates_win_although_their_lsns_sort_first_as_text(
    first_night: dict[str, Any],
    marketplace: Marketplace,
) -> None:
    live = [
        listing_id
        for listing_id, listing in marketplace.listings.items()
        if listing["status"] == "live" and listing["ends_at"] > RUN_NOW
    ]

    assert first_night["summary"]["live_listings"] == len(live)


def test_every_stage_is_reported_in_order_and_timed(first_night: dict[str, Any]) -> None:
    assert first_night["stages"] == list(NIGHTLY_STAGES)
    timed = first_night["summary"]["stage_seconds"]
    assert list(timed) == list(NIGHTLY_STAGES)
    assert all(seconds >= 0 for seconds in timed.values())
    assert sum(timed.values()) <= first_night["summary"]["seconds"] + 0.5


def test_metrics_are_numbers_for_both_models(first_night: dict[str, Any]) -> None:
    summary = first_night["summary"]

    assert summary["evaluation"]["split"] == "time"
    assert summary["evaluation"]["users_evaluated"] > 100
    for name in ("als", "popularity"):
        metrics = summary["metrics"][name]
        assert set(metrics) == {
            "precision_at_10",
            "recall_at_10",
            "ndcg_at_10",
            "map_at_10",
            "coverage",
        }
        assert all(math.isfinite(value) and 0 <= value <= 1 for value in metrics.values())
    assert summary["metrics"]["als"]["ndcg_at_10"] > summary["metrics"]["popularity"]["ndcg_at_10"]


def test_documents_hold_only_what_the_user_may_bid_on(
    first_night: dict[str, Any],
    marketplace: Marketplace,
    recommend_settings: Settings,
) -> None:
    for user_id, document in first_night["documents"].items():
        assert (document["schema_version"], document["user_id"]) == (1, user_id)
        assert document["run_id"] == FIRST
        items = document["items"]
        assert 0 < len(items) <= recommend_settings.recs_per_user
        listing_ids = [item["listing_id"] for item in items]
        titles = [(item["category"], item["sub_category"], item["title"]) for item in items]
        assert len(set(listing_ids)) == len(listing_ids)
        assert len(set(titles)) == len(titles)
        for item in items:
            listing = marketplace.listings[item["listing_id"]]
            assert listing["status"] == "live" and listing["ends_at"] > RUN_NOW, item
            assert listing["seller_id"] != user_id, item
            assert isinstance(item["score"], float) and math.isfinite(item["score"])
            Decimal(item["price"])
        assert not set(titles) & marketplace.won[user_id]
        assert marketplace.stale_live_listing not in listing_ids


def test_a_popular_list_skips_own_listings_and_won_items_and_tops_up_once(spark: Any) -> None:
    sooner, later = ANCHOR + timedelta(days=1), ANCHOR + timedelta(days=2)
    rows = [  # listing, seller, category, item, ends_at, bids
        ("own", "u", "Toys", "A", sooner, 9),
        ("won", None, "Toys", "B", sooner, 8),
        ("c-later", None, "Toys", "C", later, 7),
        ("c-sooner", None, "Toys", "C", sooner, 7),
        ("c-fewer", None, "Toys", "C", sooner, 1),
        ("watch", None, "Watches", "W", sooner, 20),
        ("e", None, "Toys", "E", sooner, 5),
    ]
    live = spark.createDataFrame(
        [
            (listing, seller, category, "Sub", item, Decimal("1.00"), ends, bids)
            for listing, seller, category, item, ends, bids in rows
        ],
        "listing_id string, seller_id string, category string, sub_category string, "
        "title string, price decimal(18,2), ends_at timestamp, listing_bids long",
    )
    users = spark.createDataFrame([("u",)], "user_id string")
    categories = spark.createDataFrame([("u", "Toys")], "user_id string, category string")
    won = spark.createDataFrame(
        [("u", "Toys", "Sub", "B")],
        "user_id string, category string, sub_category string, title string",
    )

    (listed,) = ranking.popularity_lists(users, categories, live, won, size=4).collect()

    # C is represented by its most-bid, then soonest listing; the watch tops up the Toys
    # list from the global list, and Toys items in the global list are not listed again.
    assert (listed["user_id"], listed["source"]) == ("u", ranking.SOURCE_CATEGORY)
    assert [(item["listing_id"], item["title"], item["score"]) for item in listed["items"]] == [
        ("c-sooner", "C", 7.0),
        ("e", "E", 5.0),
        ("watch", "W", 20.0),
    ]
    assert listed["items"][0].asDict() == {
        "listing_id": "c-sooner",
        "title": "C",
        "category": "Toys",
        "sub_category": "Sub",
        "price": Decimal("1.00"),
        "score": 7.0,
    }


def test_each_item_keeps_its_soonest_listing_and_the_soonest_of_another_seller(
    spark: Any,
) -> None:
    rows = [  # listing, seller, item, days until it ends
        ("a1", "s1", "A", 1),
        ("a2", "s1", "A", 2),
        ("a3", "s2", "A", 3),
        ("a4", "s3", "A", 4),
        ("b1", "s1", "B", 1),
        ("b2", "s1", "B", 2),
        ("c1", None, "C", 5),
        ("c2", "s2", "C", 6),
    ]
    live = spark.createDataFrame(
        [
            (listing, seller, "Toys", "Funko", item, Decimal("1.00"), ANCHOR + timedelta(days=d), 0)
            for listing, seller, item, d in rows
        ],
        "listing_id string, seller_id string, category string, sub_category string, "
        "title string, price decimal(18,2), ends_at timestamp, listing_bids long",
    )

    choices = {
        row["title"]: (row["first_listing"], row["first_seller"], row["other_listing"])
        for row in ranking.listing_choices(live).collect()
    }

    # s1 sees a3 for A and nothing for B (all of B is their own); anyone else sees a1, b1, c1.
    assert choices == {
        "A": ("a1", "s1", "a3"),
        "B": ("b1", "s1", None),
        "C": ("c1", None, "c2"),
    }


def test_an_als_list_skips_won_items_and_gives_own_listings_way(spark: Any) -> None:
    sooner, later = ANCHOR + timedelta(days=1), ANCHOR + timedelta(days=2)
    rows = [  # listing, seller, item, ends_at
        ("a-own", "u", "A", sooner),
        ("a-other", "v", "A", later),
        ("b", None, "B", sooner),
        ("c-own", "u", "C", sooner),
        ("d", None, "D", sooner),
        ("e", None, "E", sooner),
    ]
    live = spark.createDataFrame(
        [
            (listing, seller, "Toys", "Funko", item, Decimal("1.00"), ends, 0)
            for listing, seller, item, ends in rows
        ],
        "listing_id string, seller_id string, category string, sub_category string, "
        "title string, price decimal(18,2), ends_at timestamp, listing_bids long",
    )
    items = spark.createDataFrame(
        [("Toys", "Funko", item, index) for index, item in enumerate("ABCDE")],
        "category string, sub_category string, title string, item_idx int",
    )
    users = spark.createDataFrame([("u", 0)], "user_id string, user_idx int")
    everyone = spark.createDataFrame([("u", 0), ("v", 1)], "user_id string, user_idx int")
    # One factor: the item's score is its factor, so A > B > C > D > E for user u.
    fitted = SimpleNamespace(
        userFactors=spark.createDataFrame([(0, [1.0])], "id int, features array<float>"),
        itemFactors=spark.createDataFrame(
            [(index, [5.0 - index]) for index in range(5)], "id int, features array<float>"
        ),
    )
    won = spark.createDataFrame(
        [("u", "Toys", "Funko", "B")],
        "user_id string, category string, sub_category string, title string",
    )

    picked = ranking.als_picks(fitted, users, everyone, items, live, won, size=1)
    # B is won; C's only live listing is the user's own, so it is never a candidate.
    listed = ranking.als_picks(fitted, users, everyone, items, live, won, size=3)

    assert [(row["listing_id"], row["position"]) for row in picked.collect()] == [("a-other", 1)]
    assert [
        (row["listing_id"], row["position"], row["tier"], row["score"])
        for row in listed.orderBy("position").collect()
    ] == [
        ("a-other", 1, ranking.TIER_ALS, 5.0),
        ("d", 2, ranking.TIER_ALS, 2.0),
        ("e", 3, ranking.TIER_ALS, 1.0),
    ]


def test_python_workers_run_the_interpreter_that_has_the_dependencies(spark: Any) -> None:
    def interpreter(rows: Any) -> Any:
        import sys

        yield sys.executable

    workers = spark.sparkContext.parallelize([1, 2], 2).mapPartitions(interpreter).collect()

    assert workers == [sys.executable, sys.executable]


def test_the_factors_of_models_fitted_in_a_night_are_released(spark: Any) -> None:
    ratings = spark.createDataFrame(
        [(user, item, 1.0) for user in range(4) for item in range(3) if (user + item) % 2],
        "user_idx int, item_idx int, confidence double",
    )
    context = spark.sparkContext._jsc

    def factor_rdds() -> set[int]:
        persisted = context.getPersistentRDDs()
        return {
            rdd_id
            for rdd_id in persisted.keySet()
            if persisted.get(rdd_id).name() in model.FACTOR_RDDS
        }

    before = factor_rdds()
    with model.releasing_factors(spark):
        model.fit(ratings, AlsParams(rank=2, reg=0.1, alpha=1.0, iterations=2, seed=1))
        inside = factor_rdds() - before

    assert len(inside) == 2  # the user and the item factors
    assert factor_rdds() == before


def test_kept_frames_read_their_rows_without_their_plan_and_are_released(spark: Any) -> None:
    context = spark.sparkContext._jsc
    before = set(context.getPersistentRDDs().keySet())
    frame = spark.range(1000).withColumn("half", F.col("id") % 2).groupBy("half").count()
    keep = Kept(spark)

    kept = keep(frame)

    assert sorted(map(tuple, kept.collect())) == [(0, 500), (1, 500)]
    plan = kept._jdf.queryExecution().analyzed().toString()
    assert "Aggregate" not in plan and "Range" not in plan
    assert set(context.getPersistentRDDs().keySet()) - before  # the rows are stored
    keep.release()
    assert set(context.getPersistentRDDs().keySet()) == before


def test_the_popularity_baseline_skips_what_each_user_has_seen_and_breaks_ties_by_id(
    spark: Any,
) -> None:
    # Item 7 has three users, items 3 and 5 two each, items 1 and 9 one each.
    train = spark.createDataFrame(
        [(0, 7), (1, 7), (2, 7), (0, 5), (1, 5), (1, 3), (2, 3), (2, 1), (0, 9)],
        "user_idx int, item_idx int",
    )
    users = spark.createDataFrame([(0,), (1,), (3,)], "user_idx int")

    picks = evaluation.popularity_recommendations(train, users, k=2)

    assert sorted(map(tuple, picks.collect()), key=lambda pick: pick[::3]) == [
        (0, 3, 2.0, 1),  # 7 and 5 are seen: 3, then 1 before 9 (the same count)
        (0, 1, 1.0, 2),
        (1, 1, 1.0, 1),  # 7, 5 and 3 are seen
        (1, 9, 1.0, 2),
        (3, 7, 3.0, 1),  # nothing seen
        (3, 3, 2.0, 2),  # 3 before 5 (the same count)
    ]


def test_a_dense_index_numbers_in_order_and_is_broadcast_only_when_small(
    spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = spark.createDataFrame(
        [("u-b", "x"), ("u-a", "y"), ("u-b", "y"), ("u-c", "x")], "user_id STRING, item STRING"
    )
    keep = Kept(spark)
    try:
        plans = {}
        for limit in (3, 2):
            monkeypatch.setattr(interactions, "BROADCAST_INDEX_ROWS", limit)
            users, size = interactions.dense_index(pairs, ["user_id"], "user_idx", keep)

            assert size == 3
            assert sorted(map(tuple, users.collect())) == [("u-a", 0), ("u-b", 1), ("u-c", 2)]
            joined = pairs.join(users.select("user_id", "user_idx"), "user_id")
            assert sorted(map(tuple, joined.select("user_idx", "item").collect())) == [
                (0, "y"),
                (1, "x"),
                (1, "y"),
                (2, "x"),
            ]
            plans[limit] = physical_plan(joined)
        assert "BroadcastHashJoin" in plans[3]
        assert "BroadcastHashJoin" not in plans[2]
    finally:
        keep.release()


def physical_plan(frame: Any) -> str:
    return str(frame._jdf.queryExecution().executedPlan().toString())


def test_listings_are_sent_whole_to_the_bids_only_while_few(
    spark: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings = spark.createDataFrame(
        [
            ("1", "s", "Lamp", "Home", "Light", Decimal("5.00"), "sold", None),
            ("2", "s", "Vase", "Home", "Decor", Decimal("3.00"), "live", None),
        ],
        "listing_id STRING, seller_id STRING, title STRING, category STRING, "
        "sub_category STRING, price DECIMAL(18,2), status STRING, ends_at TIMESTAMP",
    )
    bids = spark.createDataFrame(
        [
            ("b1", "1", "u1", Decimal("4.00")),
            ("b2", "1", "u2", Decimal("6.00")),
            ("b3", "2", "u1", Decimal("2.00")),
            ("b4", "9", "u3", Decimal("1.00")),
        ],
        "bid_key STRING, listing_id STRING, bidder_id STRING, amount DECIMAL(18,2)",
    ).select("*", *(F.lit(None).cast("timestamp").alias(c) for c in ("placed_at", "commit_time")))
    # Spark would broadcast frames this small by itself: only the marks are looked at.
    threshold = spark.conf.get("spark.sql.autoBroadcastJoinThreshold")
    spark.conf.set("spark.sql.autoBroadcastJoinThreshold", "-1")
    try:
        rows, plans = {}, {}
        for limit in (2, 1):
            monkeypatch.setattr(interactions, "BROADCAST_INDEX_ROWS", limit)
            checked = landing._checked_bids(bids, listings, 2).select("bid_key", "_known")
            items = interactions.item_bids(bids, listings, 2).select("bid_key", "user_id", "title")
            won = ranking.won_items(interactions.item_bids(bids, listings, 2), listings, 2)
            frames = (checked, items, won)
            rows[limit] = [sorted(map(tuple, frame.collect()), key=str) for frame in frames]
            plans[limit] = [physical_plan(frame) for frame in frames]
    finally:
        spark.conf.set("spark.sql.autoBroadcastJoinThreshold", threshold)

    assert (
        rows[2]
        == rows[1]
        == [
            [("b1", True), ("b2", True), ("b3", True), ("b4", None)],
            [("b1", "u1", "Lamp"), ("b2", "u2", "Lamp"), ("b3", "u1", "Vase")],
            [("u2", "Home", "Light", "Lamp")],
        ]
    )
    assert all("BroadcastHashJoin" in plan for plan in plans[2])
    assert not any("BroadcastHashJoin" in plan for plan in plans[1])


def test_ids_beyond_32_bits_come_back_unchanged(first_night: dict[str, Any]) -> None:
    for bidder in BIG_BIDDERS:
        document = first_night["documents"][bidder]
        assert document["source"] == ranking.SOURCE_ALS
        assert all(int(item["listing_id"]) > 2**32 for item in document["items"])


def test_a_single_bid_is_served_from_its_category(first_night: dict[str, Any]) -> None:
    document = first_night["documents"][SINGLE_BIDDER]

    assert document["source"] == ranking.SOURCE_CATEGORY
    assert document["items"]


def test_the_night_is_published_whole(
    first_night: dict[str, Any],
    recommend_settings: Settings,
) -> None:
    bucket = Bucket(recommend_settings)
    pointer = bucket.json(layout.RECOMMENDATIONS_POINTER)
    manifest = bucket.json(pointer["manifest"])
    body = bucket.s3.get_object(Bucket=bucket.name, Key=layout.batch_output_key(FIRST))["Body"]
    lines = [json.loads(line) for line in body.read().splitlines()]

    assert pointer["run_id"] == FIRST
    assert manifest["counts"]["users"] == len(lines) == first_night["summary"]["users"]
    assert manifest["model"]["params"] == first_night["summary"]["params"]
    assert set(manifest["data_window"]) == {"first_event_at", "last_event_at", "recency_as_of"}
    documents = first_night["documents"]
    for line in lines:
        document = documents[line["input"]["userId"]]
        assert line["output"]["recommendedItems"] == [i["listing_id"] for i in document["items"]]
        assert line["output"]["scores"] == [i["score"] for i in document["items"]]
    assert len(first_night["summary"]["sample"]) == 3


def test_readers_keep_last_nights_set_until_the_switch(
    interrupted_night: dict[str, Any],
    first_night: dict[str, Any],
    recommend_settings: Settings,
    ended_listing: str,
) -> None:
    bucket = Bucket(recommend_settings)
    user_id = next(
        user
        for user, document in first_night["documents"].items()
        if ended_listing in [item["listing_id"] for item in document["items"]]
    )
    reply = presigned_url_for_user(recommend_settings, user_id, 600)
    with urllib.request.urlopen(reply["url"], timeout=10) as response:
        served = json.loads(response.read())

    assert bucket.json(layout.RECOMMENDATIONS_POINTER)["run_id"] == FIRST
    assert served == first_night["documents"][user_id]
    assert len(interrupted_night["documents"]) == len(first_night["documents"])


def test_the_next_night_reuses_the_published_nights_search(
    first_night: dict[str, Any], interrupted_night: dict[str, Any]
) -> None:
    first = first_night["summary"]["evaluation"]["search"]
    second = interrupted_night["manifest"]["evaluation"]

    assert (first["run_id"], first["reused"]) == (FIRST, False)
    assert interrupted_night["searches"] == []
    assert second["search"] == {**first, "reused": True}
    assert second["params"] == first_night["summary"]["params"]
    assert second["tuning"] == first_night["summary"]["evaluation"]["tuning"]
    assert second["users_evaluated"] > 0


def test_a_listing_that_ended_since_the_last_run_is_not_recommended(
    interrupted_night: dict[str, Any], ended_listing: str
) -> None:
    for document in interrupted_night["documents"].values():
        assert ended_listing not in [item["listing_id"] for item in document["items"]]


def test_the_ebay_bid_log_is_evaluated(spark: Any, tmp_path: Path, shared_data: Path) -> None:
    # The published log has every bidder; blank a few, as the original had.
    lines = (shared_data / "ebay_auctions" / "auction.csv").read_text().splitlines()
    blanked = [re.sub(r',"bidder_\d+",', ',"",', line) for line in lines[1 : 1 + BLANKED_BIDDERS]]
    log = tmp_path / "auction.csv"
    log.write_text("\n".join([*lines, *blanked]) + "\n")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "TUNING_GRID", QUICK_TUNING)
        result = evaluate_bid_log(spark, str(log), Settings(als_iterations=5))

    assert result["rows"] == len(lines) - 1 + BLANKED_BIDDERS
    assert result["rows_without_bidder"] == BLANKED_BIDDERS
    assert result["bidders"] > 1000 and result["auctions"] > 200
    assert result["split"] == "share"
    for name in ("als", "popularity"):
        assert all(math.isfinite(value) for value in result[name].values())


def test_metrics_match_a_hand_computation(spark: Any) -> None:
    recommended = spark.createDataFrame(
        [(1, 10, 1), (1, 20, 2), (1, 30, 3)], "user_idx int, item_idx int, position int"
    )
    held_out = spark.createDataFrame([(1, 20), (1, 40), (2, 10)], "user_idx int, item_idx int")

    metrics = evaluation.ranking_metrics(recommended, held_out, catalogue_size=6, k=3)

    # User 1 hits at position 2 of 3 with 2 held out; user 2 got nothing.
    assert metrics["precision_at_3"] == pytest.approx((1 / 3) / 2)
    assert metrics["recall_at_3"] == pytest.approx((1 / 2) / 2)
    assert metrics["ndcg_at_3"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)) / 2)
    assert metrics["map_at_3"] == pytest.approx((1 / 2) / 2 / 2)
    assert metrics["coverage"] == pytest.approx(3 / 6)
    assert metrics["users"] == 2


def test_neither_tuning_nor_the_tested_model_sees_held_out_pairs(spark: Any) -> None:
    rows = [
        (user, item, 1.0 + (user * item) % 3, ANCHOR + timedelta(hours=user + item))
        for user in range(40)
        for item in range(user % 7, user % 7 + 6)
    ]
    interactions = spark.createDataFrame(
        rows, "user_idx int, item_idx int, confidence double, at timestamp"
    )
    held_out = {
        (row["user_idx"], row["item_idx"])
        for row in evaluation.split_holdout(interactions, 42).test.collect()
    }
    fitted_on: list[set[tuple[int, int]]] = []
    fit = model.fit

    def spy(ratings: Any, params: AlsParams) -> Any:
        fitted_on.append(
            {(row[0], row[1]) for row in ratings.select("user_idx", "item_idx").collect()}
        )
        return fit(ratings, params)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "fit", spy)
        patch.setattr(
            evaluation,
            "TUNING_GRID",
            {"rank": (8,), "reg": (0.01, 0.1), "alpha": (10.0, 20.0), "iterations": ()},
        )
        result = evaluation.evaluate(interactions, AlsParams(8, 0.1, 10.0, 2, 42))

    assert result["split"] == "time" and len(held_out) == 40
    # Round 1: the configured pair and reg 0.01; round 2: the better of them with alpha 20.
    assert [entry["round"] for entry in result["tuning"]] == [1, 1, 2]
    assert result["tuning"][2]["alpha"] == 20.0
    assert len(result["tuning"]) == len(fitted_on) - 1 == 3
    assert all(not pairs & held_out for pairs in fitted_on)
    assert all(pairs < fitted_on[-1] for pairs in fitted_on[:-1])  # validation held back too


def test_the_evaluation_sample_keeps_whole_users_and_is_the_same_every_run(spark: Any) -> None:
    interactions = spark.createDataFrame(
        [(user, item, 1.0, None) for user in range(40) for item in range(user % 4 + 1)],
        "user_idx int, item_idx int, confidence double, at timestamp",
    )

    first = evaluation.sample_users(interactions, 10, seed=3).collect()
    again = evaluation.sample_users(interactions, 10, seed=3).collect()

    users = {row["user_idx"] for row in first}
    assert len(users) == 10
    assert sorted(map(tuple, first)) == sorted(map(tuple, again))
    assert len(first) == sum(user % 4 + 1 for user in users)
    assert evaluation.sample_users(interactions, 40, seed=3) is interactions
