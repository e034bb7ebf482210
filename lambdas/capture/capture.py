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
``rds_replication`` role on RDS and Aurora. The peek is read through
``COPY ... TO STDOUT (FORMAT binary)``: rows stream in as the server sends
them, with no round trip per fetch and no hex text for the message bytes.
While a batch streams, the connection runs nothing else, so category titles
are read before each batch.

Limitations
-----------
Postgres decodes a slot's WAL from its ``restart_lsn`` for every peek and
every advance, and ``restart_lsn`` only moves past a running-transactions
record, which Postgres writes every 15 seconds while the database is busy.
A backlog written faster than that is decoded again by each batch, so its
cost on the server grows with the square of its size; a larger
``capture_max_changes`` means fewer batches. Decoding, encoding and framing
run in Python in one process: about 8 microseconds of CPU per change on
the project's 2-core machines.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from encore import events
from lambdas.capture.kinesis_sink import KinesisSink, SinkStats
from lambdas.capture.pgoutput import (
    UNCHANGED,
    Begin,
    Change,
    Commit,
    Decoder,
    Message,
    Relation,
)

logger = logging.getLogger(__name__)

#: Captured table -> event type.
CAPTURED_TABLES = {"listings": "listing", "bids": "bid"}
#: Event column -> the captured table's column it is read from.
_BID_SOURCES = {
    "listing_id": "listing_id",
    "bid_id": "id",
    "bidder_id": "bidder_id",
    "amount": "amount",
    "placed_at": "placed_at",
}
_LISTING_SOURCES = {
    "listing_id": "id",
    "seller_id": "seller_id",
    "title": "title",
    "category_id": "category_id",
    "sub_category_id": "sub_category_id",
    "price": "price",
    "status": "status",
    "ends_at": "ends_at",
    "description": "description",
}
(
    _EVENT_ID,
    _EVENT_TYPE,
    _OP,
    _COMMIT_LSN,
    _COMMIT_TIME,
    _TABLE_KEY,
    _LISTING_ID,
    _CATEGORY_ID,
    _CATEGORY,
    _SUB_CATEGORY_ID,
    _SUB_CATEGORY,
) = (
    events.COLUMNS.index(name)
    for name in (
        "event_id",
        "event_type",
        "op",
        "commit_lsn",
        "commit_time",
        "table_key",
        "listing_id",
        "category_id",
        "category",
        "sub_category_id",
        "sub_category",
    )
)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\0"
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


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


@dataclass(frozen=True)
class _Transaction:
    """What every event of one transaction shares, formatted once."""

    commit_lsn: str
    commit_time: str

    @classmethod
    def starting(cls, begin: Begin) -> _Transaction:
        return cls(
            events.format_lsn(begin.final_lsn), events.normalize_time(begin.commit_time.isoformat())
        )


@dataclass(frozen=True)
class _RowPlan:
    """Where a captured table's values go in an event row; made once per relation."""

    table: str
    key_positions: tuple[int | None, ...]
    #: (index in ``events.COLUMNS``, index in the relation's values)
    fields: tuple[tuple[int, int], ...]
    template: list[str | None]
    is_listing: bool


class _CategoryTitles:
    """Category and sub-category titles by sub-category id, as of the last ``read``.

    Read before each batch, not on a miss: the connection is streaming the
    batch while its events are built. A batch reaches only up to the WAL
    position taken before the read, so every sub-category its listings name
    was committed by then and is found.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.by_sub_category: dict[str, tuple[str, str, str]] = {}

    def read(self) -> None:
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT s.id::text, s.title, c.id::text, c.title FROM sub_categories s"
                " JOIN categories c ON c.id = s.category_id"
            )
            self.by_sub_category = {row[0]: row[1:] for row in cursor.fetchall()}

    def lookup(self, sub_category_id: str) -> tuple[str, str, str]:
        return self.by_sub_category.get(sub_category_id, ("", "", ""))


@dataclass
class _Batch:
    """What one peeked batch has done so far."""

    spent_bytes: int
    decode: Callable[[bytes], Message] = field(default_factory=lambda: Decoder().decode)
    transaction: _Transaction | None = None
    rows: int = 0
    bytes: int = 0
    last_end: int | None = None
    stopped: str | None = None


class _CopyRows:
    """The file ``COPY ... TO STDOUT (FORMAT binary)`` writes to: one ``write`` per row.

    Each row of ``(lsn::text, data)`` goes to ``on_row`` as ``(lsn, data)``.
    The layout is the binary COPY format of the Postgres documentation: a
    header before the first row, then per row a field count and each field
    as a length and its bytes; a field count of -1 ends the stream.

    An error is kept in ``failure`` rather than raised: the rest of the stream
    is then read and dropped, so the connection stays usable, and the caller
    raises the error once the COPY is over.
    """

    def __init__(self, on_row: Callable[[str, bytes], None]) -> None:
        self.on_row = on_row
        self.header = True
        self.failure: Exception | None = None

    def write(self, chunk: bytes) -> None:
        if self.failure is None:
            try:
                self._row(chunk)
            except Exception as exc:
                self.failure = exc

    def _row(self, chunk: bytes) -> None:
        offset = 0
        if self.header:
            if not chunk.startswith(_COPY_SIGNATURE):
                raise CaptureError(f"COPY stream starts with {bytes(chunk[:11])!r}, not a header")
            (extension,) = _INT32.unpack_from(chunk, len(_COPY_SIGNATURE) + 4)
            offset = len(_COPY_SIGNATURE) + 8 + extension
            self.header = False
        (fields,) = _INT16.unpack_from(chunk, offset)
        if fields == -1:
            return
        if fields != 2:
            raise CaptureError(f"COPY row has {fields} fields, expected lsn and data")
        (lsn_length,) = _INT32.unpack_from(chunk, offset + 2)
        start = offset + 6
        lsn = chunk[start : start + lsn_length].decode()
        self.on_row(lsn, chunk[start + lsn_length + 4 :])


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
        self.keys: dict[str, list[str]] = {}
        self._plans: dict[int, _RowPlan] = {}

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
            self._plans.clear()
            self.sink.refresh_shards()
            self._drain(result, remaining_s)
        finally:
            self.sink.close()
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
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            upto = events.parse_lsn(cursor.fetchone()[0])
            self.categories.read()
            batch = _Batch(spent_bytes)
            # COPY streams the rows as the server sends them, in binary: no round
            # trip per fetch and no hex text for the bytea column to undo.
            peek = cursor.mogrify(
                "COPY (SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s))"
                " TO STDOUT (FORMAT binary)",
                (
                    self.slot_name,
                    events.format_lsn(upto),
                    self.limits.max_changes,
                    self.publication,
                ),
            )
            rows = _CopyRows(
                lambda change_lsn, data: self._take(batch, change_lsn, data, result, remaining_s)
            )
            cursor.copy_expert(peek.decode(), rows)
        if rows.failure is not None:
            raise rows.failure
        return upto, batch.rows, batch.last_end, batch.stopped, batch.bytes

    def _take(
        self,
        batch: _Batch,
        change_lsn: str,
        data: bytes,
        result: CaptureResult,
        remaining_s: Callable[[], float],
    ) -> None:
        """Act on one message of the batch: queue a change, note a commit."""
        batch.rows += 1
        if batch.stopped:
            return  # the rest of the stream is read and dropped
        message = batch.decode(data)
        if type(message) is Change:
            if batch.transaction is None:
                raise CaptureError(f"change at {change_lsn} outside a transaction")
            batch.bytes += self._send(message, batch.transaction, change_lsn, result)
        elif isinstance(message, Begin):
            batch.transaction = _Transaction.starting(message)
        elif isinstance(message, Commit):
            result.transactions += 1
            batch.last_end = message.end_lsn
            if batch.spent_bytes + batch.bytes >= self.limits.max_bytes:
                batch.stopped = "bytes"
            elif remaining_s() < self.limits.time_margin_s:
                batch.stopped = "time"
        elif isinstance(message, Relation):
            # A new Relation message means the table's columns may have changed.
            self._plans.pop(message.oid, None)

    def _send(
        self, change: Change, transaction: _Transaction, change_lsn: str, result: CaptureResult
    ) -> int:
        """Queue one change's event; returns its size, 0 if it was dead-lettered."""
        result.changes += 1
        relation = change.relation
        plan = self._plans.get(relation.oid) or self._plan(relation)
        row = self._event_row(change, plan, transaction, change_lsn)
        partition_key = row[_LISTING_ID] or row[_TABLE_KEY]
        try:
            line = events.encode_row(row)
        except events.EventError as exc:
            event = {name: value for name, value in zip(events.COLUMNS, row, strict=True) if value}
            self.sink.dead_letter(
                str(partition_key),
                repr(event).encode(),
                str(row[_EVENT_ID]),
                f"{plan.table} key {row[_TABLE_KEY]} at {transaction.commit_lsn}: {exc}",
            )
            return 0
        self.sink.add(str(partition_key), line, str(row[_EVENT_ID]))
        result.events += 1
        return len(line)

    def _plan(self, relation: Relation) -> _RowPlan:
        table = relation.name
        positions = {column.name: index for index, column in enumerate(relation.columns)}
        sources = _BID_SOURCES if table == "bids" else _LISTING_SOURCES
        template: list[str | None] = [None] * len(events.COLUMNS)
        template[_EVENT_TYPE] = CAPTURED_TABLES[table]
        plan = _RowPlan(
            table=table,
            key_positions=tuple(positions.get(column) for column in self.keys[table]),
            fields=tuple(
                (events.COLUMNS.index(name), positions[column])
                for name, column in sources.items()
                if column in positions
            ),
            template=template,
            is_listing=table == "listings",
        )
        self._plans[relation.oid] = plan
        return plan

    def _event_row(
        self, change: Change, plan: _RowPlan, transaction: _Transaction, change_lsn: str
    ) -> list[str | None]:
        """The change as a contract row, in ``events.COLUMNS`` order."""
        # Text or None once unchanged TOASTed values are filled in from the old row.
        values: list[Any] | None = change.new if change.new is not None else change.old
        if values is None or UNCHANGED in values:
            values = self._merged(change, change_lsn)
        if len(plan.key_positions) == 1:
            (position,) = plan.key_positions
            key = str(values[position] if position is not None else None)
        else:
            key = "/".join(
                str(values[position] if position is not None else None)
                for position in plan.key_positions
            )
        row = plan.template.copy()
        row[_EVENT_ID] = events.event_id(
            transaction.commit_lsn, change_lsn, plan.table, key, change.op
        )
        row[_OP] = change.op
        row[_COMMIT_LSN] = transaction.commit_lsn
        row[_COMMIT_TIME] = transaction.commit_time
        row[_TABLE_KEY] = key
        for column, position in plan.fields:
            row[column] = values[position]
        if plan.is_listing:
            sub_category_id = row[_SUB_CATEGORY_ID]
            if sub_category_id:
                sub_category, category_id, category = self.categories.lookup(sub_category_id)
                row[_CATEGORY_ID] = row[_CATEGORY_ID] or category_id
                row[_CATEGORY] = category or None
                row[_SUB_CATEGORY] = sub_category or None
        return row

    def _merged(self, change: Change, change_lsn: str) -> list[Any]:
        """The new row, with unchanged TOASTed columns taken from the old row."""
        values = change.new if change.new is not None else change.old
        if values is None:
            raise CaptureError(f"{change.op} at {change_lsn} carries no row")
        merged = list(values)
        for position, value in enumerate(values):
            if value is UNCHANGED:
                old = change.old[position] if change.old else UNCHANGED
                if old is UNCHANGED:
                    table, column = change.relation.name, change.relation.columns[position].name
                    raise CaptureError(
                        f"{table}.{column} at {change_lsn} was unchanged and not sent, and the "
                        f"old row is not logged: ALTER TABLE {table} REPLICA IDENTITY FULL"
                    )
                merged[position] = old
        return merged

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
