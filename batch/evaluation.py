"""Offline evaluation of the model against a popularity baseline, and a small tuning search.

Everything here works on interactions: one row per (user, item) with
``user_idx``, ``item_idx``, ``confidence`` and ``at`` (when the user first bid
on the item, or null when unknown).

Split
-----
A user with fewer than two interactions cannot be both trained and tested:
all of theirs go to training. Of every other user's interactions,
``max(1, floor(20%))`` are held out for the test:

* by time, when every interaction has a time: the user's most recently
  started interactions (the question asked is "what will they bid on next");
* otherwise by a fixed share chosen with a seeded hash of (user, item), so
  the split is the same on every run.

A held-out pair is removed from training altogether, the baseline counts
popularity on training only, and the tuning search splits the training part
again the same way and never sees the test part.

Metrics
-------
At item level, for the users with held-out interactions, averaged over them;
``k`` = 10, relevance is binary (held out or not), and items the user had in
training are never recommended:

* precision@k: hits / k;
* recall@k: hits / number held out;
* NDCG@k: sum of ``1 / log2(position + 1)`` over hits, divided by the best
  possible sum for that many held-out items;
* MAP@k: mean over hits of the precision at the hit's position, divided by
  ``min(k, number held out)``;
* coverage: distinct items recommended to those users / items in training.

The baseline recommends the items most users bid on in training.

Tuning
------
A small search over the four parameters, in two rounds. Each candidate is
fitted on the training part less a validation split and scored by NDCG@k on
that validation split.

1. Every (rank, regParam) pair of :data:`TUNING_GRID`, with the configured
   alpha and iterations. The configured parameters are tried first.
2. The best of round 1 with each other alpha of the grid, and with each
   other number of iterations: one parameter changed at a time, because the
   full grid of all four would take 24 fits, against these 7.

The best of both rounds wins; a candidate tried earlier is kept on a tie, so
the configured parameters win every tie. The winner is refitted on the
whole training part for the test. When the grid is emptied and only the
configured parameters are left, nothing is fitted for tuning: there is no
choice to make. A caller that already holds a choice
(the nightly job reuses a recent night's, see :mod:`batch.recommend`) passes
it as ``chosen`` and nothing is fitted for tuning either.

Limitations: with few users that have three or more interactions the
validation split is small and the tuning choice is noisy; it is reported,
with every candidate's score, so a person can judge it.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from batch import model
from batch.interactions import confidence, dense_index
from batch.model import AlsParams
from encore.settings import Settings

logger = logging.getLogger(__name__)

K = 10
HOLDOUT_SHARE = 0.2
#: The values each parameter may take in the search, besides the configured one.
TUNING_GRID: dict[str, tuple[Any, ...]] = {
    "rank": (8, 16),
    "reg": (0.01, 0.1),
    "alpha": (1.0, 10.0, 40.0),
    "iterations": (5, 10),
}
METRIC_NAMES = ("precision", "recall", "ndcg", "map")

BID_LOG_SCHEMA = (
    "auctionid STRING, bid DECIMAL(18,2), bidtime DOUBLE, bidder STRING, bidderrate STRING, "
    "openbid DECIMAL(18,2), price DECIMAL(18,2), item STRING, auction_type STRING"
)


class EvaluationError(RuntimeError):
    """The evaluation cannot be computed; the message says why."""


@dataclass
class Split:
    train: DataFrame
    test: DataFrame
    method: str


def split_holdout(interactions: DataFrame, seed: int, share: float = HOLDOUT_SHARE) -> Split:
    """Hold out each user's last ``share`` of interactions (see the module docstring)."""
    timed = interactions.filter(F.col("at").isNull()).limit(1).count() == 0
    if timed:
        method = "time"
        order = [F.col("at").desc(), F.col("item_idx").desc()]
    else:
        method = "share"
        order = [F.xxhash64(F.lit(seed), "user_idx", "item_idx"), F.col("item_idx")]

    per_user = Window.partitionBy("user_idx")
    marked = (
        interactions.withColumn("_n", F.count(F.lit(1)).over(per_user))
        .withColumn("_rank", F.row_number().over(per_user.orderBy(*order)))
        .withColumn(
            "_held",
            F.when(F.col("_n") < 2, 0).otherwise(
                F.greatest(F.lit(1), F.floor(F.col("_n") * F.lit(share)))
            ),
        )
        .withColumn("_test", F.col("_rank") <= F.col("_held"))
    )
    columns = list(interactions.columns)
    train = marked.filter(~F.col("_test")).select(*columns)
    test = marked.filter(F.col("_test")).select("user_idx", "item_idx")
    return Split(train, test, method)


def ranking_metrics(
    recommended: DataFrame, held_out: DataFrame, catalogue_size: int, k: int = K
) -> dict[str, Any]:
    """Precision, recall, NDCG and MAP at ``k`` and coverage (see the module docstring).

    ``recommended``: ``user_idx``, ``item_idx``, ``position``; ``held_out``:
    ``user_idx``, ``item_idx``. Raises :class:`EvaluationError` when there is
    no user to evaluate or a metric is not a number.
    """
    top = recommended.filter(F.col("position") <= k)
    predictions = top.groupBy("user_idx").agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct("position", "item_idx"))),
            lambda pick: pick["item_idx"],
        ).alias("predicted")
    )
    labels = held_out.groupBy("user_idx").agg(F.collect_set("item_idx").alias("labels"))
    per_user = labels.join(predictions, "user_idx", "left").select(
        F.coalesce("predicted", F.array().cast("array<int>")).alias("predicted"), "labels"
    )
    hit = "array_contains(labels, p)"
    hits = f"size(filter(predicted, p -> {hit}))"
    gain = f"transform(predicted, (p, i) -> if({hit}, 1D / log2(i + 2), 0D))"
    best_gain = f"transform(slice(labels, 1, {k}), (l, i) -> 1D / log2(i + 2))"
    hits_so_far = "size(filter(slice(predicted, 1, i + 1), q -> array_contains(labels, q)))"
    precisions = f"transform(predicted, (p, i) -> if({hit}, {hits_so_far} / (i + 1), 0D))"
    scored = per_user.select(
        "predicted",
        F.expr(f"{hits} / {k}").alias("precision"),
        F.expr(f"{hits} / size(labels)").alias("recall"),
        F.expr(f"{_sum(gain)} / {_sum(best_gain)}").alias("ndcg"),
        F.expr(f"{_sum(precisions)} / least(size(labels), {k})").alias("map"),
    )
    row = scored.agg(
        F.count(F.lit(1)).alias("users"),
        *(F.avg(name).alias(name) for name in METRIC_NAMES),
        F.size(F.array_distinct(F.flatten(F.collect_list("predicted")))).alias("covered"),
    ).first()
    if row is None or not row["users"]:
        raise EvaluationError("no user has held-out interactions: nothing to evaluate")

    metrics: dict[str, Any] = {f"{name}_at_{k}": float(row[name]) for name in METRIC_NAMES}
    metrics["coverage"] = row["covered"] / catalogue_size if catalogue_size else 0.0
    bad = {name: value for name, value in metrics.items() if not math.isfinite(value)}
    if bad:
        raise EvaluationError(f"metrics are not numbers: {bad!r}")
    metrics["users"] = int(row["users"])
    return metrics


def _sum(array_expression: str) -> str:
    return f"aggregate({array_expression}, 0D, (total, x) -> total + x)"


def _seen(train: DataFrame) -> DataFrame:
    return train.groupBy("user_idx").agg(F.collect_list("item_idx").alias("seen"))


def als_recommendations(
    fitted: ALSModel, train: DataFrame, users: DataFrame, k: int = K
) -> DataFrame:
    """The model's top ``k`` for ``users`` (``user_idx``), skipping their training items."""
    user_factors = (
        fitted.userFactors.withColumnRenamed("id", "user_idx")
        .join(users, "user_idx")
        .join(_seen(train), "user_idx", "left")
    )
    item_factors = fitted.itemFactors.withColumnRenamed("id", "item_idx")
    return model.top_k(user_factors, item_factors, k, exclude="seen")


def popularity_recommendations(train: DataFrame, users: DataFrame, k: int = K) -> DataFrame:
    """The ``k`` items most users bid on in training, skipping each user's own.

    Every user is offered the same ranking less what they have seen, so the
    ranking is made once: the ``k`` best plus as many as the user who has
    seen the most has seen, which is enough for anyone. Each user keeps the
    first ``k`` of it they have not seen. Items with as many users are
    ranked by item id, also at the end of a list, so every user gets the
    same items of a tie.
    """
    seen = _seen(train)
    longest = seen.agg(F.max(F.size("seen"))).first()
    ranked = (
        train.groupBy("item_idx")
        .agg(F.count(F.lit(1)).cast("double").alias("score"))
        .orderBy(F.col("score").desc(), "item_idx")
        .limit(k + int((longest and longest[0]) or 0))
        .collect()
    )
    spark = train.sparkSession
    best = spark.createDataFrame(
        [([(row["item_idx"], row["score"]) for row in ranked],)],
        "best array<struct<item_idx:int,score:double>>",
    )
    unseen = F.filter(
        "best",
        lambda pick: ~F.coalesce(F.array_contains("seen", pick["item_idx"]), F.lit(False)),
    )
    return (
        users.join(seen, "user_idx", "left")
        .crossJoin(F.broadcast(best))
        .select("user_idx", F.posexplode(F.slice(unseen, 1, k)).alias("_at", "_pick"))
        .select(
            "user_idx",
            F.col("_pick.item_idx").alias("item_idx"),
            F.col("_pick.score").alias("score"),
            (F.col("_at") + 1).alias("position"),
        )
    )


def tune(train: DataFrame, base: AlsParams, k: int = K) -> tuple[AlsParams, list[dict[str, Any]]]:
    """Pick the ALS parameters by NDCG@k on a validation split of ``train`` alone.

    The search runs in two rounds (see the module docstring); each entry of
    the returned list is one candidate with its round and score. The
    candidates of a round are fitted side by side: one ALS fit is a chain of
    small Spark jobs that leaves cores idle between them, and each fit is
    seeded, so running them together changes nothing but the time taken.
    """
    if _pairs(base) == [base] and _around(base) == []:
        return base, []
    inner = split_holdout(train, base.seed)
    fitting = inner.train.cache()
    validation = inner.test.cache()
    try:
        users = validation.select("user_idx").distinct()
        if users.limit(1).count() == 0:
            logger.warning("no user can be validated: keeping the configured ALS parameters")
            return base, []
        catalogue = fitting.select("item_idx").distinct().count()

        def validate(candidate: AlsParams) -> float:
            fitted = model.fit(fitting, candidate)
            recs = als_recommendations(fitted, fitting, users, k)
            return ranking_metrics(recs, validation, catalogue, k)[f"ndcg_at_{k}"]

        results: list[dict[str, Any]] = []
        best, best_score = base, -1.0
        tried: list[AlsParams] = []
        for number, next_round in enumerate((_pairs, _around), start=1):
            candidates = [c for c in next_round(best) if c not in tried]
            if not candidates:
                continue
            with ThreadPoolExecutor(len(candidates)) as pool:
                scores = list(pool.map(validate, candidates))
            for candidate, score in zip(candidates, scores, strict=True):
                results.append({"round": number, **_searched(candidate), f"ndcg_at_{k}": score})
                logger.info(
                    "tuning round %d %s: validation NDCG@%d %.4f",
                    number,
                    _searched(candidate),
                    k,
                    score,
                )
                if score > best_score:
                    best, best_score = candidate, score
            tried.extend(candidates)
        return best, results
    finally:
        fitting.unpersist()
        validation.unpersist()


def _searched(params: AlsParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in TUNING_GRID}


def _pairs(base: AlsParams) -> list[AlsParams]:
    """Round 1: ``base``, then every other (rank, regParam) of the grid."""
    grid = [
        replace(base, rank=rank, reg=reg)
        for rank in TUNING_GRID["rank"]
        for reg in TUNING_GRID["reg"]
    ]
    return [base, *(candidate for candidate in grid if candidate != base)]


def _around(best: AlsParams) -> list[AlsParams]:
    """Round 2: ``best`` with each other alpha, then with each other number of iterations."""
    alphas = [replace(best, alpha=alpha) for alpha in TUNING_GRID["alpha"]]
    iterations = [replace(best, iterations=count) for count in TUNING_GRID["iterations"]]
    return [candidate for candidate in (*alphas, *iterations) if candidate != best]


def sample_users(interactions: DataFrame, max_users: int | None, seed: int) -> DataFrame:
    """The interactions of at most ``max_users`` users, chosen by a seeded hash of their id.

    The same users are chosen on every run over the same data. With no limit,
    or no more users than it, the interactions are returned as they are.
    """
    if not max_users:
        return interactions
    users = interactions.select("user_idx").distinct()
    if users.count() <= max_users:
        return interactions
    chosen = users.orderBy(F.xxhash64(F.lit(seed), "user_idx"), "user_idx").limit(max_users)
    return interactions.join(F.broadcast(chosen), "user_idx")


def evaluate(
    interactions: DataFrame,
    base: AlsParams,
    k: int = K,
    max_users: int | None = None,
    chosen: AlsParams | None = None,
) -> dict[str, Any]:
    """Split, tune, fit and score ALS and the popularity baseline on held-out interactions.

    With ``max_users``, a seeded sample of that many users is evaluated (and
    tuned on): the metrics of twenty thousand users are as telling as those of
    a million, and the fits cost a fraction. With ``chosen``, those parameters
    are evaluated as they are, without a search; ``tuning`` is then empty.
    """
    sampled = sample_users(interactions, max_users, base.seed)
    split = split_holdout(sampled, base.seed)
    train = split.train.cache()
    test = split.test.cache()
    try:
        with model.releasing_factors(interactions.sparkSession):
            result = _evaluate_split(split.method, train, test, base, k, max_users, chosen)
    finally:
        train.unpersist()
        test.unpersist()
    logger.info(
        "evaluation (%s split, %d users): ALS %s; popularity %s",
        result["split"],
        result["users_evaluated"],
        result["als"],
        result["popularity"],
    )
    return result


def _evaluate_split(
    method: str,
    train: DataFrame,
    test: DataFrame,
    base: AlsParams,
    k: int,
    max_users: int | None,
    chosen: AlsParams | None,
) -> dict[str, Any]:
    """Tune on the training part (unless the parameters are ``chosen``), then score the
    winner and the baseline on the test part."""
    users = test.select("user_idx").distinct()
    catalogue = train.select("item_idx").distinct().count()
    # The baseline needs no model: it is scored while the candidates are tuned.
    with ThreadPoolExecutor(1) as pool:
        baseline = pool.submit(
            lambda: ranking_metrics(popularity_recommendations(train, users, k), test, catalogue, k)
        )
        best, tuning = (chosen, []) if chosen is not None else tune(train, base, k)
        fitted = model.fit(train, best)
        als = ranking_metrics(als_recommendations(fitted, train, users, k), test, catalogue, k)
        popular = baseline.result()
    return {
        "split": method,
        "holdout_share": HOLDOUT_SHARE,
        "k": k,
        "max_users": max_users,
        "train_interactions": train.count(),
        "test_interactions": test.count(),
        "users_evaluated": als.pop("users"),
        "params": best.as_dict(),
        "tuning": tuning,
        "als": als,
        "popularity": {name: value for name, value in popular.items() if name != "users"},
    }


def evaluate_bid_log(
    spark: SparkSession, path: str, settings: Settings | None = None
) -> dict[str, Any]:
    """Evaluate on a bid log shaped like the eBay auction data (one row per bid).

    User = ``bidder``, item = ``auctionid`` (kept as a string: most are above
    2**31 - 1). Rows without a bidder are excluded and counted. ``bidtime``
    counts days from each auction's own start, so there is no common clock and
    the split is by held-out share.
    """
    settings = settings or Settings()
    raw = spark.read.csv(
        path, schema=BID_LOG_SCHEMA, header=True, multiLine=True, escape='"'
    ).withColumn("bidder", F.trim("bidder"))
    counts = raw.agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(F.coalesce(F.col("bidder"), F.lit("")) == "", 1).otherwise(0)).alias(
            "no_bidder"
        ),
    ).first()
    if counts is None or not counts["rows"]:
        raise EvaluationError(f"{path} holds no bids")

    bids = raw.filter(F.col("bidder") != "").select(
        F.col("bidder").alias("user_id"), F.col("auctionid").alias("item_id"), "bid"
    )
    pairs = bids.groupBy("user_id", "item_id").agg(
        confidence(settings, F.count(F.lit(1)).cast("double"), F.sum("bid").cast("double")).alias(
            "confidence"
        )
    )
    users, bidders = dense_index(pairs, ["user_id"], "user_idx")
    items, auctions = dense_index(pairs, ["item_id"], "item_idx")
    indexed = (
        pairs.join(users, "user_id")
        .join(items, "item_id")
        .select("user_idx", "item_idx", "confidence", F.lit(None).cast("timestamp").alias("at"))
        .cache()
    )
    try:
        result = evaluate(
            indexed, AlsParams.from_settings(settings), max_users=settings.eval_max_users
        )
        summary = {
            "source": path,
            "rows": int(counts["rows"]),
            "rows_without_bidder": int(counts["no_bidder"] or 0),
            "bidders": bidders,
            "auctions": auctions,
            "interactions": indexed.count(),
            **result,
        }
    finally:
        indexed.unpersist()
    if summary["rows_without_bidder"]:
        logger.warning(
            "%s: %d rows without a bidder excluded", path, summary["rows_without_bidder"]
        )
    return summary
