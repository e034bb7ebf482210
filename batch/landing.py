"""Read the landed change events and rebuild bids and listing states from them.

Everything the nightly job knows comes from the CSV files Firehose lands
under ``landing/`` (the contract is :mod:`encore.events`). Delivery is at
least once, so the same event may be landed twice: events are counted once
per ``event_id``. A copy is the same record delivered again, so it changes
no state either: where copies meet, they rank equal and either one wins
with the same values. That is why the files are parsed and checked in one
pass, with no separate pass that drops the copies first.

Ordering
--------
Of the changes of one row, the latest stands: the rule is
:mod:`encore.changes`, which the streaming feeds apply too. In short: the
commit LSN compared as a position in the WAL (``"A/0"`` sorts after
``"10/0"`` as text although it comes first), then the commit time; between
two changes of one row in one transaction, an update over the insert, a
delete over both, and a closed status (``sold``, ``ended``) over ``live``,
because a listing never reopens.

* A **bid** is the latest state of a bid row (insert, then any updates) that
  was not later deleted.
* A **listing state** is the latest listing event per ``listing_id``; its
  title, category and price come from the latest event that is not a delete
  (a delete carries only the key), and a deleted listing has status
  ``deleted``.

Rows that break the contract (no event id, an unknown type or operation, an
LSN that is not one) and bids without a bidder or a known listing are not
used; each kind is counted in :attr:`Landed.counts` and logged at warning.

Limitations: the streaming job quarantines unparseable rows with their
reason; this job only counts them. Every night reads the whole landing
prefix again: there is no compaction of old events yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from batch.interactions import broadcast_if_small
from encore import changes, events, layout

logger = logging.getLogger(__name__)

LSN_PATTERN = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"
#: Contract columns the nightly job has no use for: listings carry their category titles.
UNREAD_COLUMNS = ("schema_version", "category_id", "sub_category_id", "description")


class LandingError(RuntimeError):
    """The landed events cannot be read; the message says where and what to do."""


@dataclass
class Landed:
    """What the landing prefix says about bids and listings, with the counts of what was not used.

    ``bids``: bid_key, listing_id, bidder_id, amount, placed_at, commit_time.
    ``listings``: listing_id, seller_id, title, category, sub_category, price,
    status, ends_at; ``listing_count``: how many listings there are. Both
    frames are cached, because every later step of the night reads them: call
    :meth:`release` when done, or the next read of the same prefix is answered
    from this cache and misses newly landed files.
    """

    bids: DataFrame
    listings: DataFrame
    counts: dict[str, int]
    listing_count: int
    first_event_at: datetime
    last_event_at: datetime
    cached: list[DataFrame] = field(default_factory=list)

    def release(self) -> None:
        for frame in self.cached:
            frame.unpersist()


def landing_uri(base_uri: str) -> str:
    return f"{base_uri.rstrip('/')}/{layout.LANDING_PREFIX}"


def read_events(spark: SparkSession, base_uri: str) -> DataFrame:
    """Every landed CSV file under ``landing/``, read with the contract's schema."""
    path = landing_uri(base_uri)
    try:
        return spark.read.csv(
            path,
            schema=events.spark_ddl(),
            header=False,
            multiLine=True,
            escape='"',
            recursiveFileLookup=True,
            mode="PERMISSIVE",
        )
    except AnalysisException as exc:
        raise LandingError(
            f"no landed events under {path}: run the capture and the landing first"
        ) from exc


def load_landed(spark: SparkSession, base_uri: str) -> Landed:
    """Read and check the landed events, count them once each; rebuild bids and listings."""
    # The files are parsed once: the checked rows stay cached until the run releases them.
    # Columns the night never reads are not parsed or cached (descriptions can be long).
    raw = (
        read_events(spark, base_uri).drop(*UNREAD_COLUMNS).withColumn("_valid", _is_valid()).cache()
    )
    # One row per event id with how many copies were landed; other rows share the null id.
    per_event = raw.groupBy(F.when(F.col("_valid"), F.col("event_id")).alias("_id")).agg(
        F.count(F.lit(1)).alias("copies"),
        F.sum(F.when(~F.col("_valid"), 1).otherwise(0)).alias("malformed"),
        F.max(_when_bid_op("insert")).alias("bid_insert"),
        F.max(F.when(F.col("event_type") == "bid", 1).otherwise(0)).alias("bid_event"),
        F.min("commit_time").alias("first"),
        F.max("commit_time").alias("last"),
    )
    is_event = F.col("_id").isNotNull()
    summary = per_event.agg(
        F.sum("copies").alias("rows"),
        F.sum("malformed").alias("malformed"),
        F.count("_id").alias("events"),
        F.sum(F.when(is_event, F.col("bid_insert"))).alias("bid_inserts"),
        F.sum(F.when(is_event, F.col("bid_event"))).alias("bid_events"),
        F.min(F.when(is_event, F.col("first"))).alias("first"),
        F.max(F.when(is_event, F.col("last"))).alias("last"),
    ).first()
    if summary is None or not summary["events"]:
        raw.unpersist()
        raise LandingError(f"no valid events under {landing_uri(base_uri)}")

    # Copies of one event are the same record delivered again: every ordering below ranks
    # them equal, so whichever copy wins carries the same values and nothing is counted twice.
    landed = raw.filter("_valid").drop("_valid")
    listings = listing_states(landed).cache()
    listing_count = listings.count()
    checked = _checked_bids(latest_bids(landed), listings, listing_count).cache()
    bid_counts = _bid_counts(checked)
    # Bids and listings are cached now: the parsed rows are not read again.
    raw.unpersist()
    counts = {
        "rows_read": int(summary["rows"]),
        "malformed_rows": int(summary["malformed"] or 0),
        "events": int(summary["events"]),
        "duplicates_removed": int(summary["rows"] - summary["malformed"] - summary["events"]),
        "bid_events": int(summary["bid_events"] or 0),
        "bid_insert_events": int(summary["bid_inserts"] or 0),
        **bid_counts,
    }
    for name in ("malformed_rows", "bids_without_bidder", "bids_without_listing"):
        if counts[name]:
            logger.warning("%s: %d not used for recommendations", name, counts[name])
    logger.info("landed events read: %s", counts)
    usable = checked.filter(F.col("bidder_id").isNotNull() & F.col("_known")).drop("_known")
    return Landed(
        usable,
        listings,
        counts,
        listing_count,
        summary["first"],
        summary["last"],
        cached=[listings, checked],
    )


def _is_valid() -> Column:
    return (
        F.col("event_id").isNotNull()
        & F.col("event_type").isin(*events.EVENT_TYPES)
        & F.col("op").isin(*events.OPERATIONS)
        & F.coalesce(F.col("commit_lsn").rlike(LSN_PATTERN), F.lit(False))
        & F.col("commit_time").isNotNull()
    )


def _when_bid_op(op: str) -> Column:
    return F.when((F.col("event_type") == "bid") & (F.col("op") == op), 1).otherwise(0)


def listing_states(unique: DataFrame) -> DataFrame:
    """The latest state of every listing (see the module docstring)."""
    listing_events = unique.filter(
        (F.col("event_type") == "listing") & F.col("listing_id").isNotNull()
    )
    latest = changes.latest_per_key(listing_events, "listing_id").select(
        "listing_id", F.col("op").alias("last_op"), F.col("status").alias("last_status")
    )
    attributes = changes.latest_per_key(
        listing_events.filter(F.col("op") != "delete"), "listing_id"
    ).select(
        "listing_id",
        "seller_id",
        F.trim("title").alias("title"),
        F.coalesce(F.trim("category"), F.lit("")).alias("category"),
        F.coalesce(F.trim("sub_category"), F.lit("")).alias("sub_category"),
        "price",
        "ends_at",
    )
    status = F.when(F.col("last_op") == "delete", F.lit("deleted")).otherwise(F.col("last_status"))
    return latest.join(attributes, "listing_id", "left").select(
        "listing_id",
        "seller_id",
        "title",
        "category",
        "sub_category",
        "price",
        status.alias("status"),
        "ends_at",
    )


def latest_bids(unique: DataFrame) -> DataFrame:
    """Bids as they stand: the latest event per bid row, deletes removed."""
    bid_events = unique.filter(F.col("event_type") == "bid").withColumn(
        "bid_key", F.coalesce("bid_id", "table_key")
    )
    return (
        changes.latest_per_key(bid_events, "bid_key")
        .filter(F.col("op") != "delete")
        .select(
            "bid_key",
            "listing_id",
            F.when(F.col("bidder_id") != "", F.col("bidder_id")).alias("bidder_id"),
            F.coalesce("amount", F.lit(0)).cast("decimal(18,2)").alias("amount"),
            "placed_at",
            "commit_time",
        )
    )


def _checked_bids(bids: DataFrame, listings: DataFrame, listing_count: int) -> DataFrame:
    """``bids`` with ``_known``: true when a listing event names the bid's listing and its title.

    The listing ids are broadcast while there are no more than
    ``BROADCAST_INDEX_ROWS`` listings (:func:`batch.interactions.broadcast_if_small`):
    a few bytes per listing, and the bids, many times more, then stay where
    they are instead of being shuffled.
    """
    titled = listings.filter(F.col("title").isNotNull()).select(
        "listing_id", F.lit(True).alias("_known")
    )
    return bids.join(broadcast_if_small(titled, listing_count), "listing_id", "left")


def _bid_counts(checked: DataFrame) -> dict[str, int]:
    """How many bids there are, and how many lack a bidder or a known listing."""
    row: Any = checked.agg(
        F.count(F.lit(1)).alias("bids"),
        F.sum(F.when(F.col("bidder_id").isNull(), 1).otherwise(0)).alias("no_bidder"),
        F.sum(
            F.when(F.col("bidder_id").isNotNull() & F.col("_known").isNull(), 1).otherwise(0)
        ).alias("no_listing"),
    ).first()
    return {
        "bids": int(row["bids"]),
        "bids_without_bidder": int(row["no_bidder"] or 0),
        "bids_without_listing": int(row["no_listing"] or 0),
    }
