"""From pgoutput messages to contract events, with the slot and Kinesis replaced by stubs."""

from __future__ import annotations

import struct
from typing import Any

import pgoutput_wire
import pytest

from encore import events
from lambdas.capture.capture import (
    Capture,
    CaptureError,
    CaptureLimits,
    CaptureResult,
    _CopyRows,
)
from lambdas.capture.kinesis_sink import SinkStats
from lambdas.capture.pgoutput import UNCHANGED

BIDS_OID = 16_400
LISTINGS_OID = 16_500


def relation(oid: int, table: str, columns: list[str]) -> bytes:
    return pgoutput_wire.relation(oid, table, [(name, 25) for name in columns])


values = pgoutput_wire.tuple_data


def transaction(*changes: bytes) -> list[tuple[str, bytes]]:
    begin = b"B" + struct.pack("!qqi", 0x200, 0, 9)
    commit = b"C" + struct.pack("!bqqq", 0, 0x200, 0x230, 0)
    rows = [("0/1F0", relation(BIDS_OID, "bids", BID_COLUMNS))]
    rows.append(("0/1F0", relation(LISTINGS_OID, "listings", LISTING_COLUMNS)))
    rows.append(("0/1F8", begin))
    rows.extend((f"0/{0x1F8 + number:X}", change) for number, change in enumerate(changes, 1))
    rows.append(("0/230", commit))
    return rows


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


def copy_stream(rows: list[tuple[str, bytes]]) -> list[bytes]:
    """The rows as COPY ... TO STDOUT (FORMAT binary) writes them: one chunk per row."""
    chunks = []
    for lsn, data in rows:
        text = lsn.encode()
        chunk = struct.pack("!hi", 2, len(text)) + text + struct.pack("!i", len(data)) + data
        chunks.append(chunk)
    chunks[0] = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0) + chunks[0]
    return [*chunks, struct.pack("!h", -1)]


class Cursor:
    def __init__(self, rows: list[tuple[str, bytes]]) -> None:
        self.rows = rows

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def execute(self, *_: Any) -> None:
        return None

    def fetchone(self) -> tuple[Any, ...]:
        return ("0/300",)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [("2", "Funko", "1", "Toys")]

    def mogrify(self, query: str, *_: Any) -> bytes:
        return query.encode()

    def copy_expert(self, query: str, file: Any) -> None:
        assert "TO STDOUT (FORMAT binary)" in query
        for chunk in copy_stream(self.rows):
            file.write(chunk)


class Connection:
    autocommit = True

    def __init__(self, rows: list[tuple[str, bytes]]) -> None:
        self.rows = rows

    def cursor(self) -> Cursor:
        return Cursor(self.rows)


class RecordingSink:
    def __init__(self) -> None:
        self.stats = SinkStats()
        self.added: list[tuple[str, bytes, str]] = []
        self.dead: list[tuple[str, str]] = []

    def add(self, partition_key: str, data: bytes, origin: str = "") -> None:
        self.added.append((partition_key, data, origin))

    def dead_letter(self, partition_key: str, data: bytes, origin: str, reason: str) -> None:
        self.dead.append((origin, reason))


def capture(rows: list[tuple[str, bytes]]) -> tuple[RecordingSink, CaptureResult]:
    sink = RecordingSink()
    runner = Capture(Connection(rows), sink, "slot", "publication")  # type: ignore[arg-type]
    runner.keys = {"bids": ["id"], "listings": ["id"]}
    result = CaptureResult()
    runner._read_batch(result, lambda: float("inf"), 0)
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


def test_a_batch_stops_at_the_commit_that_spends_its_byte_budget_and_drops_the_rest() -> None:
    first = transaction(b"I" + struct.pack("!i", BIDS_OID) + b"N" + values(7, 1, "u1", "1", None))
    second = [("0/240", b"B" + struct.pack("!qqi", 0x300, 0, 10)), ("0/248", b"not pgoutput")]
    sink = RecordingSink()
    runner = Capture(
        Connection(first + second),
        sink,  # type: ignore[arg-type]
        "slot",
        "publication",
        CaptureLimits(max_bytes=1),
    )
    runner.keys = {"bids": ["id"], "listings": ["id"]}

    _, rows, last_end, stopped, spent = runner._read_batch(CaptureResult(), lambda: float("inf"), 0)

    assert (stopped, last_end, rows) == ("bytes", 0x230, len(first) + len(second))
    assert [event["bid_id"] for event in landed(sink)] == ["7"]
    assert spent == len(sink.added[0][1])


def test_the_copy_header_may_carry_an_extension_area() -> None:
    rows = transaction(b"I" + struct.pack("!i", BIDS_OID) + b"N" + values(7, 1, "u1", "1", None))
    taken: list[tuple[str, bytes]] = []
    target = _CopyRows(lambda lsn, data: taken.append((lsn, data)))
    chunks = copy_stream(rows)
    header_end = len(b"PGCOPY\n\xff\r\n\0") + 8
    chunks[0] = chunks[0][: header_end - 4] + struct.pack("!i", 3) + b"ext" + chunks[0][header_end:]

    for chunk in chunks:
        target.write(chunk)

    assert target.failure is None
    assert taken == rows


def test_a_stream_that_is_not_binary_copy_is_refused() -> None:
    target = _CopyRows(lambda lsn, data: None)

    target.write(b"0/1F0\t\\x52\n")
    target.write(struct.pack("!hi", 2, 3) + b"0/1" + struct.pack("!i", 1) + b"B")

    assert isinstance(target.failure, CaptureError)
    assert "not a header" in str(target.failure)
