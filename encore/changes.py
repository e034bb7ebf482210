"""Which of several changes of one row stands: the rule every reader of the events shares.

The capture writes each change with its transaction's commit LSN and commit
time (:mod:`encore.events`). Of the changes of one row, the latest is the one
with, in turn:

1. the highest commit LSN, as a position in the WAL: both halves of ``X/X``
   compared as hex numbers, so ``1/0`` is after ``0/FFFFFFFF`` and ``0/10``
   after ``0/9``, though neither is as text;
2. the later commit time;
3. the later operation: insert, then update, then delete. Two changes of one
   row in one transaction share their commit LSN and time, and in a
   transaction an update cannot come before the row's insert, nor anything
   after its delete;
4. a closed status (``sold``, ``ended``) over any other, because a listing
   never reopens;
5. the higher event id: arbitrary, but the same on every run.

Copies of one event (delivery is at least once) tie on every one of these and
are the same change, so whichever copy wins carries the same values: readers
need not remove duplicates before applying the rule.

:func:`latest_change` is the rule in Python and :func:`latest_per_key` the same
rule in Spark; a test holds the two to each other. The streaming feeds and the
nightly job both use :func:`latest_per_key`.

Limitations: the contract carries no change LSN, so between two updates of one
row in one transaction that leave the same status, the choice falls to the
event id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from encore import events

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

CLOSED_STATUSES = ("sold", "ended")
OPERATION_ORDER = {"insert": 0, "update": 1, "delete": 2}


def latest_change(changes: Sequence[Mapping[str, str | None]]) -> Mapping[str, str | None]:
    """The latest of several changes of one row (see the module docstring)."""

    def position(change: Mapping[str, str | None]) -> tuple[int, str, int, int, str]:
        return (
            events.parse_lsn(str(change["commit_lsn"])),
            str(change["commit_time"]),
            OPERATION_ORDER[str(change["op"])],
            int(change.get("status") in CLOSED_STATUSES),
            str(change["event_id"]),
        )

    return max(changes, key=position)


def _newest_first() -> list[Column]:
    """Spark sort columns that put the latest change of a row first."""
    from pyspark.sql import functions as F

    lsn = F.col("commit_lsn")
    high = F.conv(F.substring_index(lsn, "/", 1), 16, 10).cast("long")
    low = F.conv(F.substring_index(lsn, "/", -1), 16, 10).cast("long")
    operation = F.coalesce(
        *(F.when(F.col("op") == op, F.lit(rank)) for op, rank in OPERATION_ORDER.items())
    )
    closed = F.coalesce(F.col("status").isin(*CLOSED_STATUSES), F.lit(False)).cast("int")
    return [
        high.desc(),
        low.desc(),
        F.col("commit_time").desc(),
        operation.desc(),
        closed.desc(),
        F.col("event_id").desc(),
    ]


def latest_per_key(changes: DataFrame, key: str | Column) -> DataFrame:
    """The latest change of each ``key`` of ``changes`` (see :func:`latest_change`).

    ``changes`` has the contract's ``commit_lsn``, ``commit_time``, ``op``,
    ``status`` and ``event_id``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(key).orderBy(*_newest_first())
    return (
        changes.withColumn("_newest", F.row_number().over(order))
        .filter(F.col("_newest") == 1)
        .drop("_newest")
    )
