"""pgoutput (protocol 1) messages built byte by byte, as Postgres sends them."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest
from pgoutput_wire import relation, tuple_data

from lambdas.capture.pgoutput import (
    UNCHANGED,
    Begin,
    Change,
    Commit,
    Decoder,
    DecodingError,
    Relation,
)

BIDS_OID = 16_400
COMMIT_TIME = datetime(2026, 12, 4, 15, 52, 59, 123456, tzinfo=UTC)
POSTGRES_MICROS = int((COMMIT_TIME - datetime(2000, 1, 1, tzinfo=UTC)).total_seconds()) * 10**6
POSTGRES_MICROS += COMMIT_TIME.microsecond


def relation_message(oid: int = BIDS_OID) -> bytes:
    columns = [("id", 20), ("listing_id", 20), ("bidder_id", 25), ("amount", 1700)]
    return relation(oid, "bids", columns)


def decoder_with_bids() -> Decoder:
    decoder = Decoder()
    decoder.decode(relation_message())
    return decoder


def test_begin_commit_and_relation_are_decoded() -> None:
    decoder = Decoder()

    begin = decoder.decode(b"B" + struct.pack("!qqi", 0x16B3748, POSTGRES_MICROS, 813))
    commit = decoder.decode(b"C" + struct.pack("!bqqq", 0, 0x16B3748, 0x16B3778, POSTGRES_MICROS))
    relation = decoder.decode(relation_message())

    assert begin == Begin(0x16B3748, COMMIT_TIME, 813)
    assert commit == Commit(0x16B3748, 0x16B3778, COMMIT_TIME)
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name, relation.replica_identity) == ("public", "bids", "f")
    assert [column.name for column in relation.columns] == [
        "id",
        "listing_id",
        "bidder_id",
        "amount",
    ]
    assert decoder.relations[BIDS_OID] is relation


def test_insert_values_arrive_in_column_order_with_nulls() -> None:
    decoder = decoder_with_bids()
    message = b"I" + struct.pack("!i", BIDS_OID) + b"N" + tuple_data(b"7", b"1", None, b"12.50")

    change = decoder.decode(message)

    assert isinstance(change, Change)
    assert (change.op, change.new, change.old) == ("insert", ["7", "1", None, "12.50"], None)
    assert change.relation.oid == BIDS_OID


def test_update_carries_the_old_row_and_marks_unchanged_toasted_values() -> None:
    decoder = decoder_with_bids()
    old = tuple_data(b"7", b"1", "ü".encode(), b"12.50")
    new = tuple_data(b"7", b"1", UNCHANGED, b"13.00")
    message = b"U" + struct.pack("!i", BIDS_OID) + b"O" + old + b"N" + new

    change = decoder.decode(message)

    assert isinstance(change, Change)
    assert change.op == "update"
    assert change.old == ["7", "1", "ü", "12.50"]
    assert change.new == ["7", "1", UNCHANGED, "13.00"]


def test_delete_carries_only_the_key_or_old_row() -> None:
    decoder = decoder_with_bids()
    message = b"D" + struct.pack("!i", BIDS_OID) + b"K" + tuple_data(b"7", None, None, None)

    change = decoder.decode(message)

    assert isinstance(change, Change)
    assert (change.op, change.new, change.old) == ("delete", None, ["7", None, None, None])


@pytest.mark.parametrize("kind", [b"Y", b"O", b"M"])
def test_messages_without_row_changes_decode_to_nothing(kind: bytes) -> None:
    assert Decoder().decode(kind + b"\0\0\0\0") is None


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"I" + struct.pack("!i", 99) + b"N" + tuple_data(b"1"), "relation 99 before its Relation"),
        (b"T" + struct.pack("!ib", 1, 0), "TRUNCATE of a captured table"),
        (b"Z", "unknown message type 'Z'"),
        (b"B\0\0", "message 'B' is malformed"),
        (
            b"I" + struct.pack("!i", BIDS_OID) + b"N" + tuple_data(b"7", b"1", b"u1"),
            "tuple has 3 columns, relation has 4",
        ),
        (
            b"I"
            + struct.pack("!i", BIDS_OID)
            + b"N"
            + tuple_data(b"7", b"1", b"u1", b"12.50")[:-2],
            "message 'I' is malformed",
        ),
        (
            b"I" + struct.pack("!i", BIDS_OID) + b"N\0\x04t\0\0\0\x017x",
            r"bids.listing_id: unknown value kind 'x'",
        ),
        (
            b"I" + struct.pack("!i", BIDS_OID) + b"N" + tuple_data(b"7", b"1", b"\xff", b"1"),
            "message 'I' is malformed",
        ),
    ],
    ids=[
        "unknown relation",
        "truncate",
        "unknown type",
        "short begin",
        "column count",
        "value cut short",
        "value kind",
        "not utf-8",
    ],
)
def test_a_bad_message_is_refused_with_what_is_wrong(message: bytes, error: str) -> None:
    with pytest.raises(DecodingError, match=error):
        decoder_with_bids().decode(message)


def test_an_oid_above_two_to_the_31_names_its_relation() -> None:
    # Oids are unsigned 32-bit numbers; read as signed, a large one would turn negative.
    decoder = Decoder()
    decoder.decode(relation_message(3_000_000_000))
    message = b"I" + struct.pack("!I", 3_000_000_000) + b"N" + tuple_data(b"7", b"1", b"u", b"1")

    change = decoder.decode(message)

    assert isinstance(change, Change)
    assert change.relation.oid == 3_000_000_000
