"""The popularity job's state: the events of listings still in play, and totals of the rest.

A feed needs every event of a listing that can still be ranked or changed, but
only the totals of a listing whose auction is over. So the state has two tiers:

* **Events**: every distinct event (one row per ``event_id``, the first stored
  copy) of the listings still in play.
* **Folded**: a listing leaves the events tier (is *folded*) once nothing can
  change it any more:

  - it is closed (sold, ended or deleted) and has had no change for
    ``watermark_s``; or
  - it is known only from its bids (the capture began after it was listed) and has
    had no change for a week plus ``watermark_s``, so every window is empty.

  Its standing bids, their amount and its events are added to running totals
  (per category), and its id is kept. An event for a folded listing can only
  arrive later than the watermark; it is quarantined with that reason, counted
  as ``unapplied_events``, and not applied, so it can neither bring the listing
  back into the feeds nor count a bid twice.

A batch's cost therefore follows the listings in play, not the whole history.

Versions
--------
Batch ``n`` reads the newest version before ``n`` and writes version ``n``:

* ``state/popularity/events/batch_id=<n>/``: the events the batch added (Parquet);
  the events tier is these with the folders of earlier batches that the version
  names. After a fold, or once :data:`MAX_EVENT_PARTS` folders are named, the
  batch writes the whole events tier into its folder instead;
* ``state/popularity/folded/batch_id=<n>/``: ids of the listings folded at ``n``;
* ``state/popularity/progress/batch_id=<n>.json``: the running figures
  (:class:`spark_streaming.feeds.Progress`), the folded totals per category and
  which event and folded-id folders are in effect. It is written last, in one PUT: a
  version without it does not exist.

A batch run again after a crash reads the same earlier version and writes the
same version ``n`` again. After a batch, versions older than the one before it
are deleted, with any event or folded-id folder neither of the two names; when
more than :data:`MAX_FOLDED_PARTS` folded-id folders are in effect, a batch copies
them all into its own folder.

The events tier is searched for listings to fold only once it has grown by
:data:`FOLD_SHARE` since the last search, and folding waits until the foldable
listings hold that share of it, so that both happen now and then rather than at
every batch.

Limitations: a bid delete may carry only the bid's key; one that arrives for a
bid of a folded listing is not recognised as late and, having nothing to delete,
changes no figure; the folded totals still count the bid. Folded ids are kept for
ever: one short row per listing that ever closed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType, LongType, StringType, StructField, StructType

from encore import events, layout
from spark_streaming import feeds, landing

logger = logging.getLogger(__name__)

#: Contract columns kept in the state; the free-text description is not needed for feeds.
STATE_COLUMNS: tuple[str, ...] = tuple(name for name in events.COLUMNS if name != "description")
#: The events tier: ``batch_id`` is the batch that stored the event's first copy.
EVENTS_SCHEMA = StructType(
    [StructField(name, landing.contract_type(name)) for name in STATE_COLUMNS]
    + [
        StructField(landing.SOURCE_COLUMN, StringType()),
        StructField("late", BooleanType()),
        StructField("batch_id", LongType()),
    ]
)
FOLDED_SCHEMA = StructType([StructField("listing_id", StringType())])

#: Fold once the foldable listings hold this share of the events tier.
FOLD_SHARE = 0.1
#: Folded-id folders in effect before a batch copies them into one.
MAX_FOLDED_PARTS = 32
#: Event folders in effect before a batch writes the events in full.
MAX_EVENT_PARTS = 16


def prefix(base_uri: str, part: str) -> str:
    return f"{base_uri}/{layout.POPULARITY_STATE_PREFIX}{part}/"


def latest(spark: SparkSession, base_uri: str, before: int | None = None) -> feeds.Progress | None:
    """The newest complete version (before batch ``before``, if given), or None."""
    numbers = [n for n in _progress_batches(spark, base_uri) if before is None or n < before]
    if not numbers:
        return None
    text = _read_text(spark, f"{prefix(base_uri, 'progress')}batch_id={max(numbers)}.json")
    return feeds.Progress.from_json(json.loads(text))


def read_events(spark: SparkSession, base_uri: str, progress: feeds.Progress | None) -> DataFrame:
    """The events tier of ``progress``'s version (empty before the first batch)."""
    if progress is None or not progress.event_parts:
        return spark.createDataFrame([], EVENTS_SCHEMA)
    uris = [f"{prefix(base_uri, 'events')}batch_id={n}/" for n in progress.event_parts]
    return spark.read.schema(EVENTS_SCHEMA).parquet(*uris)


def read_folded(spark: SparkSession, base_uri: str, progress: feeds.Progress | None) -> DataFrame:
    """Ids of every listing folded up to ``progress``'s version."""
    if progress is None or not progress.folded.parts:
        return spark.createDataFrame([], FOLDED_SCHEMA)
    uris = [f"{prefix(base_uri, 'folded')}batch_id={n}/" for n in progress.folded.parts]
    return spark.read.schema(FOLDED_SCHEMA).parquet(*uris)


def split_folded(
    batch: DataFrame, folded_ids: DataFrame, previous: feeds.Progress | None
) -> tuple[DataFrame, DataFrame]:
    """The batch's events for listings in play, and those for folded listings."""
    if previous is None or not previous.folded.parts:
        return batch, batch.limit(0)
    ids = folded_ids.select("listing_id").distinct()
    return (
        batch.join(ids, "listing_id", "left_anti"),
        batch.join(ids, "listing_id", "left_semi"),
    )


def merge(
    spark: SparkSession,
    base_uri: str,
    previous: feeds.Progress | None,
    applied: DataFrame,
    batch_id: int,
    unapplied: int,
) -> tuple[DataFrame, feeds.Progress, bool]:
    """``previous``'s events plus the batch's ``applied`` ones, one row per event id
    (persisted: the caller unpersists it), the running figures with the batch added,
    and whether any stored row changed (so that the events must be written in full).

    ``applied`` has the columns of :data:`EVENTS_SCHEMA` but ``batch_id``; ``unapplied``
    counts the batch's events for folded listings. A bid delete that names only its
    bid is stored with the bid's listing, when an earlier change of the bid named it.
    """
    start = previous or feeds.Progress(batch_id=-1)
    batch_rows = applied.withColumn("batch_id", F.lit(batch_id).cast(LongType())).select(
        *EVENTS_SCHEMA.names
    )
    figures = batch_rows.agg(
        F.count(F.lit(1)).alias("rows"),
        F.max(F.when(F.col("event_type") == "bid", F.unix_micros("placed_at"))).alias("bid"),
        F.max(F.unix_micros(F.coalesce("placed_at", "commit_time"))).alias("complete"),
        F.max(F.unix_micros(_changed_at())).alias("changed"),
        F.count(F.when(F.col("listing_id").isNull(), True)).alias("keyless"),
    ).first()
    assert figures is not None  # a global aggregate has one row
    # The stored rows are distinct already: only the batch's new ones need finding.
    stored = read_events(spark, base_uri, previous)
    new = _first_copies(batch_rows).join(stored.select("event_id"), "event_id", "left_anti")
    merged = stored.unionByName(new)
    if figures["keyless"]:
        merged = _with_bid_listings(merged)
    merged = merged.persist()
    progress = replace(
        start,
        batch_id=batch_id,
        state_events=merged.count(),
        stored_rows=start.stored_rows + figures["rows"],
        newest_bid_us=_newest(start.newest_bid_us, figures["bid"]),
        complete_up_to_us=_newest(start.complete_up_to_us, figures["complete"]),
        newest_change_us=_newest(start.newest_change_us, figures["changed"]),
        unapplied_events=start.unapplied_events + unapplied,
        folded=replace(start.folded, late_in_batch=0),
    )
    return merged, progress, bool(figures["keyless"])


def _first_copies(rows: DataFrame) -> DataFrame:
    """One row per event id of one batch's rows: the copy from the first source file."""
    first = Window.partitionBy("event_id").orderBy(F.col(landing.SOURCE_COLUMN), F.col("late"))
    return rows.withColumn("_copy", F.row_number().over(first)).filter("_copy = 1").drop("_copy")


def _with_bid_listings(events: DataFrame) -> DataFrame:
    """Give each bid event without a listing the listing another change of its bid names."""
    named = (
        events.filter((F.col("event_type") == "bid") & F.col("listing_id").isNotNull())
        .groupBy("bid_id")
        .agg(F.max("listing_id").alias("_named"))
    )
    return (
        events.join(named, "bid_id", "left")
        .withColumn("listing_id", F.coalesce("listing_id", "_named"))
        .select(*EVENTS_SCHEMA.names)
    )


def _changed_at() -> Column:
    """When an event last touched its row: the later of its commit and its bid time."""
    return F.greatest("placed_at", "commit_time")


def _newest(current: int | None, candidate: int | None) -> int | None:
    values = [value for value in (current, candidate) if value is not None]
    return max(values) if values else None


def _owner() -> Column:
    """What an event is folded with: its listing, or for a bid event whose listing is
    unknown (an orphan), its bid."""
    return F.coalesce(
        F.concat(F.lit("listing:"), F.col("listing_id")), F.concat(F.lit("bid:"), F.col("bid_id"))
    )


def fold(
    spark: SparkSession,
    base_uri: str,
    events: DataFrame,
    tables: feeds.Tables,
    progress: feeds.Progress,
    watermark_s: float,
) -> tuple[DataFrame, feeds.Tables, feeds.Progress]:
    """Fold what can be folded out of ``events``, if it is worth it (see the module).

    ``tables`` are the listing attributes and figures of ``events``. Returns the
    events and tables to keep, and ``progress`` with the folded listings added; the
    folded ids are written as ``folded/batch_id=<n>/``.
    """
    grown = progress.state_events - progress.fold_checked_at
    newest_us = progress.newest_change_us
    if newest_us is None or grown < FOLD_SHARE * progress.fold_checked_at:
        return events, tables, progress
    progress = replace(progress, fold_checked_at=progress.state_events)
    watermark_us = round(watermark_s * 1_000_000)
    closed_before = newest_us - watermark_us
    quiet_before = closed_before - feeds.WEEK_S * 1_000_000

    late = F.coalesce(F.col("late"), F.lit(False))
    per_owner = events.groupBy(_owner().alias("owner"), "listing_id").agg(
        F.max(F.unix_micros(_changed_at())).alias("last_us"),
        F.count(F.lit(1)).alias("events"),
        F.count(F.when(F.col("event_type") == "bid", True)).alias("bid_events"),
        F.count(F.when(late, True)).alias("late"),
        F.count(F.when(late & (F.col("batch_id") == progress.batch_id), True)).alias(
            "late_in_batch"
        ),
    )
    attributes = tables.attributes.select("listing_id", "status", "deleted", "category")
    closed = F.col("deleted") | (F.col("status").isNotNull() & (F.col("status") != "live"))
    foldable = (
        per_owner.join(attributes, "listing_id", "left")
        .filter(
            F.when(
                F.col("deleted").isNotNull(), closed & (F.col("last_us") < closed_before)
            ).otherwise(F.col("last_us") < quiet_before)
        )
        .persist()
    )
    try:
        counts = foldable.agg(
            F.coalesce(F.sum("events"), F.lit(0)).alias("events"),
            F.coalesce(F.sum("bid_events"), F.lit(0)).alias("bid_events"),
            F.coalesce(F.sum("late"), F.lit(0)).alias("late"),
            F.coalesce(F.sum("late_in_batch"), F.lit(0)).alias("late_in_batch"),
            F.count("listing_id").alias("listings"),
        ).first()
        assert counts is not None
        if counts["events"] == 0 or counts["events"] < FOLD_SHARE * progress.state_events:
            return events, tables, progress
        totals = _folded_totals(foldable, tables.figures, progress.folded.totals)
        _write_folded_ids(spark, base_uri, foldable, progress)
        # Kept apart from the lineage, so that writing the state and the feeds do not
        # find the foldable listings again.
        gone = foldable.select("owner", "listing_id").localCheckpoint()
    finally:
        foldable.unpersist()

    kept = events.withColumn("owner", _owner()).join(gone.select("owner"), "owner", "left_anti")
    listings = gone.filter(F.col("listing_id").isNotNull()).select("listing_id")
    kept_tables = feeds.Tables(
        attributes=tables.attributes.join(listings, "listing_id", "left_anti"),
        figures=tables.figures.join(listings, "listing_id", "left_anti"),
    )
    logger.info(
        "batch %d: folded %d listings (%d events) into the totals",
        progress.batch_id,
        counts["listings"],
        counts["events"],
    )
    parts = (*progress.folded.parts, progress.batch_id)
    folded = progress.folded
    return (
        kept.select(*EVENTS_SCHEMA.names),
        kept_tables,
        replace(
            progress,
            state_events=progress.state_events - counts["events"],
            fold_checked_at=progress.state_events - counts["events"],
            folded=feeds.Folded(
                listings=folded.listings + counts["listings"],
                events=folded.events + counts["events"],
                bid_events=folded.bid_events + counts["bid_events"],
                late_events=folded.late_events + counts["late"],
                late_in_batch=counts["late_in_batch"],
                parts=parts if len(parts) <= MAX_FOLDED_PARTS else (progress.batch_id,),
                totals=totals,
            ),
        ),
    )


def _folded_totals(
    foldable: DataFrame, figures: DataFrame, totals: Mapping[str | None, feeds.Totals]
) -> dict[str | None, feeds.Totals]:
    """``totals`` plus the foldable listings' standing bids, amounts and listings per
    category. A category of a listing without bids that was not deleted is kept with
    zeros, as :func:`spark_streaming.feeds.compute_snapshot` keeps it, so its feed is
    still published."""
    with_bids = figures.select("listing_id", "bids_all", "amount_all")
    rows = (
        foldable.filter(F.col("listing_id").isNotNull())
        .join(with_bids, "listing_id", "left")
        .filter(F.col("bids_all").isNotNull() | ~F.coalesce(F.col("deleted"), F.lit(True)))
        .groupBy("category")
        .agg(
            F.coalesce(F.sum("bids_all"), F.lit(0)).alias("bids"),
            F.coalesce(F.sum("amount_all"), F.lit(0)).cast(feeds.AMOUNT_TYPE).alias("amount"),
            F.count("bids_all").alias("listings"),
        )
        .collect()
    )
    added = dict(totals)
    for row in rows:
        one = feeds.Totals(int(row["bids"]), row["amount"], int(row["listings"]))
        added[row["category"]] = added.get(row["category"], feeds.Totals()) + one
    return added


def _write_folded_ids(
    spark: SparkSession, base_uri: str, foldable: DataFrame, progress: feeds.Progress
) -> None:
    """Write the ids folded by this batch, with every earlier one once there are too many
    folders."""
    ids = foldable.filter(F.col("listing_id").isNotNull()).select("listing_id")
    if len(progress.folded.parts) + 1 > MAX_FOLDED_PARTS:
        ids = ids.unionByName(read_folded(spark, base_uri, progress))
    uri = f"{prefix(base_uri, 'folded')}batch_id={progress.batch_id}/"
    ids.write.mode("overwrite").parquet(uri)


def write(
    spark: SparkSession,
    base_uri: str,
    events: DataFrame,
    progress: feeds.Progress,
    previous: feeds.Progress | None,
    *,
    in_full: bool,
) -> feeds.Progress:
    """Write version ``progress.batch_id``: the events, then the progress file; delete what
    no version in use still needs. Returns ``progress`` with the parts of its events.

    The events are written as this batch's new rows beside the earlier parts, or, when
    ``in_full`` (stored rows changed) or the parts reach :data:`MAX_EVENT_PARTS`, in full.
    """
    batch_id = progress.batch_id
    earlier = previous.event_parts if previous else ()
    parts: tuple[int, ...]
    if in_full or not earlier or len(earlier) + 1 > MAX_EVENT_PARTS:
        rows, parts = events, (batch_id,)
    else:
        rows, parts = events.filter(F.col("batch_id") == batch_id), (*earlier, batch_id)
    rows.write.mode("overwrite").parquet(f"{prefix(base_uri, 'events')}batch_id={batch_id}/")
    progress = replace(progress, event_parts=parts)
    write_text(
        spark,
        f"{prefix(base_uri, 'progress')}batch_id={batch_id}.json",
        json.dumps(progress.as_json(), indent=1),
    )
    _collect_garbage(spark, base_uri, progress, previous)
    return progress


def _collect_garbage(
    spark: SparkSession,
    base_uri: str,
    current: feeds.Progress,
    previous: feeds.Progress | None,
) -> None:
    """Delete versions before ``previous``, and event and folded-id parts neither names."""
    versions = [current, *([previous] if previous else [])]
    keep = {version.batch_id for version in versions}
    events = {part for version in versions for part in version.event_parts}
    folded = {part for version in versions for part in version.folded.parts}
    for name, wanted in (("progress", keep), ("events", events), ("folded", folded)):
        for number, path in _numbered(spark, prefix(base_uri, name)):
            if number < current.batch_id and number not in wanted:
                path.getFileSystem(spark._jsc.hadoopConfiguration()).delete(path, True)


def _progress_batches(spark: SparkSession, base_uri: str) -> list[int]:
    return [number for number, _ in _numbered(spark, prefix(base_uri, "progress"))]


def _numbered(spark: SparkSession, folder: str) -> list[tuple[int, Any]]:
    """``(n, path)`` of each ``batch_id=<n>`` entry in ``folder`` (none if it is missing)."""
    path = _path(spark, folder)
    filesystem = path.getFileSystem(spark._jsc.hadoopConfiguration())
    if not filesystem.exists(path):
        return []
    found = []
    for status in filesystem.listStatus(path):
        name = str(status.getPath().getName())
        number = name.removeprefix("batch_id=").removesuffix(".json")
        if name.startswith("batch_id=") and number.isdigit():
            found.append((int(number), status.getPath()))
    return found


def _path(spark: SparkSession, uri: str) -> Any:
    jvm = spark._jvm
    assert jvm is not None  # set for every live session
    return jvm.org.apache.hadoop.fs.Path(uri)


def _read_text(spark: SparkSession, uri: str) -> str:
    path = _path(spark, uri)
    stream = path.getFileSystem(spark._jsc.hadoopConfiguration()).open(path)
    try:
        jvm = spark._jvm
        assert jvm is not None
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def write_text(spark: SparkSession, uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` as one object: on S3 a single PUT, so readers see the
    old object or the new one, never part of one.

    Limitations: if writing the bytes fails, the stream is left unclosed on purpose
    (closing it would upload what was written so far); its buffer is freed when the
    JVM collects it.
    """
    payload = text.encode()
    path = _path(spark, uri)
    stream = path.getFileSystem(spark._jsc.hadoopConfiguration()).create(path, True)
    stream.write(bytearray(payload))
    stream.close()
    logger.debug("wrote %s (%d bytes)", uri, len(payload))


def exists(spark: SparkSession, uri: str) -> bool:
    path = _path(spark, uri)
    return bool(path.getFileSystem(spark._jsc.hadoopConfiguration()).exists(path))
