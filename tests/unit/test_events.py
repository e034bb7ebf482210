from __future__ import annotations

import csv
import io
import random

import pytest

from encore import events


def bid_event(**changes: str | None) -> dict[str, str | None]:
    event: dict[str, str | None] = {
        "event_id": events.event_id("0/16B3748", "0/16B3700", "bids", "1", "insert"),
        "event_type": "bid",
        "op": "insert",
        "commit_lsn": "0/16B3748",
        "commit_time": "2026-12-04 15:52:59.123+00",
        "table_key": "1",
        "listing_id": "1234567890123456789",
        "bid_id": "1",
        "bidder_id": "u1",
        "amount": "12.50",
        "placed_at": "2026-12-04T15:52:59Z",
    }
    event.update(changes)
    return event


def test_encode_quotes_commas_quotes_and_newlines_and_decode_returns_them() -> None:
    title = 'Funko "Pop", signed\nby the artist'
    line = events.encode(bid_event(event_type="listing", title=title, description="a,b"))

    assert line.endswith(b"\n")
    assert line.count(b"\n") == 2  # one inside the quoted title, one ending the record
    (decoded,) = events.decode(line.decode())
    assert decoded["title"] == title
    assert decoded["description"] == "a,b"
    assert next(iter(csv.reader(io.StringIO(line.decode()))))[13] == title


def test_encode_keeps_a_19_digit_id_and_the_largest_amount_as_strings() -> None:
    (decoded,) = events.decode(events.encode(bid_event(amount="9999999999999999.99")).decode())

    assert decoded["listing_id"] == "1234567890123456789"
    assert decoded["amount"] == "9999999999999999.99"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-12-04 15:52:59+00", "2026-12-04T15:52:59.000000Z"),
        ("2026-12-04 15:52:59.123+00", "2026-12-04T15:52:59.123000Z"),
        ("2026-12-04 15:52:59.123456+00", "2026-12-04T15:52:59.123456Z"),
        ("2026-12-04 16:52:59.5+01", "2026-12-04T15:52:59.500000Z"),
        ("2026-12-04 21:22:59+05:30", "2026-12-04T15:52:59.000000Z"),
        ("2026-12-04T10:52:59-0500", "2026-12-04T15:52:59.000000Z"),
        ("2026-12-04T15:52:59Z", "2026-12-04T15:52:59.000000Z"),
    ],
)
def test_normalize_time_gives_utc_with_microseconds(raw: str, expected: str) -> None:
    assert events.normalize_time(raw) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"amount": "NaN"}, "amount='NaN' is not finite"),
        ({"amount": "12,5"}, "amount='12,5' is not a decimal"),
        ({"amount": "0.000000012345678901"}, "does not fit DECIMAL"),
        ({"amount": "1e3"}, "does not fit DECIMAL"),
        ({"op": "upsert"}, "op='upsert'"),
        ({"commit_lsn": "16B3748"}, "is not an LSN"),
        ({"placed_at": "yesterday"}, "not a timestamp"),
        ({"event_id": None}, "event_id is missing"),
    ],
)
def test_encode_refuses_an_event_that_breaks_the_contract(changes, message: str) -> None:
    with pytest.raises(events.EventError, match=message):
        events.encode(bid_event(**changes))


def test_event_id_is_deterministic_and_tells_apart_two_changes_of_one_row() -> None:
    first = events.event_id("0/10", "0/8", "bids", "1", "update")

    assert first == events.event_id("0/10", "0/8", "bids", "1", "update")
    assert first != events.event_id("0/10", "0/9", "bids", "1", "update")
    assert len(first) == 32


def test_lsn_round_trips() -> None:
    assert events.format_lsn(events.parse_lsn("1A/2B3C")) == "1A/2B3C"
    assert events.parse_lsn("1/0") > events.parse_lsn("0/FFFFFFFF")


def test_decode_refuses_a_record_with_the_wrong_number_of_fields() -> None:
    with pytest.raises(events.EventError, match="record 1 has 2 fields"):
        events.decode("a,b\n")


def test_encode_quotes_a_bare_carriage_return_so_the_line_reads_back() -> None:
    # Regression: a title holding "\r" alone was written unquoted, and reading the
    # landed line back failed ("new-line character seen in unquoted field").
    line = events.encode(bid_event(event_type="listing", title="Pop!\rsigned"))

    assert b'"Pop!\rsigned"' in line
    (decoded,) = events.decode(line.decode())
    assert decoded["title"] == "Pop!\rsigned"


def test_encode_row_gives_the_bytes_of_encode() -> None:
    event = bid_event(title='a "b", c', description=None)
    row = [event.get(name) for name in events.COLUMNS]

    assert events.encode_row(row) == events.encode(event)
    with pytest.raises(events.EventError, match="row has 3 values, expected 22"):
        events.encode_row(["1", "2", "3"])


def test_events_of_different_transactions_keep_their_own_commit_time_and_lsn() -> None:
    first = bid_event(commit_lsn="0/10", commit_time="2026-12-04 15:52:59+00")
    second = bid_event(commit_lsn="0/20", commit_time="2026-12-04 16:52:59.5+01")

    lines = [events.encode(event) for event in (first, second, first)]

    decoded = [events.decode(line.decode())[0] for line in lines]
    assert [(e["commit_lsn"], e["commit_time"]) for e in decoded] == [
        ("0/10", "2026-12-04T15:52:59.000000Z"),
        ("0/20", "2026-12-04T15:52:59.500000Z"),
        ("0/10", "2026-12-04T15:52:59.000000Z"),
    ]
    with pytest.raises(events.EventError, match="is not an LSN"):
        events.encode(bid_event(commit_lsn="0/zz"))


def test_any_text_survives_encode_and_decode() -> None:
    rng = random.Random(11)
    alphabet = 'ab ,"\r\n\té'
    for _ in range(500):
        title, description = ("".join(rng.choices(alphabet, k=rng.randrange(8))) for _ in "td")
        event = bid_event(event_type="listing", title=title, description=description)

        (decoded,) = events.decode(events.encode(event).decode())

        assert decoded["title"] == (title or None)
        assert decoded["description"] == (description or None)
