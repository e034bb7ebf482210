"""Local stand-in for Firehose reading the Kinesis stream.

On AWS the delivery stream has the Kinesis stream as its source: it reads
the shards, deaggregates KPL records and lands the bytes in S3. moto's
Firehose accepts such a source but never reads it, so locally this bridge
does that one hop and nothing more: read each shard from its checkpoint,
deaggregate, check each user record is one contract CSV line, and
``put_record_batch`` to a direct-put delivery stream, which lands it under
``landing/YYYY/MM/DD/HH/``. A user record that is not a valid event goes to
``landing-errors/`` with its reason instead. The shard checkpoint is saved in
the bucket only after Firehose accepted the batch, so a crash lands some
records twice (readers de-duplicate by event id) and never loses one.

This module exists only because the emulator lacks the managed feature; no
stage imports it.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_kinesis_agg.deaggregator import iter_deaggregate_records
from botocore.exceptions import ClientError

from encore import events, layout

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "local-bridge/checkpoints.json"
MAX_RECORDS_PER_BATCH = 500
MAX_BYTES_PER_BATCH = 4 * 1024 * 1024


@dataclass
class BridgeResult:
    kinesis_records: int = 0
    user_records: int = 0
    landed: int = 0
    errors: int = 0
    batches: int = 0


class FirehoseBridge:
    def __init__(
        self,
        kinesis: Any,
        firehose: Any,
        s3: Any,
        stream_name: str,
        delivery_stream_name: str,
        bucket: str,
    ) -> None:
        self.kinesis = kinesis
        self.firehose = firehose
        self.s3 = s3
        self.stream_name = stream_name
        self.delivery_stream_name = delivery_stream_name
        self.bucket = bucket

    def run_once(self, on_progress: Callable[[int], None] | None = None) -> BridgeResult:
        """Move everything currently in the stream to S3.

        ``on_progress`` gets the user records handled (landed or set aside as errors),
        page by page of each shard.
        """
        result = BridgeResult()
        checkpoints = self._load_checkpoints()
        shards = self.kinesis.list_shards(StreamName=self.stream_name)["Shards"]
        for shard in shards:
            self._drain_shard(shard["ShardId"], checkpoints, result, on_progress)
        return result

    def _drain_shard(
        self,
        shard_id: str,
        checkpoints: dict[str, str],
        result: BridgeResult,
        on_progress: Callable[[int], None] | None,
    ) -> None:
        after = checkpoints.get(shard_id)
        if after:
            iterator_args = {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": after,
            }
        else:
            iterator_args = {"ShardIteratorType": "TRIM_HORIZON"}
        iterator = self.kinesis.get_shard_iterator(
            StreamName=self.stream_name, ShardId=shard_id, **iterator_args
        )["ShardIterator"]
        while iterator:
            page = self.kinesis.get_records(ShardIterator=iterator, Limit=1000)
            records = page["Records"]
            if not records:
                break
            result.kinesis_records += len(records)
            lines = [
                user_record_bytes(user["kinesis"])
                for user in iter_deaggregate_records(records, data_format="Boto3")
            ]
            result.user_records += len(lines)
            self._deliver(lines, result)
            checkpoints[shard_id] = records[-1]["SequenceNumber"]
            self._save_checkpoints(checkpoints)
            if on_progress:
                on_progress(len(lines))
            if page.get("MillisBehindLatest", 0) == 0:
                break
            iterator = page.get("NextShardIterator")

    def _deliver(self, lines: list[bytes], result: BridgeResult) -> None:
        good: list[bytes] = []
        for line in lines:
            reason = _check(line)
            if reason:
                self._land_error(line, reason)
                result.errors += 1
            else:
                good.append(line)
        batch: list[bytes] = []
        size = 0
        for line in good:
            if len(batch) >= MAX_RECORDS_PER_BATCH or size + len(line) > MAX_BYTES_PER_BATCH:
                self._put(batch, result)
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        if batch:
            self._put(batch, result)

    def _put(self, batch: list[bytes], result: BridgeResult) -> None:
        pending = [{"Data": line} for line in batch]
        for attempt in range(1, 9):
            response = self.firehose.put_record_batch(
                DeliveryStreamName=self.delivery_stream_name, Records=pending
            )
            if response.get("FailedPutCount", 0) == 0:
                result.landed += len(pending)
                result.batches += 1
                return
            failed = [
                entry
                for entry, status in zip(pending, response["RequestResponses"], strict=True)
                if "ErrorCode" in status
            ]
            result.landed += len(pending) - len(failed)
            pending = failed
            time.sleep(min(2.0, 0.05 * 2**attempt))
        raise RuntimeError(f"Firehose {self.delivery_stream_name} refused {len(pending)} records")

    def _land_error(self, line: bytes, reason: str) -> None:
        now = datetime.now(UTC)
        name = f"{self.delivery_stream_name}-{now:%Y-%m-%d-%H-%M-%S-%f}.json"
        key = layout.landing_error_key("format-conversion-failed", now, name)
        body = {"reason": reason, "rawData": line.decode("utf-8", errors="replace")}
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(body).encode())
        logger.warning(
            "record could not be landed (%s); kept at s3://%s/%s", reason, self.bucket, key
        )

    def _load_checkpoints(self) -> dict[str, str]:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=CHECKPOINT_KEY)["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"NoSuchKey", "404"}:
                return {}
            raise
        loaded: dict[str, str] = json.loads(body)
        return loaded

    def _save_checkpoints(self, checkpoints: dict[str, str]) -> None:
        self.s3.put_object(
            Bucket=self.bucket, Key=CHECKPOINT_KEY, Body=json.dumps(checkpoints).encode()
        )


def user_record_bytes(record: dict[str, Any]) -> bytes:
    """The deaggregator hands back aggregated user records base64-encoded, others raw."""
    data: bytes = record["data"]
    return base64.b64decode(data) if record.get("aggregated") else data


def _check(line: bytes) -> str | None:
    """Why ``line`` is not one contract event, or None if it is."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8: {exc}"
    if not text.endswith("\n"):
        return "does not end with a newline"
    try:
        decoded = events.decode(text)
    except (events.EventError, ValueError) as exc:
        return str(exc)
    if len(decoded) != 1:
        return f"holds {len(decoded)} records, expected 1"
    return None
