"""Popularity figures computed from the state, and the feed documents built from them.

Everything here is a pure function of the state (:mod:`spark_streaming.state`): the
distinct events of the listings still in play, plus the running totals of the
listings folded out of it. It never depends on what happened to arrive in one
micro-batch. That is what makes the feeds exact: a duplicate, a retried batch or a
restart can change which copies arrived twice, but not which distinct events
exist, so the feeds come out the same.

How the state is read
---------------------
* Duplicates: copies of one ``event_id`` are one change and count once. Where
  arrival matters (the late mark), the first copy's counts.
* Order of changes: the latest change of a row is the one with the highest commit
  LSN, compared as a number (``1/0`` is after ``0/FFFFFFFF`` and ``0/10`` after
  ``0/9``), then the later commit time, then the operation (a delete is the last
  change a row can have in one transaction), then a closed status. The rule is
  :mod:`encore.changes`, which the nightly job applies too.
* Bids: the latest change of each ``bid_id``; a bid whose latest change is a
  delete no longer exists. Inserts and updates stand.
* Listings: the latest change of each ``listing_id`` gives title, category,
  sub-category and status. A listing leaves the feeds when it is deleted or its
  status is not ``live``. A listing with bids but no listing event yet (the capture
  began after it was created) is treated as live, with no title or category: it
  appears in the global feed but in no category feed, until a week without any
  change folds it out of the state.

Figures per listing
-------------------
The reference time is ``now`` when given, else the newest ``placed_at`` of any bid
event. A bid's age is the reference minus ``placed_at``, floored at zero (a bid
placed after ``now`` counts as brand new). Windows are half-open: the last hour
holds bids with age in ``[0, 3600)`` seconds, likewise 24 h and 7 days.

* ``bids_1h``, ``bids_24h``, ``bids_7d``: bids in the window.
* ``bidders_7d``: distinct bidders in the last week. A bid with an empty bidder is
  kept in every count and amount; for ``bidders_7d`` all of a listing's anonymous
  bids count as one bidder, the least number of people who can have placed them.
* ``amount_7d``: sum of the bids' amounts in the last week, exact decimal.
* ``trending_score``: the sum over the listing's bids of
  ``0.5 ** (age_s / trending_half_life_s)``. Each term is rounded to 28 decimal
  places and summed as a decimal, so the score does not depend on the order in
  which Spark happens to add the terms.

Totals count every standing bid, whatever its listing's status: bids, their
amount and the listings they are on, all time, folded listings included. A
category feed's totals cover the listings of that category.

Late events: when a batch stores its events, a bid placed more than ``watermark_s``
before the newest bid stored by earlier batches is marked late (:func:`mark_late`).
The mark is stored with the event, so a rerun of the batch marks the same events.
A late bid still counts everywhere; it is only counted and logged. The one
exception is an event for a listing already folded out of the state: it is
quarantined and counted as unapplied (see :mod:`spark_streaming.state`).

Limitations: the contract carries no change LSN, so two changes of one row in one
transaction share a commit LSN and commit time. They are ordered by operation
(insert, update, delete), then by status, then by event id, which is arbitrary
between two updates of one row in one transaction that leave the same status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pyspark.sql import DataFrame, Row, Window
from pyspark.sql import functions as F

from encore import changes
from encore.settings import Settings

SCHEMA_VERSION = 1

#: Window name and length in seconds, shortest first.
WINDOWS: tuple[tuple[str, int], ...] = (("1h", 3600), ("24h", 24 * 3600), ("7d", 7 * 24 * 3600))
WEEK_S = WINDOWS[-1][1]

#: What an empty bidder counts as in ``bidders_7d``. Empty fields are read as NULL, so no
#: real bidder has this id.
ANONYMOUS_BIDDER = ""
#: A bid's share of a score is rounded to 28 places: shares down to 1e-28 (a bid 93
#: half-lives old) still count, and 10 integer digits hold any plausible score.
SCORE_TYPE = "DECIMAL(38,28)"
AMOUNT_TYPE = "DECIMAL(28,2)"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Totals:
    bids: int = 0
    amount: Decimal = Decimal("0.00")
    listings: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.bids + other.bids, self.amount + other.amount, self.listings + other.listings
        )

    def as_json(self) -> dict[str, Any]:
        return {"bids": self.bids, "amount": f"{self.amount:f}", "listings": self.listings}


@dataclass(frozen=True)
class Feed:
    """One feed's contents: the global feed (``category`` None) or a category's."""

    category: str | None
    totals: Totals = field(default_factory=Totals)
    items: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Folded:
    """What left the state's events tier: closed listings and their events (see
    :mod:`spark_streaming.state`)."""

    listings: int = 0
    events: int = 0
    bid_events: int = 0
    late_events: int = 0
    #: Late events among those stored by the batch that folded them.
    late_in_batch: int = 0
    #: Batches whose folders hold the folded listing ids in effect.
    parts: tuple[int, ...] = ()
    #: Standing bids, amount and listings folded, per category (None: no category).
    totals: Mapping[str | None, Totals] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "listings": self.listings,
            "events": self.events,
            "bid_events": self.bid_events,
            "late_events": self.late_events,
            "late_in_batch": self.late_in_batch,
            "parts": list(self.parts),
            "categories": [
                {"category": category, **totals.as_json()}
                for category, totals in sorted(
                    self.totals.items(), key=lambda item: (item[0] is not None, item[0] or "")
                )
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Folded:
        return cls(
            listings=data["listings"],
            events=data["events"],
            bid_events=data["bid_events"],
            late_events=data["late_events"],
            late_in_batch=data["late_in_batch"],
            parts=tuple(data["parts"]),
            totals={
                row["category"]: Totals(row["bids"], Decimal(row["amount"]), row["listings"])
                for row in data["categories"]
            },
        )


@dataclass(frozen=True)
class Progress:
    """The running figures of the state after batch ``batch_id``."""

    batch_id: int
    #: Valid event rows applied by every batch so far, duplicates included.
    stored_rows: int = 0
    #: Distinct events in the events tier.
    state_events: int = 0
    newest_bid_us: int | None = None
    #: The newest ``placed_at`` (bids) or ``commit_time`` (other events).
    complete_up_to_us: int | None = None
    #: The newest time an event touched its row: the state's clock for folding.
    newest_change_us: int | None = None
    #: Events that arrived for a folded listing, quarantined rather than applied.
    unapplied_events: int = 0
    #: ``state_events`` when the state was last searched for listings to fold.
    fold_checked_at: int = 0
    #: Batches whose folders hold the events tier.
    event_parts: tuple[int, ...] = ()
    folded: Folded = field(default_factory=Folded)

    def as_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "stored_rows": self.stored_rows,
            "state_events": self.state_events,
            "newest_bid_us": self.newest_bid_us,
            "complete_up_to_us": self.complete_up_to_us,
            "newest_change_us": self.newest_change_us,
            "unapplied_events": self.unapplied_events,
            "fold_checked_at": self.fold_checked_at,
            "event_parts": list(self.event_parts),
            "folded": self.folded.as_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Progress:
        return cls(
            batch_id=data["batch_id"],
            stored_rows=data["stored_rows"],
            state_events=data["state_events"],
            newest_bid_us=data["newest_bid_us"],
            complete_up_to_us=data["complete_up_to_us"],
            newest_change_us=data["newest_change_us"],
            unapplied_events=data["unapplied_events"],
            fold_checked_at=data["fold_checked_at"],
            event_parts=tuple(data["event_parts"]),
            folded=Folded.from_json(data["folded"]),
        )

    def watermark_us(self, watermark_s: float) -> int | None:
        """Bids placed before this are late: the newest bid stored so far, less the watermark."""
        if self.newest_bid_us is None:
            return None
        return self.newest_bid_us - round(watermark_s * 1_000_000)


@dataclass(frozen=True)
class Snapshot:
    """The figures of every feed at one moment, and the counters behind them."""

    stored_rows: int = 0
    distinct_events: int = 0
    bid_events: int = 0
    late_events: int = 0
    late_in_batch: int = 0
    state_events: int = 0
    folded_listings: int = 0
    unapplied_events: int = 0
    reference_us: int | None = None
    complete_up_to_us: int | None = None
    overall: Feed = field(default_factory=lambda: Feed(None))
    categories: list[Feed] = field(default_factory=list)

    @property
    def duplicates_removed(self) -> int:
        return self.stored_rows - self.distinct_events


# Pure functions: the rules, testable without Spark.


def decay_weight(age_s: float, half_life_s: float) -> float:
    """A bid's share of a trending score: 1 when new, halved every ``half_life_s``."""
    return float(0.5 ** (max(age_s, 0.0) / half_life_s))


def to_micros(moment: datetime) -> int:
    """Microseconds since the epoch; a naive ``moment`` is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def iso_time(micros: int | None) -> str | None:
    """ISO-8601 UTC with microseconds, the contract's way of writing a time."""
    if micros is None:
        return None
    return (_EPOCH + timedelta(microseconds=micros)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def feed_item(rank: int, row: Mapping[str, Any]) -> dict[str, Any]:
    """One ranked listing of a feed, from a row of :func:`listing_figures`."""
    return {
        "rank": rank,
        "listing_id": row["listing_id"],
        "title": row["title"],
        "category": row["category"],
        "sub_category": row["sub_category"],
        "bids_1h": row["bids_1h"],
        "bids_24h": row["bids_24h"],
        "bids_7d": row["bids_7d"],
        "bidders_7d": row["bidders_7d"],
        "amount_7d": f"{row['amount_7d']:f}",
        "trending_score": float(row["trending_score"]),
    }


def feed_document(
    feed: Feed, *, computed_at: datetime, complete_up_to_us: int | None
) -> dict[str, Any]:
    """The JSON object published for ``feed``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "feed": "global" if feed.category is None else "category",
        "category": feed.category,
        "computed_at": iso_time(to_micros(computed_at)),
        "complete_up_to": iso_time(complete_up_to_us),
        "totals": feed.totals.as_json(),
        "items": feed.items,
    }


# Spark: the same rules over the stored events.


def mark_late(batch_events: DataFrame, watermark_us: int | None) -> DataFrame:
    """Add ``late``: a bid placed before ``watermark_us`` (None: nothing is late yet)."""
    late = (
        (F.col("event_type") == "bid")
        & F.col("placed_at").isNotNull()
        & (F.unix_micros("placed_at") < F.lit(watermark_us))
    )
    return batch_events.withColumn("late", F.coalesce(late, F.lit(False)))


def event_counts(events: DataFrame, batch_id: int | None) -> Row:
    """Distinct events, bid events and late events of the events tier (one row per event).

    ``late_in_batch`` counts the late events that batch ``batch_id`` stored.
    """
    counts = events.agg(
        F.count(F.lit(1)).alias("distinct_events"),
        F.count(F.when(F.col("event_type") == "bid", True)).alias("bid_events"),
        F.count(F.when(F.col("late"), True)).alias("late_events"),
        F.count(F.when(F.col("late") & (F.col("batch_id") == F.lit(batch_id)), True)).alias(
            "late_in_batch"
        ),
    ).first()
    assert counts is not None  # a global aggregate has one row, even over no rows
    return counts


@dataclass(frozen=True)
class Tables:
    """Per-listing tables of a set of events: latest attributes, and figures of listings
    with standing bids (see :func:`listing_attributes` and :func:`listing_figures`)."""

    attributes: DataFrame
    figures: DataFrame


def reference_time(now_us: int | None, progress: Progress) -> int | None:
    """The moment windows and decay are measured from: ``now``, else the newest bid."""
    return now_us if now_us is not None else progress.newest_bid_us


def figure_tables(events: DataFrame, settings: Settings, reference_us: int | None) -> Tables:
    """The per-listing tables of ``events``, persisted: the caller unpersists them."""
    attributes = listing_attributes(events).persist()
    figures = listing_figures(events, attributes, settings, reference_us or 0).persist()
    return Tables(attributes, figures)


def compute_snapshot(
    events: DataFrame,
    settings: Settings,
    *,
    now_us: int | None,
    batch_id: int | None,
    progress: Progress,
    tables: Tables | None = None,
) -> Snapshot:
    """Every figure of every feed: the events tier's plus what was folded out of it.

    ``batch_id`` names the micro-batch that just stored its events, so that the late
    events it brought can be told apart; None when no batch ran. ``tables``, if given,
    are :func:`figure_tables` of ``events`` at :func:`reference_time`.
    """
    reference_us = reference_time(now_us, progress)
    counts = event_counts(events, batch_id)
    own = tables is None
    if tables is None:
        tables = figure_tables(events, settings, reference_us)
    try:
        ranked = _top_rows(tables.figures, settings.feed_top_n).collect()
        totals = _category_totals(tables.figures, tables.attributes).collect()
    finally:
        if own:
            tables.figures.unpersist()
            tables.attributes.unpersist()

    folded = progress.folded
    overall, categories = _feeds(ranked, _with_folded(totals, folded.totals))
    late_folded = folded.late_in_batch if batch_id == progress.batch_id else 0
    return Snapshot(
        stored_rows=progress.stored_rows,
        distinct_events=counts["distinct_events"] + folded.events,
        bid_events=counts["bid_events"] + folded.bid_events,
        late_events=counts["late_events"] + folded.late_events,
        late_in_batch=counts["late_in_batch"] + late_folded,
        state_events=counts["distinct_events"],
        folded_listings=folded.listings,
        unapplied_events=progress.unapplied_events,
        reference_us=reference_us,
        complete_up_to_us=progress.complete_up_to_us,
        overall=overall,
        categories=categories,
    )


def listing_attributes(events: DataFrame) -> DataFrame:
    """Title, category, sub-category, status and ``deleted`` from each listing's latest change."""
    latest = changes.latest_per_key(events.filter(F.col("event_type") == "listing"), "listing_id")
    return latest.select(
        "listing_id",
        "title",
        "category",
        "sub_category",
        "status",
        (F.col("op") == "delete").alias("deleted"),
    )


def listing_figures(
    events: DataFrame, attributes: DataFrame, settings: Settings, reference_us: int
) -> DataFrame:
    """Per listing with at least one standing bid: window counts, totals, score, attributes."""
    bids = changes.latest_per_key(events.filter(F.col("event_type") == "bid"), "bid_id").filter(
        F.col("op") != "delete"
    )
    age_s = F.greatest(
        F.lit(0.0), (F.lit(reference_us) - F.unix_micros("placed_at")).cast("double") / 1e6
    )
    aged = bids.withColumn("age_s", age_s)
    in_week = F.col("age_s") < WEEK_S
    weight = F.pow(F.lit(0.5), F.col("age_s") / F.lit(settings.trending_half_life_s))

    figures = aged.groupBy("listing_id").agg(
        F.count(F.lit(1)).alias("bids_all"),
        F.sum("amount").cast(AMOUNT_TYPE).alias("amount_all"),
        *[
            F.count(F.when(F.col("age_s") < seconds, True)).alias(f"bids_{name}")
            for name, seconds in WINDOWS
        ],
        # collect_set skips the NULLs of bids outside the week.
        F.size(
            F.collect_set(F.when(in_week, F.coalesce(F.col("bidder_id"), F.lit(ANONYMOUS_BIDDER))))
        ).alias("bidders_7d"),
        F.coalesce(F.sum(F.when(in_week, F.col("amount"))), F.lit(0))
        .cast(AMOUNT_TYPE)
        .alias("amount_7d"),
        F.sum(weight.cast(SCORE_TYPE)).alias("trending_score"),
    )
    return figures.join(attributes, "listing_id", "left").withColumn(
        "in_feed",
        ~F.coalesce(F.col("deleted"), F.lit(False))
        & (F.col("status").isNull() | (F.col("status") == "live")),
    )


def _top_rows(figures: DataFrame, top_n: int) -> DataFrame:
    """The top ``top_n`` live listings overall (``rank`` NULL) and of each category."""
    ranking = (F.col("trending_score").desc(), F.col("listing_id").asc())
    live = figures.filter(F.col("in_feed"))
    overall = live.orderBy(*ranking).limit(top_n).withColumn("rank", F.lit(None).cast("int"))
    by_category = Window.partitionBy("category").orderBy(*ranking)
    per_category = (
        live.filter(F.col("category").isNotNull())
        .withColumn("rank", F.row_number().over(by_category))
        .filter(F.col("rank") <= top_n)
    )
    return overall.unionByName(per_category)


def _category_totals(figures: DataFrame, attributes: DataFrame) -> DataFrame:
    """Bids, amount and listings per category; NULL gathers listings with no category.

    Categories of current listings without any bid are included, with zero totals, so
    that their feeds are published (and emptied when their last listing sells).
    """
    with_bids = figures.select(
        "category",
        F.col("bids_all").alias("bids"),
        F.col("amount_all").alias("amount"),
        F.lit(1).alias("listings"),
    )
    current = attributes.filter(F.col("category").isNotNull() & ~F.col("deleted")).select(
        "category",
        F.lit(0).cast("long").alias("bids"),
        F.lit(0).cast(AMOUNT_TYPE).alias("amount"),
        F.lit(0).alias("listings"),
    )
    return (
        with_bids.unionByName(current)
        .groupBy("category")
        .agg(
            F.sum("bids").alias("bids"),
            F.sum("amount").alias("amount"),
            F.sum("listings").alias("listings"),
        )
    )


def _with_folded(rows: list[Row], folded: Mapping[str | None, Totals]) -> dict[str | None, Totals]:
    """Totals per category: the events tier's rows plus the folded totals."""
    totals = dict(folded)
    for row in rows:
        totals[row["category"]] = totals.get(row["category"], Totals()) + _totals(row)
    return totals


def _feeds(ranked: list[Row], totals: Mapping[str | None, Totals]) -> tuple[Feed, list[Feed]]:
    """The global feed and every category's, from the collected rows and the totals."""
    top = sorted((row for row in ranked if row["rank"] is None), key=_ranking_key)
    overall = Feed(
        category=None,
        totals=sum(totals.values(), Totals()),
        items=[feed_item(rank, row.asDict()) for rank, row in enumerate(top, start=1)],
    )

    per_category = []
    for name in sorted(category for category in totals if category is not None):
        ranked_rows = sorted(
            (r for r in ranked if r["rank"] is not None and r["category"] == name), key=_rank_of
        )
        per_category.append(
            Feed(
                category=name,
                totals=totals[name],
                items=[feed_item(r["rank"], r.asDict()) for r in ranked_rows],
            )
        )
    return overall, per_category


def _ranking_key(row: Row) -> tuple[Decimal, str]:
    return -row["trending_score"], row["listing_id"]


def _rank_of(row: Row) -> int:
    return int(row["rank"])


def _totals(row: Row) -> Totals:
    if row["bids"] is None:
        return Totals()
    return Totals(bids=int(row["bids"]), amount=row["amount"], listings=int(row["listings"]))
