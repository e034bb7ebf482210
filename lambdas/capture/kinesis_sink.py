"""Put change events to Kinesis, KPL-aggregated, without losing or mixing any.

Aggregation packs many user records into one Kinesis record. A consumer
deaggregates it on whichever shard it landed, so every user record inside
one aggregate must belong to the same shard: otherwise, after a reshard, a
KCL consumer can drop the records that belong elsewhere. Here each user
record's partition key is hashed (MD5, as Kinesis does) and placed in the
aggregator of the shard whose hash range holds it, and the aggregate is sent
with an explicit hash key inside that range.

PutRecords limits are checked before sending: at most 500 records and
5 MiB per request, 1 MiB per record (data and partition key together). A
user record too large to send even alone goes to the S3 dead-letter prefix
with its reason. Entries that PutRecords reports failed are retried alone,
with full-jitter exponential back-off; a throttled request is retried whole.
When retries run out the sink raises and the caller must not confirm the
slot, so the batch is read again next time.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_kinesis_agg.aggregator import RecordAggregator
from botocore.exceptions import ClientError

from encore import layout

logger = logging.getLogger(__name__)

MAX_RECORDS_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024
#: Room left in an aggregate for its partition key, explicit hash key and framing.
AGGREGATE_HEADROOM = 4 * 1024
RETRYABLE_CODES = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "LimitExceededException",
    "InternalFailure",
    "ServiceUnavailable",
    "KMSThrottlingException",
}


class DeliveryError(RuntimeError):
    """Kinesis did not accept every record after all retries."""


@dataclass
class SinkStats:
    user_records: int = 0
    kinesis_records: int = 0
    requests: int = 0
    retried_entries: int = 0
    throttled_requests: int = 0
    dead_lettered: int = 0
    bytes_sent: int = 0


@dataclass(frozen=True)
class _Shard:
    shard_id: str
    starting_hash: int
    ending_hash: int


def hash_key(partition_key: str) -> int:
    """The 128-bit hash Kinesis maps a partition key to a shard with."""
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big")


class KinesisSink:
    def __init__(
        self,
        kinesis: Any,
        stream_name: str,
        s3: Any,
        bucket: str,
        max_attempts: int = 8,
        base_delay_s: float = 0.05,
        max_delay_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.kinesis = kinesis
        self.stream_name = stream_name
        self.s3 = s3
        self.bucket = bucket
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.stats = SinkStats()
        self._shards: list[_Shard] = []
        self._starts: list[int] = []
        self._aggregators: dict[str, RecordAggregator] = {}
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0

    def refresh_shards(self) -> None:
        """Read the open shards' hash ranges; call before each batch."""
        shards = []
        paginator_args: dict[str, Any] = {
            "StreamName": self.stream_name,
            "ShardFilter": {"Type": "AT_LATEST"},
        }
        while True:
            page = self.kinesis.list_shards(**paginator_args)
            for shard in page["Shards"]:
                hash_range = shard["HashKeyRange"]
                shards.append(
                    _Shard(
                        shard["ShardId"],
                        int(hash_range["StartingHashKey"]),
                        int(hash_range["EndingHashKey"]),
                    )
                )
            token = page.get("NextToken")
            if not token:
                break
            paginator_args = {"NextToken": token}
        if not shards:
            raise DeliveryError(f"stream {self.stream_name} has no open shards")
        shards.sort(key=lambda shard: shard.starting_hash)
        self._shards = shards
        self._starts = [shard.starting_hash for shard in shards]

    def _shard_for(self, hashed: int) -> _Shard:
        if not self._shards:
            self.refresh_shards()
        index = bisect.bisect_right(self._starts, hashed) - 1
        return self._shards[max(index, 0)]

    def add(self, partition_key: str, data: bytes, origin: str = "") -> None:
        """Queue one user record; sends whole requests as they fill."""
        size = len(data) + len(partition_key.encode())
        if size > MAX_BYTES_PER_RECORD - AGGREGATE_HEADROOM:
            self.dead_letter(
                partition_key,
                data,
                origin,
                f"record of {size} bytes exceeds the Kinesis limit of "
                f"{MAX_BYTES_PER_RECORD - AGGREGATE_HEADROOM} bytes",
            )
            return

        hashed = hash_key(partition_key)
        shard = self._shard_for(hashed)
        aggregator = self._aggregators.get(shard.shard_id)
        if aggregator is None:
            aggregator = RecordAggregator(MAX_BYTES_PER_RECORD - AGGREGATE_HEADROOM)
            self._aggregators[shard.shard_id] = aggregator
        full = aggregator.add_user_record(partition_key, data, str(hashed))
        self.stats.user_records += 1
        if full is not None:
            self._queue(full)

    def flush(self) -> None:
        """Send everything queued; returns only when Kinesis accepted all of it."""
        for shard_id in list(self._aggregators):
            partial = self._aggregators[shard_id].clear_and_get()
            if partial is not None:
                self._queue(partial)
        self._send_pending()

    def _queue(self, aggregate: Any) -> None:
        partition_key, explicit_hash_key, blob = aggregate.get_contents()
        entry = {"Data": blob, "PartitionKey": partition_key, "ExplicitHashKey": explicit_hash_key}
        size = len(blob) + len(partition_key.encode())
        too_many = len(self._pending) >= MAX_RECORDS_PER_REQUEST
        if too_many or self._pending_bytes + size > MAX_BYTES_PER_REQUEST:
            self._send_pending()
        self._pending.append(entry)
        self._pending_bytes += size

    def _send_pending(self) -> None:
        entries, self._pending, self._pending_bytes = self._pending, [], 0
        attempt = 0
        while entries:
            attempt += 1
            try:
                response = self.kinesis.put_records(StreamName=self.stream_name, Records=entries)
            except ClientError as exc:
                code = exc.response["Error"]["Code"]
                if code not in RETRYABLE_CODES or attempt >= self.max_attempts:
                    raise DeliveryError(
                        f"PutRecords to {self.stream_name} failed ({code}) after {attempt} attempts"
                    ) from exc
                self.stats.throttled_requests += 1
                logger.warning("PutRecords to %s throttled (%s); retrying", self.stream_name, code)
                self._back_off(attempt)
                continue

            self.stats.requests += 1
            failed = []
            for entry, result in zip(entries, response["Records"], strict=True):
                if "ErrorCode" in result:
                    failed.append((entry, result["ErrorCode"]))
                else:
                    self.stats.kinesis_records += 1
                    self.stats.bytes_sent += len(entry["Data"])
            if not failed:
                return
            if attempt >= self.max_attempts:
                codes = sorted({code for _, code in failed})
                raise DeliveryError(
                    f"{len(failed)} records to {self.stream_name} still failing after "
                    f"{attempt} attempts: {codes}"
                )
            self.stats.retried_entries += len(failed)
            logger.warning(
                "PutRecords to %s: %d of %d entries failed; retrying those",
                self.stream_name,
                len(failed),
                len(entries),
            )
            entries = [entry for entry, _ in failed]
            self._back_off(attempt)

    def _back_off(self, attempt: int) -> None:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        self.sleep(self.rng.uniform(0, ceiling))

    def dead_letter(self, partition_key: str, data: bytes, origin: str, reason: str) -> None:
        now = datetime.now(UTC)
        self.stats.dead_lettered += 1
        key = layout.capture_dead_letter_key(now, origin or f"unknown-{self.stats.dead_lettered}")
        body = {
            "reason": reason,
            "origin": origin,
            "partition_key": partition_key,
            "stream": self.stream_name,
            "size": len(data),
            "record": data.decode("utf-8", errors="replace"),
        }
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(body).encode())
        logger.warning(
            "dead-lettered a record from %s to s3://%s/%s: %s", origin, self.bucket, key, reason
        )
