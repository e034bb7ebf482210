"""Hand-framed KPL aggregates against aws-kinesis-agg, the reference for the format."""

from __future__ import annotations

import base64
import random

import pytest
from aws_kinesis_agg.aggregator import AggRecord
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

from lambdas.capture.kinesis_sink import hash_key
from lambdas.capture.kpl import MAGIC, Aggregate, varint

UserRecord = tuple[str, str, bytes]

ROOMY = 1024 * 1024


def user_record(partition_key: str, data: bytes) -> UserRecord:
    return partition_key, str(hash_key(partition_key)), data


def reference(records: list[UserRecord]) -> tuple[str, str, bytes]:
    """What aws-kinesis-agg builds from the same user records."""
    aggregate = AggRecord(ROOMY)
    for partition_key, explicit_hash_key, data in records:
        assert aggregate.add_user_record(partition_key, data, explicit_hash_key)
    partition_key, explicit_hash_key, blob = aggregate.get_contents()
    return partition_key, explicit_hash_key, blob


def framed(records: list[UserRecord]) -> Aggregate:
    aggregate = Aggregate(ROOMY)
    for partition_key, explicit_hash_key, data in records:
        assert aggregate.add(partition_key, explicit_hash_key, data)
    return aggregate


def deaggregated(partition_key: str, blob: bytes) -> list[UserRecord]:
    boto_shaped = {
        "SequenceNumber": "1",
        "PartitionKey": partition_key,
        "ApproximateArrivalTimestamp": 0,
        "Data": blob,
    }
    return [
        (
            user["kinesis"]["partitionKey"],
            user["kinesis"]["explicitHashKey"],
            base64.b64decode(user["kinesis"]["data"]),
        )
        for user in iter_deaggregate_records([boto_shaped], data_format="Boto3")
    ]


CASES = {
    "one record": [user_record("1", b"event\n")],
    "one key, many records": [user_record("42", f"bid {n}\n".encode()) for n in range(300)],
    "keys interleaved": [
        user_record(str(n % 7), f"event {n}\n".encode() * (n % 5 + 1)) for n in range(200)
    ],
    "more keys than a one-byte index": [user_record(str(n), b"x\n") for n in range(300)],
    "empty data": [user_record("k", b""), user_record("k", b"after\n")],
    "record over a two-byte length": [user_record("big", b"y" * 70_000), user_record("k", b"z")],
    "non-ascii key and data": [user_record("enchère-1", "Pokémon, mint\n".encode())],
}


@pytest.mark.parametrize("records", CASES.values(), ids=CASES.keys())
def test_aggregate_is_byte_for_byte_what_aws_kinesis_agg_builds(records: list[UserRecord]) -> None:
    aggregate = framed(records)
    blob = aggregate.seal()

    assert (aggregate.partition_key, aggregate.explicit_hash_key, blob) == reference(records)
    assert blob.startswith(MAGIC)
    assert aggregate.size == len(blob)
    assert aggregate.count == len(records)


@pytest.mark.parametrize("records", CASES.values(), ids=CASES.keys())
def test_aggregate_deaggregates_to_its_user_records_keys_and_hash_keys(
    records: list[UserRecord],
) -> None:
    aggregate = framed(records)

    assert deaggregated(aggregate.partition_key, aggregate.seal()) == records


def test_aggregate_refuses_a_record_that_would_overflow_and_stays_as_it_was() -> None:
    rng = random.Random(5)
    records = [
        user_record(str(rng.randrange(50)), rng.randbytes(rng.randrange(400))) for _ in range(80)
    ]
    limit = 8_000
    aggregate = Aggregate(limit)
    taken = []
    for record in records:
        before = aggregate.seal()
        if aggregate.add(*record):
            taken.append(record)
        else:
            assert aggregate.seal() == before
            break

    assert len(taken) < len(records), "the limit was never reached"
    assert aggregate.size == len(aggregate.seal()) <= limit
    assert deaggregated(aggregate.partition_key, aggregate.seal()) == taken


def test_an_empty_aggregate_refuses_a_record_larger_than_its_limit() -> None:
    aggregate = Aggregate(1_000)

    assert not aggregate.add(*user_record("k", b"x" * 1_000))
    assert aggregate.count == 0


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**35])
def test_varint_matches_protobuf_base_128(value: int) -> None:
    expected = bytearray()
    rest = value
    while True:
        low, rest = rest & 0x7F, rest >> 7
        expected.append(low | (0x80 if rest else 0))
        if not rest:
            break
    assert varint(value) == bytes(expected)
