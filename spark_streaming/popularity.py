"""Popularity feeds: a Structured Streaming job from landed change events to JSON feeds.

Run on EMR with ``spark-submit --py-files pyfiles.zip spark_streaming/popularity.py
--bucket B`` (the archive, built by ``infra.package``, holds the ``encore`` and
``spark_streaming`` packages);
locally the command line calls :func:`run_popularity` with a session from
``local.spark``.

Each micro-batch of landed rows goes through one ``foreachBatch`` step:

1. Check every row against the contract (:mod:`spark_streaming.landing`); rejects go
   to ``quarantine/popularity/batch_id=<n>/`` with their source file and reason.
2. Mark late bids against the newest bid of earlier batches. Events for a listing
   that was folded (closed, and out of the state) are quarantined there too, with
   that reason, and not applied.
3. Write the next version of the state (:mod:`spark_streaming.state`): the earlier
   version's events plus this batch's, one row per event id, less the listings that
   closed and can fold into running totals.
4. Compute every feed from that version (:mod:`spark_streaming.feeds`) and publish
   each as one JSON document.

Spark's checkpoint (``checkpoints/popularity/``) records which landed files each
batch read, so after a restart the stream continues with the files it has not
read, and a batch cut short is run again with the same files and the same id; it
reads the same earlier version of the state and writes the same new one.

Limitations: a category that no longer has any listing keeps its last published
feed. Deleting the checkpoint without deleting the state makes batch ids start
again at 0 while the state's versions go on from where they were: delete both or
neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from encore import layout
from encore.output import output_logger
from encore.settings import Settings, SettingsError
from spark_streaming import feeds, landing, state

logger = logging.getLogger(__name__)
output = output_logger(__name__)


class PopularityError(RuntimeError):
    """The popularity stream stopped with an error."""


@dataclass
class RunCounters:
    """What one call of :func:`run_popularity` did, batch by batch."""

    batches: int = 0
    events_read: int = 0
    quarantined: int = 0
    feeds_written: int = 0
    snapshot: feeds.Snapshot | None = None


def run_popularity(
    spark: SparkSession,
    base_uri: str,
    settings: Settings,
    *,
    available_now: bool = True,
    now: datetime | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Bring the popularity feeds up to date with everything landed under ``base_uri``.

    Parameters
    ----------
    spark
        The session; its Hadoop configuration must reach ``base_uri``.
    base_uri
        The bucket as a URI: ``s3a://bucket`` locally, ``s3://bucket`` on EMR.
    settings
        ``feed_top_n``, ``trending_half_life_s``, ``watermark_s`` and
        ``stream_trigger_s`` are read.
    available_now
        True: process every landed file not yet processed, then return. False: keep
        running, one micro-batch every ``stream_trigger_s``, until the query is stopped.
    now
        The reference time of the windows and the trending decay; by default the
        newest ``placed_at`` seen. A naive datetime is taken as UTC.
    on_batch
        Called after each micro-batch with the number of landed files it read, so a
        caller that counted the unread files can show how far a catch-up has come.

    Returns
    -------
    dict
        ``batches``, ``events_read`` (valid rows, duplicates included),
        ``quarantined`` and ``feeds_written`` count what this call did.
        ``distinct_events``, ``bid_events``, ``duplicates_removed``, ``late_events``,
        ``total_bids``, ``total_amount``, ``listings``, ``reference_time``,
        ``complete_up_to`` and ``top`` (the global feed's items) describe all stored
        events, so a rerun with nothing new returns the same values.
    """
    base_uri = base_uri.rstrip("/")
    now_us = None if now is None else feeds.to_micros(now)
    counters = RunCounters()

    if state.exists(spark, f"{base_uri}/{layout.LANDING_PREFIX}"):
        _run_stream(spark, base_uri, settings, available_now, now_us, counters, on_batch)
    else:
        logger.info("nothing landed under %s%s yet", base_uri, layout.LANDING_PREFIX)

    snapshot = counters.snapshot
    if snapshot is None:
        # No batch ran: nothing changed, so the published feeds stand; report on them.
        progress = state.latest(spark, base_uri)
        snapshot = feeds.Snapshot(reference_us=now_us)
        if progress is not None:
            snapshot = feeds.compute_snapshot(
                state.read_events(spark, base_uri, progress),
                settings,
                now_us=now_us,
                batch_id=None,
                progress=progress,
            )
    summary = _summary(counters, snapshot)
    logger.info(
        "popularity: %d batches, %d events read, %d quarantined, %d late, %d bids totalling %s, "
        "%d feeds written",
        summary["batches"],
        summary["events_read"],
        summary["quarantined"],
        summary["late_events"],
        summary["total_bids"],
        summary["total_amount"],
        summary["feeds_written"],
    )
    return summary


def _run_stream(
    spark: SparkSession,
    base_uri: str,
    settings: Settings,
    available_now: bool,
    now_us: int | None,
    counters: RunCounters,
    on_batch: Callable[[int], None] | None,
) -> None:
    def process_batch(batch: DataFrame, batch_id: int) -> None:
        files = _process_batch(spark, base_uri, settings, now_us, counters, batch, batch_id)
        if on_batch:
            on_batch(files)

    landed = landing.read_landing_stream(spark, f"{base_uri}/{layout.LANDING_PREFIX}")
    writer = landed.writeStream.foreachBatch(process_batch).option(
        "checkpointLocation", f"{base_uri}/{layout.POPULARITY_CHECKPOINT_PREFIX}"
    )
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        trigger_ms = max(1, round(settings.stream_trigger_s * 1000))
        writer = writer.trigger(processingTime=f"{trigger_ms} milliseconds")

    query = writer.queryName("popularity").start()
    try:
        query.awaitTermination()
    except StreamingQueryException as exc:
        raise PopularityError(
            f"popularity stream over {base_uri} failed in a batch; rerun to retry it "
            f"from the checkpoint: {str(exc).splitlines()[0]}"
        ) from exc
    except KeyboardInterrupt:
        logger.warning("interrupted: stopping the popularity stream")
        query.stop()


def _process_batch(
    spark: SparkSession,
    base_uri: str,
    settings: Settings,
    now_us: int | None,
    counters: RunCounters,
    batch: DataFrame,
    batch_id: int,
) -> int:
    """Store, quarantine and publish one micro-batch; return how many landed files it read."""
    previous = state.latest(spark, base_uri, before=batch_id)
    watermark_us = None if previous is None else previous.watermark_us(settings.watermark_s)
    checked = landing.validate(batch).persist()
    try:
        is_valid = F.col(landing.REASON_COLUMN).isNull()
        valid = feeds.mark_late(checked.filter(is_valid), watermark_us)
        applied, unapplied = state.split_folded(
            valid, state.read_folded(spark, base_uri, previous), previous
        )
        applied = applied.select(
            *[name for name in state.EVENTS_SCHEMA.names if name != "batch_id"]
        )
        # Quarantined as they were read, description included, like the unreadable rows.
        unapplied = unapplied.select(
            "listing_id", landing.SOURCE_COLUMN, landing.RECORD_COLUMN
        ).persist()
        counts = checked.agg(
            F.count(F.when(is_valid, True)).alias("valid"),
            F.count(F.when(~is_valid, True)).alias("rejected"),
            F.countDistinct(landing.SOURCE_COLUMN).alias("files"),
        ).first()
        assert counts is not None  # a global aggregate has one row
        events_read, quarantined, files = counts["valid"], counts["rejected"], counts["files"]
        too_late = unapplied.count()
        if quarantined or too_late:
            _quarantine(base_uri, checked.filter(~is_valid), unapplied, batch_id)
        if quarantined:
            logger.warning(
                "batch %d: %d rows could not be read; quarantined in %s",
                batch_id,
                quarantined,
                _quarantine_uri(base_uri, batch_id),
            )
        if too_late:
            logger.warning(
                "batch %d: %d events are for listings that closed and were folded into the "
                "totals before they arrived; quarantined in %s, not applied",
                batch_id,
                too_late,
                _quarantine_uri(base_uri, batch_id),
            )
        merged, progress, changed = state.merge(
            spark, base_uri, previous, applied, batch_id, too_late
        )
        unapplied.unpersist()
    finally:
        checked.unpersist()

    reference_us = feeds.reference_time(now_us, progress)
    tables = feeds.figure_tables(merged, settings, reference_us)
    try:
        kept, kept_tables, progress = state.fold(
            spark, base_uri, merged, tables, progress, settings.watermark_s
        )
        progress = state.write(
            spark, base_uri, kept, progress, previous, in_full=changed or kept is not merged
        )
        snapshot = feeds.compute_snapshot(
            kept,
            settings,
            now_us=now_us,
            batch_id=batch_id,
            progress=progress,
            tables=kept_tables,
        )
    finally:
        tables.figures.unpersist()
        tables.attributes.unpersist()
        merged.unpersist()
    if snapshot.late_in_batch:
        logger.warning(
            "batch %d: %d late bid events (placed more than %s s before a bid of an "
            "earlier batch); they are counted in every feed",
            batch_id,
            snapshot.late_in_batch,
            settings.watermark_s,
        )
    written = _publish_feeds(spark, base_uri, snapshot)

    counters.batches += 1
    counters.events_read += events_read
    counters.quarantined += quarantined
    counters.feeds_written += written
    counters.snapshot = snapshot
    logger.info(
        "batch %d: %d events, %d quarantined, %d feeds published (%d bids in total, "
        "%d events in the state)",
        batch_id,
        events_read,
        quarantined,
        written,
        snapshot.overall.totals.bids,
        snapshot.state_events,
    )
    return int(files)


def _quarantine_uri(base_uri: str, batch_id: int) -> str:
    return f"{base_uri}/{layout.POPULARITY_QUARANTINE_PREFIX}batch_id={batch_id}/"


def _quarantine(base_uri: str, rejected: DataFrame, unapplied: DataFrame, batch_id: int) -> None:
    """Write the rows that could not be read and the events that came too late, with why."""
    columns = (landing.SOURCE_COLUMN, landing.REASON_COLUMN, landing.RECORD_COLUMN)
    too_late = unapplied.select(
        landing.SOURCE_COLUMN,
        F.concat(
            F.lit("listing "),
            F.col("listing_id"),
            F.lit(" closed and was folded into the totals before this event arrived"),
        ).alias(landing.REASON_COLUMN),
        landing.RECORD_COLUMN,
    )
    rejected.select(*columns).unionByName(too_late).write.mode("overwrite").json(
        _quarantine_uri(base_uri, batch_id)
    )


def _publish_feeds(spark: SparkSession, base_uri: str, snapshot: feeds.Snapshot) -> int:
    computed_at = datetime.now(UTC)
    for feed in [snapshot.overall, *snapshot.categories]:
        key = (
            layout.global_feed_key()
            if feed.category is None
            else layout.category_feed_key(feed.category)
        )
        document = feeds.feed_document(
            feed, computed_at=computed_at, complete_up_to_us=snapshot.complete_up_to_us
        )
        state.write_text(
            spark,
            f"{base_uri}/{key}",
            json.dumps(document, ensure_ascii=False, indent=1),
        )
    return 1 + len(snapshot.categories)


def _summary(counters: RunCounters, snapshot: feeds.Snapshot) -> dict[str, Any]:
    return {
        "batches": counters.batches,
        "events_read": counters.events_read,
        "quarantined": counters.quarantined,
        "feeds_written": counters.feeds_written,
        "distinct_events": snapshot.distinct_events,
        "bid_events": snapshot.bid_events,
        "duplicates_removed": snapshot.duplicates_removed,
        "late_events": snapshot.late_events,
        "unapplied_events": snapshot.unapplied_events,
        "state_events": snapshot.state_events,
        "folded_listings": snapshot.folded_listings,
        "total_bids": snapshot.overall.totals.bids,
        "total_amount": f"{snapshot.overall.totals.amount:f}",
        "listings": snapshot.overall.totals.listings,
        "reference_time": feeds.iso_time(snapshot.reference_us),
        "complete_up_to": feeds.iso_time(snapshot.complete_up_to_us),
        "top": snapshot.overall.items,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``spark-submit spark_streaming/popularity.py --bucket B [--scheme s3] [--continuous]``."""
    parser = argparse.ArgumentParser(description="Update the popularity feeds from landed events.")
    parser.add_argument("--bucket", required=True, help="the pipeline's bucket")
    parser.add_argument("--scheme", default="s3", choices=("s3", "s3a"), help="URI scheme")
    parser.add_argument(
        "--continuous", action="store_true", help="keep running until stopped (default: drain)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    try:
        settings = Settings.load(bucket=args.bucket)
    except SettingsError as exc:
        logger.error("%s", exc)
        return 2
    spark = SparkSession.builder.appName("encore-popularity").getOrCreate()
    try:
        summary = run_popularity(
            spark, f"{args.scheme}://{args.bucket}", settings, available_now=not args.continuous
        )
    except PopularityError as exc:
        logger.error("%s", exc)
        return 1
    output.info(
        "%s", json.dumps({key: value for key, value in summary.items() if key != "top"}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
