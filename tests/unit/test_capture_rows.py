"""From pgoutput messages to contract events, where a run stops and what it confirms, with
the replication stream, the database and Kinesis replaced by stubs."""

from __future__ import annotations

import itertools
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pgoutput_wire
import pytest

from encore import events
from lambdas.capture import capture as capture_module
from lambdas.capture.capture import (
    Capture,
    CaptureError,
    CaptureLimits,
    CaptureResult,
    _Reading,
)
from lambdas.capture.kinesis_sink import SinkStats
from lambdas.capture.pgoutput import UNCHANGED

BIDS_OID = 16_400
LISTINGS_OID = 16_500
NO_TIME_LIMIT = lambda: float("inf")  # noqa: E731


def relation(oid: int, table: str, columns: list[str]) -> bytes:
    return pgoutput_wire.relation(oid, table, [(name, 25) for name in columns])


values = pgoutput_wire.tuple_data


@dataclass(frozen=True)
class Message:
    """What ``read_message`` returns for one XLogData message."""

    data_start: int
    payload: bytes


@dataclass(frozen=True)
class Keepalive:
    """A keepalive: nothing else is waiting, and the server says it has decoded this far."""

    wal_end: int


def transaction(*changes: bytes, final_lsn: int = 0x200, end_lsn: int = 0x230) -> list[Message]:
    """One transaction as the WAL sender streams it: Begin, the relations, the changes,
    Commit. The nth change is at ``0x1F8 + n``."""
    messages = [Message(0x1F8, pgoutput_wire.begin(final_lsn))]
    messages.append(Message(0, relation(BIDS_OID, "bids", BID_COLUMNS)))
    messages.append(Message(0, relation(LISTINGS_OID, "listings", LISTING_COLUMNS)))
    messages.extend(Message(0x1F8 + number, change) for number, change in enumerate(changes, 1))
    messages.append(Message(end_lsn, pgoutput_wire.commit(final_lsn, end_lsn)))
    return messages


def bid(bid_id: int) -> bytes:
    return b"I" + struct.pack("!i", BIDS_OID) + b"N" + values(bid_id, 1, "u1", "1", None)


BID_COLUMNS = ["id", "listing_id", "bidder_id", "amount", "placed_at"]
LISTING_COLUMNS = [
    "id",
    "seller_id",
    "title",
    "category_id",
    "sub_category_id",
    "price",
    "status",
    "starts_at",
    "ends_at",
    "description",
]

# select() needs a file descriptor: one that always reads as ready, so waits end at once.
_READY_READ, _READY_WRITE = os.pipe()
os.write(_READY_WRITE, b"!")


class Stream:
    """A replication cursor: ``items`` in order, then keepalives from ``caught_up_at``.

    A reply request is answered with a keepalive once the items are read; with
    ``answers=False`` the server never answers.
    """

    def __init__(
        self, items: Iterable[Message | Keepalive], caught_up_at: int, answers: bool = True
    ) -> None:
        self.items = deque(items)
        self.caught_up_at = caught_up_at
        self.answers = answers
        self.clock = itertools.count(1)
        self.wal_end = 0
        self.io_timestamp = self.feedback_timestamp = 0
        self.replies_asked = 0

    def read_message(self) -> Message | None:
        if not self.items:
            return None
        item = self.items.popleft()
        self.io_timestamp = next(self.clock)
        if isinstance(item, Keepalive):
            self.wal_end = item.wal_end
            return None
        self.wal_end = item.data_start
        return item

    def send_feedback(self, reply: bool = False, **_: Any) -> None:
        self.feedback_timestamp = next(self.clock)
        if reply:
            self.replies_asked += 1
            if self.answers and not self.items:
                self.items.append(Keepalive(self.caught_up_at))

    def fileno(self) -> int:
        return _READY_READ


class Cursor:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.params: tuple[Any, ...] = ()

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        self.connection.queries.append(query)
        self.query, self.params = query, params

    def fetchone(self) -> tuple[Any, ...] | None:
        if "confirmed_flush_lsn" in self.query:
            return (self.connection.confirmed,)
        if "active_pid" in self.query:
            return (self.connection.active_pid,)
        return self.connection.titles.get(self.params[0])


class Connection:
    """The normal connection: answers the category title lookup and the slot's position."""

    autocommit = True

    def __init__(self) -> None:
        self.titles = {"2": ("Funko", "1", "Toys")}
        self.confirmed = "0/100"
        self.active_pid: int | None = None
        self.queries: list[str] = []

    def cursor(self) -> Cursor:
        return Cursor(self)


class RecordingSink:
    def __init__(self) -> None:
        self.stats = SinkStats()
        self.added: list[tuple[str, bytes, str]] = []
        self.dead: list[tuple[str, str]] = []

    def add(self, partition_key: str, data: bytes, origin: str = "") -> None:
        self.added.append((partition_key, data, origin))

    def dead_letter(self, partition_key: str, data: bytes, origin: str, reason: str) -> None:
        self.dead.append((origin, reason))


def runner(limits: CaptureLimits | None = None) -> tuple[Capture, RecordingSink]:
    sink = RecordingSink()
    capture = Capture(Connection(), sink, "slot", "publication", limits)  # type: ignore[arg-type]
    capture.keys = {"bids": ["id"], "listings": ["id"]}
    return capture, sink


def read(
    items: Iterable[Message | Keepalive],
    target: int = 0x230,
    caught_up_at: int = 0x300,
    limits: CaptureLimits | None = None,
    remaining_s: Callable[[], float] = NO_TIME_LIMIT,
) -> tuple[_Reading, RecordingSink, CaptureResult, Stream]:
    """One run's read of ``items`` up to ``target``."""
    capture, sink = runner(limits)
    stream = Stream(items, caught_up_at)
    result = CaptureResult()
    reading = capture._read(stream, target, result, remaining_s)
    return reading, sink, result, stream


def capture(items: list[Message]) -> tuple[RecordingSink, CaptureResult]:
    _, sink, result, _ = read(items)
    return sink, result


def landed(sink: RecordingSink) -> list[dict[str, str | None]]:
    return [events.decode(data.decode())[0] for _, data, _ in sink.added]


def test_bid_and_listing_changes_become_contract_events_keyed_by_listing() -> None:
    bid = values(7, 1, "u1", "12.5", "2026-12-04 15:52:59.5+00")
    listing = values(1, "s1", "Pop!", None, 2, "3.00", "live", None, "2026-12-05 10:00:00+00", "d")
    sink, result = capture(
        transaction(
            b"I" + struct.pack("!i", BIDS_OID) + b"N" + bid,
            b"I" + struct.pack("!i", LISTINGS_OID) + b"N" + listing,
        )
    )

    placed, listed = landed(sink)
    assert (result.changes, result.events, result.transactions) == (2, 2, 1)
    assert [key for key, _, _ in sink.added] == ["1", "1"]
    assert [origin for _, _, origin in sink.added] == [placed["event_id"], listed["event_id"]]
    assert placed["event_id"] == events.event_id("0/200", "0/1F9", "bids", "7", "insert")
    assert (placed["bid_id"], placed["listing_id"], placed["amount"]) == ("7", "1", "12.5")
    assert placed["placed_at"] == "2026-12-04T15:52:59.500000Z"
    assert placed["commit_time"] == "2000-01-01T00:00:00.000000Z"
    assert (listed["category_id"], listed["category"], listed["sub_category"]) == (
        "1",
        "Toys",
        "Funko",
    )
    assert listed["ends_at"] == "2026-12-05T10:00:00.000000Z"


def test_category_titles_are_read_once_per_sub_category_in_a_run() -> None:
    listing = values(1, "s1", "Pop!", None, 2, "3.00", "live", None, "2026-12-05 10:00:00+00", "d")
    unknown = values(3, "s1", "Pop!", 4, 9, "3.00", "live", None, "2026-12-05 10:00:00+00", "d")
    change = b"I" + struct.pack("!i", LISTINGS_OID) + b"N"
    capture, sink = runner()
    stream = Stream(transaction(change + listing, change + listing, change + unknown), 0x300)

    capture._read(stream, 0x230, CaptureResult(), NO_TIME_LIMIT)

    connection = capture.conn
    assert len(connection.queries) == 2  # sub-categories 2 and 9, each once
    assert [event["sub_category"] for event in landed(sink)] == ["Funko", "Funko", None]
    assert landed(sink)[2]["category_id"] == "4"


def test_an_unchanged_toasted_value_is_taken_from_the_old_row() -> None:
    old = values(1, "s1", "Pop!", 1, 2, "3.00", "live", None, "2026-12-05 10:00:00+00", "long")
    new = values(1, "s1", "Pop!", 1, 2, "4.00", "live", None, "2026-12-05 10:00:00+00", UNCHANGED)
    sink, _ = capture(transaction(b"U" + struct.pack("!i", LISTINGS_OID) + b"O" + old + b"N" + new))

    (updated,) = landed(sink)
    assert (updated["op"], updated["price"], updated["description"]) == ("update", "4.00", "long")


def test_an_unchanged_value_without_the_old_row_is_refused_with_the_fix() -> None:
    new = values(1, "s1", "Pop!", 1, 2, "4.00", "live", None, "2026-12-05 10:00:00+00", UNCHANGED)

    with pytest.raises(CaptureError, match=r"listings.description at 0/1F9.*REPLICA IDENTITY FULL"):
        capture(transaction(b"U" + struct.pack("!i", LISTINGS_OID) + b"N" + new))


def test_an_event_that_breaks_the_contract_is_dead_lettered_and_the_rest_go_on() -> None:
    broken = values(7, 1, "u1", "1e3", "2026-12-04 15:52:59+00")
    fine = values(8, 1, "u1", "2.00", "2026-12-04 15:52:59+00")
    sink, result = capture(
        transaction(
            b"I" + struct.pack("!i", BIDS_OID) + b"N" + broken,
            b"I" + struct.pack("!i", BIDS_OID) + b"N" + fine,
        )
    )

    ((origin, reason),) = sink.dead
    assert origin == events.event_id("0/200", "0/1F9", "bids", "7", "insert")
    assert reason.startswith("bids key 7 at 0/200: amount='1e3'")
    assert [event["bid_id"] for event in landed(sink)] == ["8"]
    assert (result.changes, result.events) == (2, 1)


def test_a_run_stops_at_the_commit_that_spends_its_byte_budget_and_reads_no_further() -> None:
    second = [Message(0x240, pgoutput_wire.begin(0x300, 10)), Message(0x248, b"not pgoutput")]

    reading, sink, _, stream = read(
        transaction(bid(7)) + second, target=0x400, limits=CaptureLimits(max_bytes=1)
    )

    assert (reading.stopped, reading.confirm) == ("bytes", 0x230)
    assert [event["bid_id"] for event in landed(sink)] == ["7"]
    assert reading.bytes == len(sink.added[0][1])
    assert list(stream.items) == second


def test_a_run_stops_at_the_commit_that_reaches_its_target() -> None:
    later = transaction(bid(8), final_lsn=0x260, end_lsn=0x270)

    reading, sink, _, stream = read(transaction(bid(7)) + later, target=0x230)

    assert (reading.stopped, reading.confirm) == ("drained", 0x230)
    assert [event["bid_id"] for event in landed(sink)] == ["7"]
    assert list(stream.items) == later


def test_with_nothing_to_send_a_run_confirms_where_the_server_has_decoded_past_its_target() -> None:
    reading, sink, result, stream = read([], target=0x400, caught_up_at=0x480)

    assert (reading.stopped, reading.confirm) == ("drained", 0x480)
    assert stream.replies_asked >= 1
    assert (sink.added, result.transactions) == ([], 0)


def test_a_keepalive_past_the_target_inside_a_transaction_waits_for_its_commit() -> None:
    # A transaction that began before the target and commits after it is sent whole
    # once its commit arrives; the keepalive in between ends nothing.
    messages = transaction(bid(7), final_lsn=0x500, end_lsn=0x520)
    items = [*messages[:-1], Keepalive(0x510), messages[-1]]

    reading, sink, result, _ = read(items, target=0x400)

    assert (reading.stopped, reading.confirm) == ("drained", 0x520)
    assert (result.transactions, len(sink.added)) == (1, 1)


def test_a_server_that_stays_below_the_target_ends_the_run_once_it_has_caught_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The target can lie past the last record written: the rest of a page, or a record
    # still being written. The server then answers from the same position until more
    # WAL is flushed.
    monkeypatch.setattr(capture_module, "CAUGHT_UP_S", 0.05)

    reading, _, _, stream = read(transaction(bid(7)), target=0x400, caught_up_at=0x238)

    assert (reading.stopped, reading.confirm) == ("drained", 0x238)
    assert stream.replies_asked > 1


def test_time_running_out_while_a_transaction_streams_in_confirms_the_last_commit() -> None:
    calls = itertools.count()
    second = transaction(bid(8), final_lsn=0x260, end_lsn=0x270)[:-1]  # no commit yet

    reading, _, _, _ = read(
        transaction(bid(7)) + second,
        target=0x400,
        remaining_s=lambda: float("inf") if next(calls) == 0 else 0.0,
    )

    assert (reading.stopped, reading.confirm) == ("time", 0x230)


def test_a_server_that_never_answers_is_taken_as_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capture_module, "SILENCE_S", 0.05)
    capture, _ = runner()
    stream = Stream([], 0x300, answers=False)

    with pytest.raises(CaptureError, match=r"slot 'slot' heard nothing from the server"):
        capture._read(stream, 0x230, CaptureResult(), NO_TIME_LIMIT)


def test_a_confirmed_position_the_slot_never_shows_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(capture_module, "SLOT_WAIT_S", 0.02)
    capture, _ = runner()
    capture._stream = Stream([], 0x300)

    with pytest.raises(CaptureError, match=r"'slot' was confirmed up to 0/230 but shows 0/100"):
        capture._advance(0x230)


def test_a_slot_still_held_after_the_run_is_reported_and_left_unwritten(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(capture_module, "SLOT_WAIT_S", 0.02)
    capture, _ = runner()
    capture.conn.active_pid = 4242

    capture._keep(0x230)

    assert "slot slot is confirmed up to 0/230 but may not be written" in caplog.text
    assert "process 4242" in caplog.text
    assert not any("pg_replication_slot_advance" in query for query in capture.conn.queries)
