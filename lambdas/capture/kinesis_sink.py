"""Put change events to Kinesis, KPL-aggregated, without losing or mixing any.

Aggregation packs many user records into one Kinesis record. A consumer
deaggregates it on whichever shard it landed, so every user record inside
one aggregate must belong to the same shard: otherwise, after a reshard, a
KCL consumer can drop the records that belong elsewhere. Here each user
record's partition key is hashed (MD5, as Kinesis does) and placed in the
aggregator of the shard whose hash range holds it, and the aggregate is sent
with an explicit hash key inside that range.

Aggregates are framed by ``lambdas.capture.kpl`` (the KPL format, byte for
byte what ``aws-kinesis-agg`` builds); a partition key's hash and shard are
worked out once and remembered.

PutRecords limits are checked before sending: at most 500 records and
5 MiB per request, 1 MiB per record (data and partition key together). A
user record too large to send even alone goes to the S3 dead-letter prefix
with its reason. Entries that PutRecords reports failed are retried alone,
with full-jitter exponential back-off; a throttled request is retried whole.
When retries run out the sink raises and the caller must not confirm the
slot, so the batch is read again next time.

Requests are sent by a background thread while the caller goes on building
the next one (the HTTP call releases the GIL). At most one request is in
flight: a sealed aggregate goes out at once when the thread is idle, and
otherwise waits in the next request until it is full or the thread is free,
so requests grow only as large as the endpoint is slow. Memory stays within
two requests and the aggregates being filled; :meth:`KinesisSink.flush`
returns only once every request was accepted, and raises the failure of any
of them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from encore import layout
from encore.settings import Settings
from lambdas.capture.kpl import Aggregate

logger = logging.getLogger(__name__)

MAX_RECORDS_PER_REQUEST = 500
MAX_BYTES_PER_REQUEST = 5 * 1024 * 1024
MAX_BYTES_PER_RECORD = 1024 * 1024
#: Room left beside an aggregate for the Kinesis record's own partition key.
AGGREGATE_HEADROOM = 4 * 1024
MAX_AGGREGATE_BYTES = MAX_BYTES_PER_RECORD - AGGREGATE_HEADROOM
#: Partition keys whose shard is remembered; the memo starts again when full.
MAX_ROUTES = 100_000
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


@dataclass(frozen=True)
class _Route:
    """Where a partition key's records go: its shard and its hash, as a decimal string."""

    shard_id: str
    hash_key: str


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
        self._routes: dict[str, _Route] = {}
        self._aggregates: dict[str, Aggregate] = {}
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._sender: threading.Thread | None = None
        self._sender_failure: BaseException | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> KinesisSink:
        """A sink for the settings' stream and dead-letter bucket, with clients of its own."""
        import boto3

        kwargs = settings.boto3_kwargs()
        return cls(
            boto3.client("kinesis", **kwargs),
            settings.stream_name,
            boto3.client("s3", **kwargs),
            settings.bucket,
        )

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
        self._routes.clear()

    def _shard_for(self, hashed: int) -> _Shard:
        if not self._shards:
            self.refresh_shards()
        index = bisect.bisect_right(self._starts, hashed) - 1
        return self._shards[max(index, 0)]

    def _route(self, partition_key: str) -> _Route:
        hashed = hash_key(partition_key)
        route = _Route(self._shard_for(hashed).shard_id, str(hashed))
        if len(self._routes) >= MAX_ROUTES:
            self._routes.clear()
        self._routes[partition_key] = route
        return route

    def add(self, partition_key: str, data: bytes, origin: str = "") -> None:
        """Queue one user record in its shard's aggregate; full aggregates are sent as they seal."""
        route = self._routes.get(partition_key) or self._route(partition_key)
        aggregate = self._aggregates.get(route.shard_id)
        if aggregate is None:
            aggregate = self._aggregates[route.shard_id] = Aggregate(MAX_AGGREGATE_BYTES)
        if not aggregate.add(partition_key, route.hash_key, data):
            if aggregate.count:
                self._queue(aggregate)
                aggregate = self._aggregates[route.shard_id] = Aggregate(MAX_AGGREGATE_BYTES)
            if not aggregate.add(partition_key, route.hash_key, data):
                size = len(data) + len(partition_key.encode())
                self.dead_letter(
                    partition_key,
                    data,
                    origin,
                    f"record of {size} bytes exceeds the Kinesis limit of "
                    f"{MAX_AGGREGATE_BYTES} bytes per aggregated record",
                )
                return
        self.stats.user_records += 1

    def flush(self) -> None:
        """Send everything queued; returns only when Kinesis accepted all of it."""
        for shard_id, aggregate in list(self._aggregates.items()):
            if aggregate.count:
                self._queue(aggregate, send_when_idle=False)
            del self._aggregates[shard_id]
        if self._pending:
            self._dispatch()
        self._wait_for_sender()

    def close(self) -> None:
        """Wait for the request in flight, if any, without sending what is still queued.

        For a caller that is failing already: a failure of that request is
        logged, not raised, so it does not hide the caller's own.
        """
        try:
            self._wait_for_sender()
        except Exception as exc:
            logger.warning("a PutRecords request to %s failed: %s", self.stream_name, exc)
        self._aggregates.clear()
        self._pending, self._pending_bytes = [], 0

    def _queue(self, aggregate: Aggregate, send_when_idle: bool = True) -> None:
        blob = aggregate.seal()
        partition_key = aggregate.partition_key
        entry = {
            "Data": blob,
            "PartitionKey": partition_key,
            "ExplicitHashKey": aggregate.explicit_hash_key,
        }
        size = len(blob) + len(partition_key.encode())
        too_many = len(self._pending) >= MAX_RECORDS_PER_REQUEST
        if too_many or self._pending_bytes + size > MAX_BYTES_PER_REQUEST:
            self._dispatch()
        self._pending.append(entry)
        self._pending_bytes += size
        if send_when_idle and (self._sender is None or not self._sender.is_alive()):
            # Nothing in flight: send now rather than wait for a full request, so
            # the requests grow only as large as the endpoint is slow.
            self._dispatch()

    def _dispatch(self) -> None:
        """Hand the pending request to the sender thread, once the one before it is done."""
        entries, self._pending, self._pending_bytes = self._pending, [], 0
        self._wait_for_sender()
        self._sender = threading.Thread(
            target=self._send_in_background,
            args=(entries,),
            name=f"put-records-{self.stream_name}",
        )
        self._sender.start()

    def _send_in_background(self, entries: list[dict[str, Any]]) -> None:
        try:
            self._send(entries)
        except BaseException as exc:  # handed to the caller's thread by _wait_for_sender
            self._sender_failure = exc

    def _wait_for_sender(self) -> None:
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        failure, self._sender_failure = self._sender_failure, None
        if failure is not None:
            raise failure

    def _send(self, entries: list[dict[str, Any]]) -> None:
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
