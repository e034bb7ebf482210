"""The change event contract, written down once and enforced here.

A change event is one row change of a captured table (``bids`` or ``listings``)
as committed in Postgres. Every stage that produces or reads events uses this
module; nobody else spells out a column.

Wire format
-----------
One event is one CSV line: RFC 4180 quoting (a field holding a comma, a quote,
CR or LF is quoted, quotes doubled), fields in the order of ``COLUMNS``, no
header, ending in ``\\n``. The capture puts exactly these bytes into Kinesis,
so Firehose (or the local bridge) lands them unchanged and a landed file is
a valid CSV file. An empty field is NULL.

Columns (schema version 1)
--------------------------
==================  =======================================================
schema_version      ``1``
event_id            32 hex digits: SHA-256 of commit LSN, change LSN, table,
                    key and operation. A replay of the same WAL yields the
                    same ids, so readers remove duplicates by this column.
event_type          ``bid`` or ``listing``
op                  ``insert``, ``update`` or ``delete``
commit_lsn          the transaction's commit position, ``X/X`` hex as
                    Postgres prints it
commit_time         commit time, ISO-8601 UTC with 6 fractional digits
                    (``2026-12-04T15:52:59.123456Z``)
table_key           the row's primary key, as a string
listing_id          string (ids are strings, so 64-bit ids survive any reader)
bid_id              string; bid events only
bidder_id           string; bid events only
amount              decimal string exactly as stored (``12.50``), at most 16
                    integer and 2 fractional digits; bids only
placed_at           when the bid was placed, ISO-8601 UTC; bids only
seller_id           string; listing events only
title               listing title (trailing spaces trimmed at load)
category_id         string; listing events only
category            category title; listing events only
sub_category_id     string; listing events only
sub_category        sub-category title; listing events only
price               the listing's current price, decimal string
status              ``live``, ``sold`` or ``ended``
ends_at             when the auction ends, ISO-8601 UTC
description         free text, may be large; an update that leaves it
                    unchanged still carries it
==================  =======================================================

For a delete, only the key columns are certain to be set: ``table_key`` and
the event type's id columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import ClassVar

SCHEMA_VERSION = "1"

EVENT_TYPES = ("bid", "listing")
OPERATIONS = ("insert", "update", "delete")
LISTING_STATUSES = ("live", "sold", "ended")

COLUMNS: tuple[str, ...] = (
    "schema_version",
    "event_id",
    "event_type",
    "op",
    "commit_lsn",
    "commit_time",
    "table_key",
    "listing_id",
    "bid_id",
    "bidder_id",
    "amount",
    "placed_at",
    "seller_id",
    "title",
    "category_id",
    "category",
    "sub_category_id",
    "sub_category",
    "price",
    "status",
    "ends_at",
    "description",
)

#: Spark SQL types of the columns, for readers that need an explicit schema.
SPARK_TYPES: dict[str, str] = {
    **{name: "STRING" for name in COLUMNS},
    "amount": "DECIMAL(18,2)",
    "price": "DECIMAL(18,2)",
    "commit_time": "TIMESTAMP",
    "placed_at": "TIMESTAMP",
    "ends_at": "TIMESTAMP",
}

TIME_COLUMNS = ("commit_time", "placed_at", "ends_at")
DECIMAL_COLUMNS = ("amount", "price")

_FAST_UTC = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,6}))?(?:\+00(?::?00)?|Z)"
)
_DECIMAL = re.compile(r"-?\d{1,16}(?:\.\d{1,2})?")
_LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")
#: Characters that make a field need quoting (RFC 4180).
_NEEDS_QUOTES = re.compile(r'[,"\r\n]')

_SCHEMA_VERSION = COLUMNS.index("schema_version")
_REQUIRED = tuple(
    (COLUMNS.index(name), name)
    for name in ("event_id", "event_type", "op", "commit_lsn", "commit_time", "table_key")
)
_EVENT_TYPE = COLUMNS.index("event_type")
_OP = COLUMNS.index("op")
_COMMIT_LSN = COLUMNS.index("commit_lsn")
_STATUS = COLUMNS.index("status")
_COMMIT_TIME = COLUMNS.index("commit_time")
_OTHER_TIMES = tuple(COLUMNS.index(name) for name in TIME_COLUMNS if name != "commit_time")
_DECIMALS = tuple((COLUMNS.index(name), name) for name in DECIMAL_COLUMNS)


class EventError(ValueError):
    """An event breaks the contract; the message names the column and value."""


def spark_ddl() -> str:
    """The contract as a Spark DDL schema string, in column order."""
    return ", ".join(f"{name} {SPARK_TYPES[name]}" for name in COLUMNS)


def event_id(commit_lsn: str, change_lsn: str, table: str, key: str, op: str) -> str:
    """The deterministic id of one change.

    The change's own LSN tells apart two changes of one row in one transaction.
    """
    material = "|".join((commit_lsn, change_lsn, table, key, op))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def normalize_time(text: str) -> str:
    """Turn a Postgres or ISO-8601 timestamp into ISO-8601 UTC with microseconds.

    Accepts 0 to 6 fractional digits and offsets written ``+01``, ``+0530`` or
    ``+05:30``; a time without an offset is taken as UTC.
    """
    fast = _FAST_UTC.fullmatch(text)
    if fast is not None:
        # Postgres's own output in a UTC session: reformat without date arithmetic.
        day, clock, fraction = fast.groups()
        return f"{day}T{clock}.{(fraction or '').ljust(6, '0')}Z"
    match = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,6}))?"
        r"(Z|[+-]\d{2}(?::?\d{2})?(?::?\d{2})?)?",
        text.strip(),
    )
    if match is None:
        raise EventError(f"not a timestamp: {text!r}")
    day, clock, fraction, offset = match.groups()
    moment = datetime.fromisoformat(f"{day}T{clock}").replace(
        microsecond=int((fraction or "0").ljust(6, "0")), tzinfo=_offset(offset)
    )
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _offset(text: str | None) -> timezone:
    if not text or text == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes, seconds = int(digits[:2]), int(digits[2:4] or 0), int(digits[4:6] or 0)
    return timezone(sign * timedelta(hours=hours, minutes=minutes, seconds=seconds))


def normalize_decimal(text: str, column: str = "amount") -> str:
    """Check that ``text`` is a plain decimal that fits ``DECIMAL(18,2)`` and return it.

    Amounts are money: at most 16 digits before the point and 2 after, no
    exponent, so every reader holds the value exactly.
    """
    if not _DECIMAL.fullmatch(text):
        try:
            value = Decimal(text)
        except InvalidOperation as exc:
            raise EventError(f"{column}={text!r} is not a decimal") from exc
        if not value.is_finite():
            raise EventError(f"{column}={text!r} is not finite")
        raise EventError(f"{column}={text!r} does not fit DECIMAL(18,2)")
    return text


def validate(event: Mapping[str, str | None]) -> dict[str, str | None]:
    """Check one event against the contract and return it with every column present."""
    return dict(zip(COLUMNS, _checked(_row_of(event)), strict=True))


def encode(event: Mapping[str, str | None]) -> bytes:
    """One event as one CSV line (UTF-8, ``\\n``-terminated), after validation."""
    return _line(_checked(_row_of(event)))


def encode_row(row: Sequence[str | None]) -> bytes:
    """:func:`encode` for an event given as its values in ``COLUMNS`` order.

    The same checks and the same bytes as :func:`encode`, without building a
    mapping per event: the capture's path.
    """
    if len(row) != len(COLUMNS):
        raise EventError(f"row has {len(row)} values, expected {len(COLUMNS)}")
    return _line(_checked(list(row)))


def _row_of(event: Mapping[str, str | None]) -> list[str | None]:
    unknown = set(event) - set(COLUMNS)
    if unknown:
        raise EventError(f"unknown columns {sorted(unknown)!r}")
    return [event.get(name) for name in COLUMNS]


class _Checked:
    """The last commit LSN and commit time that passed, with the time normalized.

    Every event of a transaction shares both, so checking them again for each
    event would only repeat work. Kept by identity: a string never changes.
    """

    commit_lsn: ClassVar[str | None] = None
    commit_time: ClassVar[tuple[str | None, str | None]] = (None, None)


def _checked(row: list[str | None]) -> list[str | None]:
    """The contract's rules, applied in place to a row in ``COLUMNS`` order."""
    if not row[_SCHEMA_VERSION]:
        row[_SCHEMA_VERSION] = SCHEMA_VERSION
    for index, name in _REQUIRED:
        if not row[index]:
            raise EventError(f"{name} is missing")
    if row[_EVENT_TYPE] not in EVENT_TYPES:
        raise EventError(f"event_type={row[_EVENT_TYPE]!r} is not one of {EVENT_TYPES}")
    if row[_OP] not in OPERATIONS:
        raise EventError(f"op={row[_OP]!r} is not one of {OPERATIONS}")
    commit_lsn = row[_COMMIT_LSN]
    if commit_lsn is not _Checked.commit_lsn:
        if not _LSN.match(commit_lsn or ""):
            raise EventError(f"commit_lsn={commit_lsn!r} is not an LSN")
        _Checked.commit_lsn = commit_lsn
    status = row[_STATUS]
    if status is not None and status not in LISTING_STATUSES:
        raise EventError(f"status={status!r} is not one of {LISTING_STATUSES}")

    commit_time = row[_COMMIT_TIME]
    last_time, last_normalized = _Checked.commit_time
    if commit_time is last_time:
        row[_COMMIT_TIME] = last_normalized
    else:
        normalized = normalize_time(commit_time or "")
        _Checked.commit_time = (commit_time, normalized)
        row[_COMMIT_TIME] = normalized
    for index in _OTHER_TIMES:
        value = row[index]
        if value is not None:
            row[index] = normalize_time(value)
    for index, name in _DECIMALS:
        value = row[index]
        if value is not None:
            row[index] = normalize_decimal(value, name)
    return row


def _line(row: list[str | None]) -> bytes:
    """RFC 4180: quote a field holding a comma, a quote, CR or LF; double its quotes."""
    fields = [value or "" for value in row]
    line = ",".join(fields)
    # When the joined line has no special character beyond its separators, no
    # field needed quoting: the common case, one scan instead of one per field.
    if line.count(",") != len(COLUMNS) - 1 or '"' in line or "\n" in line or "\r" in line:
        line = ",".join(
            '"' + field.replace('"', '""') + '"' if _NEEDS_QUOTES.search(field) else field
            for field in fields
        )
    return (line + "\n").encode()


def decode(
    lines: str | Iterable[str], on_error: Callable[[EventError], None] | None = None
) -> list[dict[str, str | None]]:
    """Read landed CSV text back into events; the inverse of :func:`encode`.

    A record with the wrong number of fields raises :class:`EventError`, or, when
    ``on_error`` is given, is handed to it and skipped.
    """
    source = io.StringIO(lines) if isinstance(lines, str) else lines
    events = []
    for number, fields in enumerate(csv.reader(source), start=1):
        if len(fields) != len(COLUMNS):
            error = EventError(f"record {number} has {len(fields)} fields, expected {len(COLUMNS)}")
            if on_error is None:
                raise error
            on_error(error)
            continue
        events.append({name: (value or None) for name, value in zip(COLUMNS, fields, strict=True)})
    return events
