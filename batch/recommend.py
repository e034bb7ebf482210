"""The nightly recommendation job: landed bids in, one published run of recommendations out.

Steps of :func:`run_nightly`:

1. read and de-duplicate the landed events; rebuild bids and listing states
   (:mod:`batch.landing`);
2. turn bids into (user, item) confidences and number users and items for
   ALS (:mod:`batch.interactions`);
3. evaluate on held-out interactions against a popularity baseline, with a
   small tuning search on a validation part of the training data; a failure
   to evaluate fails the run (:mod:`batch.evaluation`). The search is not
   run every night: while the published night's search is younger than
   ``als_tune_every_days`` and was made on the same basis (configured
   parameters, grid, confidence weights, sample size), tonight evaluates its
   choice as it is and the manifest carries that search forward;
4. fit ALS on every interaction with the chosen parameters and rank the
   live listings for every user, with popularity for the users the model
   cannot serve (:mod:`batch.model`, :mod:`batch.ranking`);
5. write the documents, the batch file and the manifest under the run's
   prefix, then switch the pointer (:mod:`batch.publish`).

On EMR::

    spark-submit --py-files encore.zip batch/recommend.py --bucket B --scheme s3

where ``encore.zip`` holds the ``encore`` and ``batch`` packages. Settings
(region, ALS parameters, weights) come from the environment
(:mod:`encore.settings`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from batch import evaluation, landing, model, publish, ranking
from batch.evaluation import EvaluationError, evaluate_bid_log
from batch.interactions import (
    ITEM_COLUMNS,
    broadcast_if_small,
    dense_index,
    interactions,
    item_bids,
)
from batch.landing import LandingError
from batch.model import AlsParams
from encore import layout
from encore.output import output_logger
from encore.settings import Settings, SettingsError

logger = logging.getLogger(__name__)
output = output_logger(__name__)

__all__ = ["evaluate_bid_log", "main", "run_nightly"]

#: The stages of a run, in order; each is timed and reported when it ends.
NIGHTLY_STAGES = ("read", "evaluate", "fit", "score", "publish")
MIN_ALS_INTERACTIONS = 2
SAMPLE_USERS = 3


def run_nightly(
    spark: SparkSession,
    base_uri: str,
    settings: Settings,
    *,
    run_id: str | None = None,
    now: datetime | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compute and publish tonight's recommendations; return the run's summary.

    ``base_uri`` is ``s3a://<bucket>`` locally and ``s3://<bucket>`` on EMR.
    ``now`` (default: the wall clock) decides which listings are still open
    and stamps the documents; ``run_id`` defaults to ``now`` as
    ``YYYYMMDDTHHMMSSZ``. ``on_stage`` is called with the name of each of
    :data:`NIGHTLY_STAGES` as it ends.
    """
    started = time.monotonic()
    now = (now or datetime.now(UTC)).astimezone(UTC)
    run_id = run_id or now.strftime("%Y%m%dT%H%M%SZ")
    bucket = publish.bucket_of(base_uri)
    logger.info("nightly run %s: reading %s", run_id, landing.landing_uri(base_uri))

    clock = _Clock(on_stage)
    landed = landing.load_landed(spark, base_uri)
    keep = Kept(spark)
    try:
        # The night's models (tuning candidates included) leave nothing in the heap.
        with model.releasing_factors(spark):
            tables = _tables(landed, settings, keep)
            clock.lap("read")
            scores = _evaluate(tables, settings, bucket, run_id, now)
            params = AlsParams(**scores["params"])
            clock.lap("evaluate")
            fitted = model.fit(tables.indexed, params)
            clock.lap("fit")

            live = keep(ranking.live_listings(landed.listings, landed.bids, now))
            documents = keep(_documents(fitted, tables, landed, live, settings, keep))
            counts = _counts(landed.counts, tables, live, documents)
            sample = _sample(documents)
            clock.lap("score")

            generated_at = _iso(now)
            manifest = _manifest(run_id, generated_at, params, settings, landed, counts, scores)
            manifest["model"]["spark_version"] = spark.version
            manifest["stage_seconds"] = dict(clock.laps)
            _publish(documents, manifest, settings, bucket, run_id, generated_at)
            clock.lap("publish")
    finally:
        keep.release()
        landed.release()

    summary = {
        "run_id": run_id,
        "interactions_read": counts["bid_insert_events"],
        **{
            name: counts[name]
            for name in ("users", "users_als", "users_fallback", "items", "live_listings")
        },
        "metrics": manifest["metrics"],
        "evaluation": manifest["evaluation"],
        "params": params.as_dict(),
        "counts": counts,
        "manifest": layout.manifest_key(run_id),
        "sample": sample,
        "seconds": round(time.monotonic() - started, 1),
        "stage_seconds": clock.laps,
    }
    logger.info(
        "nightly run %s published: %d users (%d ALS, %d popularity), %d live listings, %.1f s",
        run_id,
        summary["users"],
        summary["users_als"],
        summary["users_fallback"],
        summary["live_listings"],
        summary["seconds"],
    )
    return summary


def _evaluate(
    tables: Tables, settings: Settings, bucket: str, run_id: str, now: datetime
) -> dict[str, Any]:
    """The night's evaluation, with a new search or the published night's."""
    base = AlsParams.from_settings(settings)
    basis = search_basis(settings)
    previous = _published_search(settings, bucket, basis, now)
    scores = evaluation.evaluate(
        tables.indexed,
        base,
        max_users=settings.eval_max_users,
        chosen=AlsParams(**previous["params"]) if previous else None,
    )
    if previous:
        scores["tuning"] = previous["tuning"]
        scores["search"] = {**previous["search"], "reused": True}
    else:
        scores["search"] = {"run_id": run_id, "at": _iso(now), "basis": basis, "reused": False}
    return scores


def search_basis(settings: Settings) -> dict[str, Any]:
    """What a tuning search's choice depends on, as it reads back from JSON.

    Another value for any of these makes the next night search again.
    """
    basis = {
        "params": AlsParams.from_settings(settings).as_dict(),
        "grid": evaluation.TUNING_GRID,
        "confidence": [
            settings.weight_bid_count,
            settings.weight_amount,
            settings.recency_half_life_days,
        ],
        "max_users": settings.eval_max_users,
    }
    restored: dict[str, Any] = json.loads(json.dumps(basis))
    return restored


def reusable_search(
    manifest: dict[str, Any] | None, basis: dict[str, Any], now: datetime, every_days: int
) -> dict[str, Any] | None:
    """The evaluation of ``manifest`` if tonight may reuse its search, else None.

    It may while the search, made on the same ``basis``, is less than
    ``every_days`` old at ``now``; a manifest written before searches were
    recorded never qualifies.
    """
    if every_days <= 0 or manifest is None:
        return None
    scores = manifest.get("evaluation") or {}
    search = scores.get("search")
    if not isinstance(search, dict) or search.get("basis") != basis or "params" not in scores:
        return None
    age = now - datetime.fromisoformat(search["at"])
    if not timedelta(0) <= age < timedelta(days=every_days):
        return None
    return {"params": scores["params"], "tuning": scores.get("tuning", []), "search": search}


def _published_search(
    settings: Settings, bucket: str, basis: dict[str, Any], now: datetime
) -> dict[str, Any] | None:
    if settings.als_tune_every_days <= 0:
        return None
    try:
        manifest = publish.read_manifest(publish.s3_client(settings), bucket)
        previous = reusable_search(manifest, basis, now, settings.als_tune_every_days)
        if previous:
            AlsParams(**previous["params"])  # parameters that no longer fit are not reused
    except (BotoCoreError, ClientError, ValueError, KeyError, TypeError) as exc:
        logger.warning("cannot read the published night's search (%s): searching again", exc)
        return None
    if previous:
        logger.info(
            "reusing the ALS parameters searched in run %s at %s: %s",
            previous["search"]["run_id"],
            previous["search"]["at"],
            previous["params"],
        )
    return previous


class _Clock:
    """Seconds spent in each stage of the run, in order.

    Spark is lazy: each stage ends with an action (a count or a write), so the
    time of a stage is the work it forced.
    """

    def __init__(self, on_lap: Callable[[str], None] | None = None) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()
        self._on_lap = on_lap

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._last, 2)
        self._last = now
        logger.info("nightly stage %s: %.1f s", name, self.laps[name])
        if self._on_lap:
            self._on_lap(name)


@dataclass
class Tables:
    """The night's working tables, all kept (:class:`Kept`).

    ``bids``: usable bids with their items; ``pairs``: one row per (user,
    item) with its confidence; ``users`` and ``items``: the dense ids;
    ``indexed``: ``pairs`` in ALS's terms (``user_idx``, ``item_idx``,
    ``confidence``, ``at``); how many users and items there are.
    """

    bids: DataFrame
    pairs: DataFrame
    users: DataFrame
    items: DataFrame
    indexed: DataFrame
    user_count: int
    item_count: int


class Kept:
    """Frames computed once and kept for the rest of the night, their plans cut short.

    ``keep(frame)`` computes ``frame`` now and returns a frame that reads the
    stored rows (Spark's ``localCheckpoint``); :meth:`release` frees them all.
    A cached frame would keep the whole plan that made it, and every frame
    built on it would repeat that plan: by the time the night ranks its lists
    the plans hold the landed CSV read and its windows many times over, and
    Spark spent seconds only analysing them. The price: a kept partition lost
    with its executor cannot be rebuilt, so losing an executor fails the
    night, before the pointer moves (the published night stays).
    """

    def __init__(self, spark: SparkSession) -> None:
        self._spark = spark
        self._rdds: list[Any] = []

    def __call__(self, frame: DataFrame) -> DataFrame:
        before = model.persisted_ids(self._spark)
        kept = frame.localCheckpoint(eager=True)
        self._rdds.extend(model.persisted_since(self._spark, before))
        return kept

    def release(self) -> None:
        model.release(self._rdds)
        self._rdds.clear()


def _tables(landed: landing.Landed, settings: Settings, keep: Kept) -> Tables:
    bids = keep(item_bids(landed.bids, landed.listings, landed.listing_count))
    pairs = keep(interactions(bids, settings, landed.last_event_at))
    users, user_count = dense_index(pairs, ["user_id"], "user_idx", keep)
    items, item_count = dense_index(pairs, ITEM_COLUMNS, "item_idx", keep)
    indexed = keep(
        pairs.join(users, "user_id")
        .join(items, list(ITEM_COLUMNS))
        .select("user_idx", "item_idx", "confidence", F.col("first_bid_at").alias("at")),
    )
    if indexed.limit(1).count() == 0:
        raise EvaluationError("no usable bids: nothing to learn from or evaluate")
    return Tables(bids, pairs, users, items, indexed, user_count, item_count)


def _documents(
    fitted: ALSModel,
    tables: Tables,
    landed: landing.Landed,
    live: DataFrame,
    settings: Settings,
    keep: Kept,
) -> DataFrame:
    """One row per user: ``user_id``, ``source``, ``items`` (best first)."""
    size = settings.recs_per_user
    won = keep(ranking.won_items(tables.bids, landed.listings, landed.listing_count))

    per_user = tables.indexed.groupBy("user_idx").agg(F.count(F.lit(1)).alias("_items"))
    # Kept, as small as the users: the picks join it three times.
    eligible = broadcast_if_small(
        keep(
            per_user.filter(F.col("_items") >= MIN_ALS_INTERACTIONS)
            .select("user_idx")
            .join(tables.users, "user_idx")
        ),
        tables.user_count,
    )
    # Kept: both the lists and the choice of who falls back read it.
    als_picks = keep(
        ranking.als_picks(fitted, eligible, tables.users, tables.items, live, won, size)
    )

    # Everyone the model left without a list gets popularity: each user is in one of the two.
    fallback_users = broadcast_if_small(
        keep(tables.users.join(als_picks.select("user_idx").distinct(), "user_idx", "left_anti")),
        tables.user_count,
    )
    user_categories = (
        tables.indexed.join(fallback_users, "user_idx")
        .join(tables.items, "item_idx")
        .select("user_id", "category")
        .distinct()
    )
    popular = ranking.popularity_lists(fallback_users, user_categories, live, won, size)
    return ranking.als_lists(als_picks).unionByName(popular)


def _publish(
    documents: DataFrame,
    manifest: dict[str, Any],
    settings: Settings,
    bucket: str,
    run_id: str,
    generated_at: str,
) -> None:
    """Documents, batch file and manifest under the run's prefix; the pointer last."""
    s3 = publish.s3_client(settings)
    written = publish.write_user_documents(documents, settings, bucket, run_id, generated_at)
    manifest["counts"]["documents_written"] = written["written"]
    manifest["counts"]["documents_skipped"] = written["skipped"]
    publish.write_batch_output(s3, documents, bucket, run_id)
    publish.put_json(s3, bucket, layout.manifest_key(run_id), manifest)
    publish.switch_pointer(s3, bucket, run_id, _iso(datetime.now(UTC)))


def _counts(
    landed: dict[str, int], tables: Tables, live: DataFrame, documents: DataFrame
) -> dict[str, int]:
    sources = (ranking.SOURCE_ALS, ranking.SOURCE_CATEGORY, ranking.SOURCE_GLOBAL)
    row: Any = documents.agg(
        F.count(F.lit(1)).alias("users"),
        *(F.sum((F.col("source") == source).cast("int")).alias(source) for source in sources),
        F.sum((F.size("items") == 0).cast("int")).alias("empty"),
    ).first()
    by_source = {source: int(row[source] or 0) for source in sources}
    empty = int(row["empty"] or 0)
    counts = {
        **landed,
        "interactions": tables.pairs.count(),
        "users": int(row["users"]),
        "users_als": by_source[ranking.SOURCE_ALS],
        "users_fallback": int(row["users"]) - by_source[ranking.SOURCE_ALS],
        "users_popular_category": by_source[ranking.SOURCE_CATEGORY],
        "users_popular_global": by_source[ranking.SOURCE_GLOBAL],
        "users_without_items": empty,
        "items": tables.item_count,
        "live_listings": live.count(),
    }
    if empty:
        logger.warning("%d users got an empty list: no live listing is left for them", empty)
    return counts


def _sample(documents: DataFrame) -> dict[str, list[str]]:
    """Titles for a few users in user id order: users with ALS lists first, empty lists last."""
    rows = (
        documents.orderBy(F.size("items") == 0, F.col("source") != ranking.SOURCE_ALS, "user_id")
        .limit(SAMPLE_USERS)
        .collect()
    )
    return {row["user_id"]: [item["title"] for item in row["items"]] for row in rows}


def _manifest(
    run_id: str,
    generated_at: str,
    params: AlsParams,
    settings: Settings,
    landed: landing.Landed,
    counts: dict[str, int],
    scores: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": publish.DOCUMENT_SCHEMA_VERSION,
        "run_id": run_id,
        "generated_at": generated_at,
        "model": {
            "version": f"als-{run_id}",
            "algorithm": "spark.ml ALS, implicit preferences",
            "params": params.as_dict(),
            "confidence": {
                "weight_bid_count": settings.weight_bid_count,
                "weight_amount": settings.weight_amount,
                "recency_half_life_days": settings.recency_half_life_days,
            },
            "recs_per_user": settings.recs_per_user,
        },
        "data_window": {
            "first_event_at": _iso(landed.first_event_at),
            "last_event_at": _iso(landed.last_event_at),
            "recency_as_of": _iso(landed.last_event_at),
        },
        "counts": counts,
        "metrics": {"als": scores["als"], "popularity": scores["popularity"]},
        "evaluation": {
            name: value for name, value in scores.items() if name not in {"als", "popularity"}
        },
        "outputs": {
            "users": layout.run_prefix(run_id) + "users/",
            "batch": layout.batch_output_key(run_id),
        },
    }


def _iso(moment: datetime) -> str:
    """ISO-8601 UTC; a naive time (as Spark returns them) is read as the local time zone."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def main(argv: list[str] | None = None) -> int:
    """``spark-submit batch/recommend.py --bucket B [--scheme s3]``: one nightly run."""
    parser = argparse.ArgumentParser(description="Compute and publish tonight's recommendations.")
    parser.add_argument("--bucket", help="the pipeline's bucket (default: ENCORE_BUCKET)")
    parser.add_argument(
        "--scheme",
        choices=("s3", "s3a"),
        default="s3a",
        help="s3 on EMR, s3a elsewhere (default: s3a)",
    )
    parser.add_argument("--run-id", help="default: the start time, YYYYMMDDTHHMMSSZ")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    try:
        settings = Settings.load()
    except SettingsError as exc:
        logger.error("%s", exc)
        return 2
    bucket = args.bucket or settings.bucket
    spark = (
        SparkSession.builder.appName("encore-recommend")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    try:
        summary = run_nightly(spark, f"{args.scheme}://{bucket}", settings, run_id=args.run_id)
    except (LandingError, EvaluationError, publish.PublishError) as exc:
        logger.error("nightly run failed: %s", exc)
        return 1
    finally:
        spark.stop()
    output.info("%s", json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
