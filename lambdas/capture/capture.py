"""Read bid and listing changes from a logical replication slot and put them to Kinesis.

One run (one Lambda invocation, or one poll of a lingering one):

1. takes a session advisory lock named after the slot on the normal
   connection, so two invocations never read the slot at once (the second
   returns at once with ``locked``);
2. checks every captured table has a primary key and a replica identity that
   keeps old rows, refusing to start otherwise;
3. takes the current WAL position as its target and streams the slot over a
   replication connection (``START_REPLICATION`` with ``pgoutput``), turning
   each row change into a contract event (``encore.events``) for the Kinesis
   sink as it arrives, until every transaction committed before the target
   has been received;
4. after the sink has flushed and Kinesis accepted every record, confirms the
   end of the last transaction received (feedback with a flush position) and
   waits until the slot shows it; once the connection is closed, has the
   position written at the next checkpoint. Nothing is confirmed before the
   sink has flushed, so a crash between put and confirm replays the same
   transactions, with the same event ids, next time.

Postgres decodes while the run builds and sends events; what the run has not
read yet waits in the socket, and the server stops decoding while the socket
is full, so memory stays bounded however large the backlog. A run stops at a
transaction boundary when its byte budget is spent or the Lambda's remaining
time falls under a margin, and a large backlog drains over several runs. When
no captured table changed, the server's keepalives tell how far it has
decoded; once that passes the target with no transaction half received, that
position is confirmed, so WAL held for the slot stays bounded while other
tables are busy. Slot lag is logged each run.

A replication connection needs the ``REPLICATION`` attribute, which the
``rds_replication`` role gives on RDS and Aurora, and takes one of the
server's ``max_wal_senders`` while a run reads.

Limitations
-----------
Each run is a new replication session, and Postgres starts a session by
decoding the slot's WAL from its ``restart_lsn``, skipping what was already
confirmed; after the session, advancing the slot to have its position
written reads that WAL once more, without decoding it. ``restart_lsn`` only
moves past a running-transactions record, which Postgres writes every 15
seconds while the database is busy, so a backlog written faster than that is
decoded again, in part, by each run that drains a share of it: draining a
million changes in four runs waited about 1.3 s for it on the project's
2-core machines. A larger ``capture_max_bytes`` means fewer runs. A run that
finds nothing still opens a session: 10 to 30 ms locally. psycopg2 cannot
end a replication stream, only close its connection, and the WAL sender
releases the slot when it notices: the run waits for that, up to
``SLOT_WAIT_S``. Decoding, encoding and framing run in Python in one process,
whose Kinesis sender thread shares the interpreter lock: about 9.5
microseconds of CPU per change on the project's 2-core machines.
"""

from __future__ import annotations

import hashlib
import logging
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn
from psycopg2.extras import LogicalReplicationConnection

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
#: How often a run that has no message to read asks the server how far it has decoded.
ASK_EVERY_S = 0.005
#: A server that keeps answering from one position this long has decoded all the WAL
#: flushed so far.
CAUGHT_UP_S = 1.0
#: A replication connection that hears nothing this long is taken as lost. A busy
#: server sends a keepalive at least every half ``wal_sender_timeout`` (60 s by default).
SILENCE_S = 90.0
#: Longest wait for the previous reader's WAL sender to release the slot, and for a
#: confirmed position to show in ``pg_replication_slots``.
SLOT_WAIT_S = 5.0


#: ``pg_class.relreplident`` codes, as ``ALTER TABLE ... REPLICA IDENTITY`` names them.
_IDENTITIES = {"d": "DEFAULT", "n": "NOTHING", "i": "USING INDEX", "f": "FULL"}


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
        if identity != "f":
            named = _IDENTITIES.get(identity, identity)
            raise CaptureError(
                f"captured table {table!r} has REPLICA IDENTITY {named}, "
                "so Postgres does not log the old row: a deleted row would lose its columns and "
                "an update that leaves a large value unchanged would not carry it: "
                f"ALTER TABLE {table} REPLICA IDENTITY FULL"
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
    """Category and sub-category titles by sub-category id, read when first named in a run.

    The normal connection is idle while the replication connection streams, so
    a miss is one query; titles are read again in each run.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.by_sub_category: dict[str, tuple[str, str, str]] = {}

    def clear(self) -> None:
        self.by_sub_category.clear()

    def lookup(self, sub_category_id: str) -> tuple[str, str, str]:
        titles = self.by_sub_category.get(sub_category_id)
        if titles is None:
            with self.conn.cursor() as cursor:
                cursor.execute(
                    "SELECT s.title, c.id::text, c.title FROM sub_categories s"
                    " JOIN categories c ON c.id = s.category_id WHERE s.id = %s::bigint",
                    (sub_category_id,),
                )
                row = cursor.fetchone()
            titles = self.by_sub_category[sub_category_id] = row or ("", "", "")
        return titles


@dataclass
class _Reading:
    """Where one run's read of the stream stands."""

    #: The WAL position taken at the start of the run: every transaction committed
    #: before it is read, and then the run stops.
    target: int
    decode: Callable[[bytes], Message] = field(default_factory=lambda: Decoder().decode)
    #: The transaction being received, from its Begin to its Commit.
    transaction: _Transaction | None = None
    bytes: int = 0
    #: Where the slot may be confirmed once the sink has flushed: the end of the last
    #: transaction received, or a position the server has decoded past with nothing
    #: to send.
    confirm: int | None = None
    stopped: str | None = None
    asked_at: float | None = None
    heard_at: float = field(default_factory=time.monotonic)
    #: The position the server last answered with, and since when.
    answer: int | None = None
    answer_since: float = 0.0

    def stop(self, status: str, confirm: int | None) -> None:
        self.stopped = status
        if confirm is not None and (self.confirm is None or confirm > self.confirm):
            self.confirm = confirm


class Capture:
    """Runs of the capture on one slot.

    ``conn`` is a normal connection; each run opens a replication connection
    to the same server as the same role (psycopg2 hides the password in
    ``conn.dsn``, so it is taken from ``conn.info``) and closes it before it
    returns.
    """

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
        self._stream: Any = None

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
            self.categories.clear()
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
        """Stream the slot up to the WAL position of now, send, then confirm."""
        if remaining_s() < self.limits.time_margin_s:
            result.status = "time"
            return
        with self.conn.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            target = events.parse_lsn(cursor.fetchone()[0])
        self._stream = self._start_stream()
        advanced = False
        try:
            reading = self._read(self._stream, target, result, remaining_s)
            self.sink.flush()
            if reading.confirm is not None:
                advanced = self._advance(reading.confirm)
        finally:
            self._stream.connection.close()
            self._stream = None
        if reading.confirm is not None:
            if advanced:
                self._keep(reading.confirm)
            result.confirmed_lsn = events.format_lsn(reading.confirm)
        result.status = reading.stopped or result.status

    def _start_stream(self) -> Any:
        """A replication cursor streaming the slot's pgoutput messages from its confirmed
        position."""
        self._wait_for_slot()
        dsn = self.conn.dsn
        if self.conn.info.password:
            dsn = make_dsn(dsn, password=self.conn.info.password)
        try:
            replication = psycopg2.connect(dsn, connection_factory=LogicalReplicationConnection)
        except psycopg2.OperationalError as exc:
            raise CaptureError(
                f"cannot open a replication connection for slot {self.slot_name!r} (the role "
                f"needs REPLICATION: rds_replication on RDS and Aurora): {str(exc).strip()}"
            ) from exc
        try:
            stream = replication.cursor()
            stream.start_replication(
                slot_name=self.slot_name,
                decode=False,
                options={"proto_version": "1", "publication_names": self.publication},
            )
        except BaseException:
            replication.close()
            raise
        return stream

    def _wait_for_slot(self) -> None:
        """Wait until no WAL sender holds the slot.

        A closed replication connection's WAL sender releases the slot when it
        exits, a moment later, so the run after it may find the slot still held.
        """
        deadline = time.monotonic() + SLOT_WAIT_S
        pause = 0.001
        while True:
            holder = self._slot("active_pid")
            if holder is None:
                return
            if time.monotonic() > deadline:
                raise CaptureError(
                    f"replication slot {self.slot_name!r} is still held by process {holder}; "
                    f"if no other client reads the slot, end that process with "
                    f"SELECT pg_terminate_backend({holder})"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _read(
        self, stream: Any, target: int, result: CaptureResult, remaining_s: Callable[[], float]
    ) -> _Reading:
        """Read and queue messages until the run has read up to ``target`` or must stop."""
        reading = _Reading(target)
        read_message = stream.read_message
        take = self._take
        heard = False
        while reading.stopped is None:
            message = read_message()
            if message is not None:
                heard = True
                take(reading, message, result, remaining_s)
            else:
                self._await_server(stream, reading, remaining_s, heard)
                heard = False
        return reading

    def _take(
        self,
        reading: _Reading,
        message: Any,
        result: CaptureResult,
        remaining_s: Callable[[], float],
    ) -> None:
        """Act on one message of the stream: queue a change, note a commit."""
        decoded = reading.decode(message.payload)
        if type(decoded) is Change:
            change_lsn = events.format_lsn(message.data_start)
            if reading.transaction is None:
                raise CaptureError(f"change at {change_lsn} outside a transaction")
            reading.bytes += self._send(decoded, reading.transaction, change_lsn, result)
        elif isinstance(decoded, Begin):
            reading.transaction = _Transaction.starting(decoded)
        elif isinstance(decoded, Commit):
            result.transactions += 1
            reading.transaction = None
            reading.confirm = decoded.end_lsn
            if decoded.end_lsn >= reading.target:
                reading.stop("drained", decoded.end_lsn)
            elif reading.bytes >= self.limits.max_bytes:
                reading.stop("bytes", decoded.end_lsn)
            elif remaining_s() < self.limits.time_margin_s:
                reading.stop("time", decoded.end_lsn)
        elif isinstance(decoded, Relation):
            # A new Relation message means the table's columns may have changed.
            self._plans.pop(decoded.oid, None)

    def _await_server(
        self, stream: Any, reading: _Reading, remaining_s: Callable[[], float], heard: bool
    ) -> None:
        """No message is waiting: end the read if the server is past the target, else wait.

        Keepalives carry the position the server has decoded up to, which moves
        on through WAL that produces no message (other tables, transactions that
        rolled back). Between transactions, every transaction that committed
        before that position has been received, so the position may be confirmed.
        The server sends a keepalive when asked (a feedback message requesting a
        reply), so the run asks every ``ASK_EVERY_S`` while it waits. ``heard`` says
        whether messages came since the last wait.
        """
        now = time.monotonic()
        position = stream.wal_end
        answered = heard or stream.io_timestamp > stream.feedback_timestamp
        if answered:
            reading.heard_at = now
            if position != reading.answer:
                reading.answer, reading.answer_since = position, now
        if reading.transaction is None:
            if position >= reading.target:
                reading.stop("drained", position)
                return
            if answered and now - reading.answer_since >= CAUGHT_UP_S:
                # The server has decoded all the WAL flushed so far, and the target lies
                # past the last complete record: WAL written and not yet flushed, or a
                # record still being inserted.
                reading.stop("drained", position)
                return
        if remaining_s() < self.limits.time_margin_s:
            reading.stop("time", None)
            return
        if now - reading.heard_at > SILENCE_S:
            raise CaptureError(
                f"the replication connection for slot {self.slot_name!r} heard nothing from "
                f"the server for {SILENCE_S:.0f} s"
            )
        if reading.asked_at is None or now - reading.asked_at >= ASK_EVERY_S:
            stream.send_feedback(reply=True)
            reading.asked_at = now
        select.select([stream], [], [], ASK_EVERY_S)

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

    def _advance(self, lsn: int) -> bool:
        """Confirm the slot up to ``lsn`` and wait until the server shows it; False if
        the slot was there already.

        Feedback is asynchronous: the WAL sender applies it when it next reads
        from the connection. Asking for a reply sends it at once, and the run
        waits until ``pg_replication_slots`` shows the position, so the next run
        (and the lag this run reports) starts from it.
        """
        confirmed = self._confirmed_flush()
        if confirmed is not None and confirmed >= lsn:
            return False
        # Confirmed once, at the end of the run: psycopg2 moves the flush position on to
        # a keepalive's position whenever the last message received lies at or before
        # the last one confirmed, and with transactions interleaved in the WAL, a Begin
        # can lie before a commit that was received and not yet sent.
        self._stream.send_feedback(flush_lsn=lsn, reply=True)
        deadline = time.monotonic() + SLOT_WAIT_S
        pause = 0.001
        while confirmed is None or confirmed < lsn:
            if time.monotonic() > deadline:
                shown = "nothing" if confirmed is None else events.format_lsn(confirmed)
                raise CaptureError(
                    f"slot {self.slot_name!r} was confirmed up to {events.format_lsn(lsn)} but "
                    f"shows {shown} after {SLOT_WAIT_S:.0f} s; the next run sends the "
                    "changes after that again"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            confirmed = self._confirmed_flush()
        logger.debug("slot %s confirmed up to %s", self.slot_name, events.format_lsn(lsn))
        return True

    def _keep(self, lsn: int) -> None:
        """Have the slot's confirmed position written at the next checkpoint.

        Postgres writes a position confirmed over a replication connection to disk
        only when the slot's ``restart_lsn`` moves with it: streaming clients are
        expected to remember where they were. A run has nowhere to remember it, so
        once the WAL sender has released the slot it advances the slot to the same
        position with ``pg_replication_slot_advance``, which marks the slot to be
        written; a clean restart then resumes from it. Advancing reads the WAL
        since ``restart_lsn`` without decoding its changes.
        """
        try:
            self._wait_for_slot()
        except CaptureError as exc:
            logger.warning(
                "slot %s is confirmed up to %s but may not be written before a restart "
                "of the database: %s",
                self.slot_name,
                events.format_lsn(lsn),
                exc,
            )
            return
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_replication_slot_advance(slot_name, GREATEST(confirmed_flush_lsn,"
                " %s::pg_lsn)) FROM pg_replication_slots WHERE slot_name = %s",
                (events.format_lsn(lsn), self.slot_name),
            )

    def _confirmed_flush(self) -> int | None:
        confirmed = self._slot("confirmed_flush_lsn::text")
        return None if confirmed is None else events.parse_lsn(confirmed)

    def lag_bytes(self) -> int | None:
        lag = self._slot("(pg_current_wal_lsn() - confirmed_flush_lsn)::bigint")
        return None if lag is None else int(lag)

    def _slot(self, expression: str) -> Any:
        """One value of the slot's row in ``pg_replication_slots``; the slot must exist."""
        with self.conn.cursor() as cursor:
            cursor.execute(
                f"SELECT {expression} FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot_name,),
            )
            row = cursor.fetchone()
        if row is None:
            raise CaptureError(f"replication slot {self.slot_name!r} does not exist")
        return row[0]


def timed(deadline: float) -> Callable[[], float]:
    """A remaining-time function for runs outside Lambda."""
    return lambda: deadline - time.monotonic()
