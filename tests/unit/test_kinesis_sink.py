"""The Kinesis sink against a scripted client: moto never reports partial failures."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
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
    """Shards splitting the hash space (two halves unless told); each put follows the next
    scripted outcome."""

    def __init__(self, outcomes: list[Any] | None = None, starts: list[int] | None = None) -> None:
        self.outcomes = list(outcomes or [])
        self.starts = starts or [0, HALF]
        self.calls: list[list[dict[str, Any]]] = []
        self.accepted: list[dict[str, Any]] = []

    def list_shards(self, **_: Any) -> dict[str, Any]:
        ends = [start - 1 for start in self.starts[1:]] + [2**128 - 1]
        return {
            "Shards": [
                {
                    "ShardId": f"shard-{number}",
                    "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
                }
                for number, (start, end) in enumerate(zip(self.starts, ends, strict=True))
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
        if outcome == "missing":
            raise ClientError(
                {"Error": {"Code": "ResourceNotFoundException", "Message": "no stream"}},
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
    """(partition key, data, the Kinesis record that carried it) of every user record."""
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


def test_sink_gives_each_user_record_its_hash_and_each_aggregate_its_first_records_keys() -> None:
    kinesis = ScriptedKinesis()
    sink = make_sink(kinesis)
    for n in range(3_000):
        sink.add(f"listing-{n % 40}", f"event {n}\n".encode() * 100)
    sink.flush()

    assert len(kinesis.accepted) > 2, "expected several aggregates per shard"
    for record in kinesis.accepted:
        boto_shaped = {
            "SequenceNumber": "1",
            "PartitionKey": record["PartitionKey"],
            "ApproximateArrivalTimestamp": 0,
            "Data": record["Data"],
        }
        users = [user["kinesis"] for user in iter_deaggregate_records([boto_shaped], "Boto3")]
        assert record["PartitionKey"] == users[0]["partitionKey"]
        assert record["ExplicitHashKey"] == users[0]["explicitHashKey"]
        for user in users:
            assert user["explicitHashKey"] == str(hash_key(user["partitionKey"]))
        assert len(record["Data"]) <= 1024 * 1024 - 4 * 1024


class SlowKinesis(ScriptedKinesis):
    """Takes a while per put and notes how many puts ever overlapped."""

    def __init__(self, delay_s: float = 0.005) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(self.delay_s)
        try:
            return super().put_records(StreamName, Records)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_sink_sends_one_request_at_a_time_and_keeps_each_shards_order() -> None:
    kinesis = SlowKinesis()
    sink = make_sink(kinesis)
    sent = [(f"listing-{n % 13}", f"event {n:05d}\n".encode() + b"." * 5_000) for n in range(2_000)]
    for key, data in sent:
        sink.add(key, data)
    sink.flush()

    assert kinesis.most_in_flight == 1
    # 10 MB in aggregates of under 1 MB, at most 5 MB a request: three requests or more,
    # however the sender's pace splits them.
    assert len(kinesis.calls) >= 3
    for shard_is_upper in (False, True):
        expected = [data for key, data in sent if (hash_key(key) >= HALF) == shard_is_upper]
        delivered = [
            data
            for _, data, record in user_records(kinesis.accepted)
            if (int(record["ExplicitHashKey"]) >= HALF) == shard_is_upper
        ]
        assert delivered == expected


def test_sink_raises_a_failure_of_a_request_sent_in_the_background() -> None:
    kinesis = ScriptedKinesis(outcomes=["missing"])
    sink = make_sink(kinesis)
    blob = b"x" * 600_000  # one per aggregate: the second add sends the first aggregate

    with pytest.raises(DeliveryError, match="ResourceNotFoundException"):
        for n in range(4):
            sink.add(f"k{n}", blob)
        sink.flush()
    assert len(kinesis.calls) == 1


def test_sink_close_waits_for_the_request_in_flight_and_drops_the_rest() -> None:
    kinesis = SlowKinesis(delay_s=0.5)
    sink = make_sink(kinesis)
    for _ in range(3):  # one per aggregate: the second add sends, the third finds it busy
        sink.add("k", b"x" * 600_000)

    sink.close()

    assert kinesis.in_flight == 0
    sink.flush()
    assert len(kinesis.calls) == len(kinesis.accepted) == 1


def test_sink_routes_by_the_shards_read_at_the_last_refresh() -> None:
    kinesis = ScriptedKinesis()
    sink = make_sink(kinesis)
    keys = [f"listing-{n}" for n in range(500)]
    for key in keys:
        sink.add(key, b"before\n")
    sink.flush()

    kinesis.starts = [0, HALF // 2, HALF, HALF + HALF // 2]  # each shard split in two
    sink.refresh_shards()
    kinesis.accepted.clear()
    for key in keys:
        sink.add(key, b"after\n")
    sink.flush()

    assert len(kinesis.accepted) == 4
    for key, _, record in user_records(kinesis.accepted):
        quarter = hash_key(key) // (HALF // 2)
        assert int(record["ExplicitHashKey"]) // (HALF // 2) == quarter, key
