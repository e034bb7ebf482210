"""Read bid and listing changes from a logical replication slot and put them to Kinesis.

One run (one Lambda invocation):

1. takes a session advisory lock named after the slot, so two invocations never
   read the slot at once (the second returns at once with ``locked``);
2. checks every captured table has a primary key and a replica identity that
   keeps old rows, refusing to start otherwise;
3. repeatedly peeks at most ``capture_max_changes`` changes up to the current
   WAL position, turns each row change into a contract event
   (``encore.events``) and hands it to the Kinesis sink;
4. after the sink has flushed and Kinesis accepted every record, advances
   the slot to the end of the last transaction sent. Nothing is confirmed
   before that, so a crash between put and confirm replays the same
   transactions, with the same event ids, next time.

A run stops at a transaction boundary when its byte budget is spent or the
Lambda's remaining time falls under a margin, so memory stays bounded and a
large backlog drains over several runs. When no captured table changed, the
slot is still advanced to the position it read up to, so WAL held for the
slot stays bounded while other tables are busy. Slot lag is logged each run.

Peeking (``pg_logical_slot_peek_binary_changes``) and advancing
(``pg_replication_slot_advance``) are plain SQL, available to the
``rds_replication`` role on RDS and Aurora.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from encore import events
from lambdas.capture.kinesis_sink import KinesisSink, SinkStats
from lambdas.capture.pgoutput import UNCHANGED, Begin, Change, Commit, Decoder

logger = logging.getLogger(__name__)

#: Captured table -> event type.
CAPTURED_TABLES = {"listings": "listing", "bids": "bid"}


class CaptureError(RuntimeError):
    """The capture cannot go on; the message says what to fix."""


@dataclass
class CaptureResult:
    status: str = "drained"
    changes: int = 0
    events: int = 0
    transactions: int = 0
    dead_lettered: int = 0
    confirmed_lsn: str | None = None
    lag_bytes: int | None = None
    sink: SinkStats = field(default_factory=SinkStats)

    def summary(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "changes": self.changes,
            "events": self.events,
            "transactions": self.transactions,
            "dead_lettered": self.dead_lettered + self.sink.dead_lettered,
            "confirmed_lsn": self.confirmed_lsn,
            "lag_bytes": self.lag_bytes,
            "kinesis_records": self.sink.kinesis_records,
            "put_requests": self.sink.requests,
            "retried_entries": self.sink.retried_entries,
        }


@dataclass(frozen=True)
class CaptureLimits:
    max_changes: int = 20_000
    max_bytes: int = 64 * 1024 * 1024
    time_margin_s: float = 10.0


def lock_key(slot_name: str) -> int:
    """A stable signed 64-bit advisory lock key for the slot."""
    return int.from_bytes(hashlib.sha256(slot_name.encode()).digest()[:8], "big", signed=True)


def prepare(conn: Any, slot_name: str, publication: str) -> None:
    """Create the publication and the slot if missing; check the captured tables.

    Run once before the first capture (and safe to run again): a slot only sees
    changes committed after it exists.
    """
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,))
        if cursor.fetchone() is None:
            tables = ", ".join(CAPTURED_TABLES)
            cursor.execute(f'CREATE PUBLICATION "{publication}" FOR TABLE {tables}')
            logger.info("created publication %s for %s", publication, tables)
        cursor.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot_name,))
        if cursor.fetchone() is None:
            cursor.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_name,)
            )
            logger.info("created logical replication slot %s (pgoutput)", slot_name)
    primary_keys(conn, publication)


def primary_keys(conn: Any, publication: str) -> dict[str, list[str]]:
    """Primary key columns of each published table; refuses tables that would lose rows."""
    with conn.cursor() as cursor:
        cursor.execute(
            """
            SELECT c.relname, c.relreplident,
                   array(SELECT a.attname FROM pg_index i
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                         WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY a.attnum)
            FROM pg_publication_tables p
            JOIN pg_namespace n ON n.nspname = p.schemaname
            JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
            WHERE p.pubname = %s
            """,
            (publication,),
        )
        rows = cursor.fetchall()
    if not rows:
        raise CaptureError(
            f"publication {publication!r} has no tables: "
            f"CREATE PUBLICATION {publication} FOR TABLE {', '.join(CAPTURED_TABLES)}"
        )
    keys: dict[str, list[str]] = {}
    for table, identity, key_columns in rows:
        if not key_columns:
            raise CaptureError(
                f"captured table {table!r} has no primary key, so its changes cannot be keyed: "
                f"ALTER TABLE {table} ADD PRIMARY KEY (...)"
            )
        if identity == "n":
            raise CaptureError(
                f"captured table {table!r} has REPLICA IDENTITY NOTHING, so updates and deletes "
                f"lose their rows: ALTER TABLE {table} REPLICA IDENTITY DEFAULT (or FULL)"
            )
        if table not in CAPTURED_TABLES:
            raise CaptureError(
                f"publication {publication!r} includes {table!r}, which has no event type: "
                f"ALTER PUBLICATION {publication} DROP TABLE {table}"
            )
        keys[table] = list(key_columns)
    return keys


class _CategoryTitles:
    """Category and sub-category titles by sub-category id, read again on a miss."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.by_sub_category: dict[str, tuple[str, str, str]] = {}

    def lookup(self, sub_category_id: str) -> tuple[str, str, str]:
        if sub_category_id not in self.by_sub_category:
            with self.conn.cursor() as cursor:
                cursor.execute(
                    "SELECT s.id::text, s.title, c.id::text, c.title FROM sub_categories s"
                    " JOIN categories c ON c.id = s.category_id"
                )
                self.by_sub_category = {row[0]: row[1:] for row in cursor.fetchall()}
        return self.by_sub_category.get(sub_category_id, ("", "", ""))


class Capture:
    def __init__(
        self,
        conn: Any,
        sink: KinesisSink,
        slot_name: str,
        publication: str,
        limits: CaptureLimits | None = None,
    ) -> None:
        self.conn = conn
        self.sink = sink
        self.slot_name = slot_name
        self.publication = publication
        self.limits = limits or CaptureLimits()
        self.categories = _CategoryTitles(conn)

    def run(self, remaining_s: Callable[[], float] = lambda: float("inf")) -> CaptureResult:
        result = CaptureResult(sink=self.sink.stats)
        self.conn.autocommit = True
        with self.conn.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'; SET DateStyle = 'ISO'")
            cursor.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(self.slot_name),))
            if not cursor.fetchone()[0]:
                result.status = "locked"
                logger.info("slot %s is being read by another invocation", self.slot_name)
                return result
        try:
            self.keys = primary_keys(self.conn, self.publication)
            self.sink.refresh_shards()
            self._drain(result, remaining_s)
        finally:
            self.conn.autocommit = True
            with self.conn.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", (lock_key(self.slot_name),))
        result.lag_bytes = self.lag_bytes()
        logger.info(
            "capture %s: %d changes in %d transactions, lag %s bytes",
            result.status,
            result.changes,
            result.transactions,
            result.lag_bytes,
        )
        return result

    def _drain(self, result: CaptureResult, remaining_s: Callable[[], float]) -> None:
        spent_bytes = 0
        while True:
            if remaining_s() < self.limits.time_margin_s:
                result.status = "time"
                return
            upto, rows, last_end, stopped, batch_bytes = self._read_batch(
                result, remaining_s, spent_bytes
            )
            spent_bytes += batch_bytes
            self.sink.flush()
            drained = rows < self.limits.max_changes and not stopped
            confirm_to = upto if drained else last_end
            if confirm_to is not None:
                self._advance(confirm_to)
                result.confirmed_lsn = events.format_lsn(confirm_to)
            if drained:
                return
            if stopped:
                result.status = stopped
                return

    def _read_batch(
        self, result: CaptureResult, remaining_s: Callable[[], float], spent_bytes: int
    ) -> tuple[int, int, int | None, str | None, int]:
        """Peek one batch and queue its events. Returns (upto, rows, last commit end, stop)."""
        decoder = Decoder()
        begin: Begin | None = None
        rows = 0
        batch_bytes = 0
        last_end: int | None = None
        stopped: str | None = None

        self.conn.autocommit = False
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            upto = events.parse_lsn(cursor.fetchone()[0])
        with self.conn.cursor(name="encore_capture_peek") as peek:
            peek.itersize = 2_000
            peek.execute(
                "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s)",
                (
                    self.slot_name,
                    events.format_lsn(upto),
                    self.limits.max_changes,
                    self.publication,
                ),
            )
            for change_lsn, data in peek:
                rows += 1
                message = decoder.decode(bytes(data))
                if isinstance(message, Begin):
                    begin = message
                elif isinstance(message, Change):
                    assert begin is not None, "change outside a transaction"
                    batch_bytes += self._send(message, begin, change_lsn, result)
                elif isinstance(message, Commit):
                    result.transactions += 1
                    last_end = message.end_lsn
                    if spent_bytes + batch_bytes >= self.limits.max_bytes:
                        stopped = "bytes"
                    elif remaining_s() < self.limits.time_margin_s:
                        stopped = "time"
                    if stopped:
                        break
        self.conn.commit()
        self.conn.autocommit = True
        return upto, rows, last_end, stopped, batch_bytes

    def _send(self, change: Change, begin: Begin, change_lsn: str, result: CaptureResult) -> int:
        result.changes += 1
        table = change.relation.name
        event = self._event(change, begin, change_lsn)
        try:
            line = events.encode(event)
        except events.EventError as exc:
            self.sink.dead_letter(
                str(event.get("listing_id") or event["table_key"]),
                repr(event).encode(),
                str(event["event_id"]),
                f"{table} key {event['table_key']} at {event['commit_lsn']}: {exc}",
            )
            return 0
        self.sink.add(
            str(event.get("listing_id") or event["table_key"]), line, str(event["event_id"])
        )
        result.events += 1
        return len(line)

    def _event(self, change: Change, begin: Begin, change_lsn: str) -> dict[str, str | None]:
        table = change.relation.name
        values = self._row(change, table, change_lsn)
        key = "/".join(str(values.get(column)) for column in self.keys[table])
        commit_lsn = events.format_lsn(begin.final_lsn)
        event: dict[str, str | None] = {
            "event_id": events.event_id(commit_lsn, change_lsn, table, key, change.op),
            "event_type": CAPTURED_TABLES[table],
            "op": change.op,
            "commit_lsn": commit_lsn,
            "commit_time": begin.commit_time.isoformat(),
            "table_key": key,
        }
        if table == "bids":
            event.update(
                listing_id=values.get("listing_id"),
                bid_id=values.get("id"),
                bidder_id=values.get("bidder_id"),
                amount=values.get("amount"),
                placed_at=values.get("placed_at"),
            )
        else:
            sub_category_id = values.get("sub_category_id")
            sub_category, category_id, category = (
                self.categories.lookup(sub_category_id) if sub_category_id else (None, None, None)
            )
            event.update(
                listing_id=values.get("id"),
                seller_id=values.get("seller_id"),
                title=values.get("title"),
                category_id=values.get("category_id") or category_id,
                category=category or None,
                sub_category_id=sub_category_id,
                sub_category=sub_category or None,
                price=values.get("price"),
                status=values.get("status"),
                ends_at=values.get("ends_at"),
                description=values.get("description"),
            )
        return event

    def _row(self, change: Change, table: str, change_lsn: str) -> dict[str, str | None]:
        """The row's values, with unchanged TOASTed columns taken from the old row."""
        source = change.new if change.new is not None else change.old
        assert source is not None
        row: dict[str, str | None] = {}
        for column, value in source.items():
            if value is UNCHANGED:
                old = change.old.get(column) if change.old else UNCHANGED
                if old is UNCHANGED:
                    raise CaptureError(
                        f"{table}.{column} at {change_lsn} was unchanged and not sent, and the "
                        f"old row is not logged: ALTER TABLE {table} REPLICA IDENTITY FULL"
                    )
                value = old
            row[column] = value if value is None else str(value)
        return row

    def _advance(self, lsn: int) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            )
            row = cursor.fetchone()
            if row is None:
                raise CaptureError(f"replication slot {self.slot_name!r} does not exist")
            if row[0] is not None and events.parse_lsn(row[0]) >= lsn:
                return
            cursor.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.slot_name, events.format_lsn(lsn)),
            )
        logger.debug("slot %s confirmed up to %s", self.slot_name, events.format_lsn(lsn))

    def lag_bytes(self) -> int | None:
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            )
            row = cursor.fetchone()
        return None if row is None or row[0] is None else int(row[0])


def timed(deadline: float) -> Callable[[], float]:
    """A remaining-time function for runs outside Lambda."""
    return lambda: deadline - time.monotonic()
