"""The ALS model, and scoring users against a chosen set of items.

ALS (alternating least squares, Hu, Koren and Volinsky's implicit-feedback
form) learns one factor vector per user and per item such that their dot
product predicts whether the user bids on the item, weighting each observed
pair by its confidence. With a fixed seed and the same input it gives the
same factors.

Scoring is done here rather than with ``ALSModel.recommendForAllUsers``
because the nightly job must rank only the items that have a live listing
tonight, and the evaluation must skip items a user already had in training:
both are per-user masks the built-in method cannot apply. The chosen item
factors are broadcast (100,000 items of rank 16 are about 6 MB) and each
partition of users is scored with one matrix product per block of users,
read and answered as Arrow batches.

Limitations: the item factors are collected on the driver to be broadcast,
so the number of candidate items is bounded by driver memory (tens of
millions of floats are fine; a catalogue of hundreds of millions is not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import DoubleType, IntegerType, StructField, StructType

from encore.settings import Settings

logger = logging.getLogger(__name__)

SCORE_SCHEMA = StructType(
    [
        StructField("user_idx", IntegerType(), False),
        StructField("item_idx", IntegerType(), False),
        StructField("score", DoubleType(), False),
        StructField("position", IntegerType(), False),
    ]
)
USERS_PER_BLOCK = 512
#: The names Spark's ALS gives the factor RDDs it persists for each fitted model.
FACTOR_RDDS = frozenset({"userFactors", "itemFactors"})


@dataclass(frozen=True)
class AlsParams:
    rank: int
    reg: float
    alpha: float
    iterations: int
    seed: int

    @classmethod
    def from_settings(cls, settings: Settings) -> AlsParams:
        return cls(
            rank=settings.als_rank,
            reg=settings.als_reg,
            alpha=settings.als_alpha,
            iterations=settings.als_iterations,
            seed=settings.als_seed,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit(ratings: DataFrame, params: AlsParams) -> ALSModel:
    """Fit implicit ALS on ``user_idx``, ``item_idx``, ``confidence``.

    One block per core: the default of ten blocks triples the time of a
    small fit in local mode, and on a cluster the parallelism is the number
    of cores anyway.
    """
    blocks = max(1, ratings.sparkSession.sparkContext.defaultParallelism)
    als = ALS(
        userCol="user_idx",
        itemCol="item_idx",
        ratingCol="confidence",
        implicitPrefs=True,
        rank=params.rank,
        regParam=params.reg,
        alpha=params.alpha,
        maxIter=params.iterations,
        seed=params.seed,
        coldStartStrategy="drop",
        numUserBlocks=blocks,
        numItemBlocks=blocks,
    )
    model = als.fit(ratings)
    logger.debug("ALS fitted with %s", params)
    return model


@contextmanager
def releasing_factors(spark: SparkSession) -> Iterator[None]:
    """Unpersist, when the block ends, the factors of every model fitted inside it.

    Spark's ALS persists each fitted model's user and item factors and never
    releases them: the model's ``userFactors`` and ``itemFactors`` are new
    frames over those RDDs, so unpersisting the frames does not reach them. A
    night fits several models (the tuning candidates, the evaluation's and the
    final one); without this their factors would stay in the heap for as long
    as the JVM lives, and a second night in the same JVM would start short of
    memory. The factor RDDs are found among the RDDs persisted inside the block,
    and the block ends once their blocks are gone (:func:`release`).
    """
    before = persisted_ids(spark)
    try:
        yield
    finally:
        release(rdd for rdd in persisted_since(spark, before) if rdd.name() in FACTOR_RDDS)


def persisted_ids(spark: SparkSession) -> set[int]:
    """The ids of the RDDs persisted in ``spark`` now."""
    return set(spark.sparkContext._jsc.getPersistentRDDs().keySet())


def persisted_since(spark: SparkSession, before: set[int]) -> list[Any]:
    """The RDDs persisted since :func:`persisted_ids` gave ``before`` (JVM handles)."""
    persisted = spark.sparkContext._jsc.getPersistentRDDs()
    found = (persisted.get(rdd_id) for rdd_id in set(persisted.keySet()) - before)
    return [rdd for rdd in found if rdd is not None]


def release(rdds: Iterable[Any]) -> None:
    """Unpersist ``rdds`` and wait until their blocks are gone: a removal still in
    flight when the session stops ends in a page of RejectedExecutionException
    traces on stderr."""
    for rdd in rdds:
        rdd.unpersist(True)


def top_k(users: DataFrame, items: DataFrame, k: int, exclude: str | None = None) -> DataFrame:
    """The ``k`` best-scoring items for each user, by dot product of factors.

    ``users`` has ``user_idx`` and ``features`` (and, when ``exclude`` names
    it, an array of item ids the user must not get); ``items`` has
    ``item_idx`` and ``features``. Returns ``user_idx``, ``item_idx``,
    ``score`` and ``position`` (1 = best). Equal scores in a list are in item
    id order; of several items tied for a list's last places, which are kept
    is numpy's partition's choice, the same on every run over the same factors.
    Scores that are not finite are never returned.

    Users reach the Python workers as Arrow batches and the answers leave the
    same way, column by column: no Python object is made per user or per
    answer.
    """
    spark = users.sparkSession
    rows = items.select("item_idx", "features").orderBy("item_idx").collect()
    if not rows or k < 1:
        return spark.createDataFrame([], SCORE_SCHEMA)
    item_ids = np.array([row["item_idx"] for row in rows], dtype=np.int64)
    factors = np.array([row["features"] for row in rows], dtype=np.float64)
    shared = spark.sparkContext.broadcast((item_ids, factors))

    columns = ["user_idx", "features"] + ([exclude] if exclude else [])
    return users.select(*columns).mapInArrow(partial(_score_batches, shared, k), SCORE_SCHEMA)


def _score_batches(shared: Any, k: int, batches: Iterable[Any]) -> Iterator[Any]:
    """Arrow batches of users in, Arrow batches of ``SCORE_SCHEMA`` rows out."""
    import pyarrow as pa
    import pyarrow.compute as pc

    item_ids, factors = shared.value
    for batch in batches:
        for start in range(0, batch.num_rows, USERS_PER_BLOCK):
            block = batch.slice(start, USERS_PER_BLOCK)
            features = block.column(1)
            user_factors = (
                pc.list_flatten(features)
                .to_numpy(zero_copy_only=False)
                .astype(np.float64)
                .reshape(block.num_rows, -1)
            )
            exclusions = None
            if block.num_columns > 2:
                excluded = block.column(2)
                exclusions = (
                    pc.list_value_length(excluded).fill_null(0).to_numpy(zero_copy_only=False),
                    pc.list_flatten(excluded).to_numpy(zero_copy_only=False).astype(np.int64),
                )
            user_ids, best_items, scores, positions = _score_block(
                block.column(0).to_numpy(zero_copy_only=False),
                user_factors,
                exclusions,
                item_ids,
                factors,
                k,
            )
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array(user_ids, pa.int32()),
                    pa.array(best_items, pa.int32()),
                    pa.array(scores, pa.float64()),
                    pa.array(positions, pa.int32()),
                ],
                names=SCORE_SCHEMA.names,
            )


def _score_block(
    user_ids: np.ndarray,
    user_factors: np.ndarray,
    exclusions: tuple[np.ndarray, np.ndarray] | None,
    item_ids: np.ndarray,
    factors: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each user's best ``k`` items: user ids, item ids, scores and positions, as columns.

    ``exclusions`` is (how many item ids each user excludes, those ids one
    user after another). Rows come user by user, best first; equal scores in
    item id order (see :func:`top_k` for ties at a list's end).
    """
    scores = user_factors @ factors.T
    scores[~np.isfinite(scores)] = -np.inf
    if exclusions is not None:
        lengths, excluded = exclusions
        lines = np.repeat(np.arange(len(user_ids)), lengths)
        columns = np.searchsorted(item_ids, excluded)
        inside = columns < len(item_ids)
        lines, columns, excluded = lines[inside], columns[inside], excluded[inside]
        found = item_ids[columns] == excluded
        scores[lines[found], columns[found]] = -np.inf

    count = min(k, len(item_ids))
    best = np.argpartition(-scores, count - 1, axis=1)[:, :count]
    best_scores = np.take_along_axis(scores, best, axis=1)
    best_items = item_ids[best]
    # Highest score first; equal scores in item id order.
    order = np.lexsort((best_items, -best_scores), axis=1)
    best_items = np.take_along_axis(best_items, order, axis=1)
    best_scores = np.take_along_axis(best_scores, order, axis=1)
    kept = best_scores != -np.inf  # excluded and non-finite scores sort last
    positions = np.cumsum(kept, axis=1)
    return (
        np.repeat(user_ids, count).reshape(-1, count)[kept],
        best_items[kept],
        best_scores[kept],
        positions[kept],
    )
