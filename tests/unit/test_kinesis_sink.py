"""The Kinesis sink against a scripted client: moto never reports partial failures."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from aws_kinesis_agg.deaggregator import iter_deaggregate_records
from botocore.exceptions import ClientError

from lambdas.capture.kinesis_sink import (
    MAX_RECORDS_PER_REQUEST,
    DeliveryError,
    KinesisSink,
    hash_key,
)

HALF = 2**127


class ScriptedKinesis:
    """Two shards splitting the hash space; each put follows the next scripted outcome."""

    def __init__(self, outcomes: list[Any] | None = None) -> None:
        self.outcomes = list(outcomes or [])
        self.calls: list[list[dict[str, Any]]] = []
        self.accepted: list[dict[str, Any]] = []

    def list_shards(self, **_: Any) -> dict[str, Any]:
        return {
            "Shards": [
                {
                    "ShardId": "shard-0",
                    "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": str(HALF - 1)},
                },
                {
                    "ShardId": "shard-1",
                    "HashKeyRange": {
                        "StartingHashKey": str(HALF),
                        "EndingHashKey": str(2**128 - 1),
                    },
                },
            ]
        }

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(Records)
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "throttle":
            raise ClientError(
                {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}},
                "PutRecords",
            )
        results = []
        for number, record in enumerate(Records):
            if isinstance(outcome, set) and number in outcome:
                results.append({"ErrorCode": "InternalFailure", "ErrorMessage": "try again"})
            else:
                self.accepted.append(record)
                results.append({"SequenceNumber": str(len(self.accepted)), "ShardId": "x"})
        failed = sum("ErrorCode" in result for result in results)
        return {"FailedRecordCount": failed, "Records": results}


class RecordingS3:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_object(self, Bucket: str, Key: str, Body: bytes) -> None:
        self.objects[Key] = Body


def make_sink(kinesis: ScriptedKinesis, s3: RecordingS3 | None = None) -> KinesisSink:
    return KinesisSink(
        kinesis, "stream", s3 or RecordingS3(), "bucket", sleep=lambda _: None, rng=random.Random(1)
    )


def user_records(accepted: list[dict[str, Any]]) -> list[tuple[str, bytes, dict[str, Any]]]:
    out = []
    for record in accepted:
        boto_shaped = {
            "SequenceNumber": "1",
            "PartitionKey": record["PartitionKey"],
            "ApproximateArrivalTimestamp": 0,
            "Data": record["Data"],
        }
        for user in iter_deaggregate_records([boto_shaped], data_format="Boto3"):
            out.append(
                (user["kinesis"]["partitionKey"], base64.b64decode(user["kinesis"]["data"]), record)
            )
    return out


def test_sink_delivers_every_record_once_and_aggregates_never_mix_shards() -> None:
    kinesis = ScriptedKinesis()
    sink = make_sink(kinesis)
    sent = {f"listing-{n}": f"event {n}\n".encode() for n in range(2_000)}

    for key, data in sent.items():
        sink.add(key, data)
    sink.flush()

    delivered = user_records(kinesis.accepted)
    assert sorted(data for _, data, _ in delivered) == sorted(sent.values())
    for key, _, record in delivered:
        same_half = (hash_key(key) >= HALF) == (int(record["ExplicitHashKey"]) >= HALF)
        assert same_half, f"{key} travelled in an aggregate bound for the other shard"


def test_sink_retries_only_the_failed_entries_of_a_partial_failure() -> None:
    kinesis = ScriptedKinesis(outcomes=[{0}])
    sink = make_sink(kinesis)
    for n in range(50):
        sink.add(f"k{n}", f"event {n}\n".encode())
    sink.flush()

    first, retry = kinesis.calls
    assert len(first) == 2  # one aggregate per shard
    assert retry == [first[0]]
    assert sorted(data for _, data, _ in user_records(kinesis.accepted)) == sorted(
        f"event {n}\n".encode() for n in range(50)
    )
    assert sink.stats.retried_entries == 1


def test_sink_survives_throttling_and_raises_when_retries_run_out() -> None:
    kinesis = ScriptedKinesis(outcomes=["throttle", "throttle", "ok"])
    sink = make_sink(kinesis)
    sink.add("k", b"event\n")
    sink.flush()
    assert len(kinesis.accepted) == 1
    assert sink.stats.throttled_requests == 2

    stubborn = ScriptedKinesis(outcomes=["throttle"] * 20)
    sink = make_sink(stubborn)
    sink.add("k", b"event\n")
    with pytest.raises(DeliveryError, match="ProvisionedThroughputExceededException"):
        sink.flush()
    assert stubborn.accepted == []


def test_sink_keeps_each_request_within_the_putrecords_limits() -> None:
    kinesis = ScriptedKinesis()
    sink = make_sink(kinesis)
    blob = b"x" * 600_000  # one aggregate holds a single such record
    for n in range(MAX_RECORDS_PER_REQUEST + 20):
        sink.add(f"k{n}", blob)
    sink.flush()

    for call in kinesis.calls:
        assert len(call) <= MAX_RECORDS_PER_REQUEST
        assert sum(len(r["Data"]) + len(r["PartitionKey"]) for r in call) <= 5 * 1024 * 1024
        assert all(len(r["Data"]) <= 1024 * 1024 for r in call)
    assert len(user_records(kinesis.accepted)) == MAX_RECORDS_PER_REQUEST + 20


def test_sink_dead_letters_a_record_too_large_to_send_with_its_reason() -> None:
    kinesis, s3 = ScriptedKinesis(), RecordingS3()
    sink = make_sink(kinesis, s3)
    sink.add("k1", b"y" * (1024 * 1024), origin="event-abc")
    sink.add("k2", b"small\n")
    sink.flush()

    (key,) = s3.objects
    assert key.startswith("dead-letter/capture/") and key.endswith("/event-abc.json")
    body = json.loads(s3.objects[key])
    assert "exceeds the Kinesis limit" in body["reason"]
    assert body["size"] == 1024 * 1024
    assert [data for _, data, _ in user_records(kinesis.accepted)] == [b"small\n"]
