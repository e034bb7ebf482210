"""Landing throughput: events per second through the local Firehose hop.

Puts aggregated records to the stream with the capture's own sink, then
times the bridge (read the shards, deaggregate, check, ``put_record_batch``).
The reference, in the same run, is a raw ``put_record_batch`` of the same
bytes to the same delivery stream, with no Kinesis read and no checks.
"""

from __future__ import annotations

import time
from typing import Any

import boto3

from cli.pipeline import land_once
from encore import events
from encore.settings import Settings
from lambdas.capture.kinesis_sink import KinesisSink


def sample_lines(count: int) -> list[bytes]:
    lines = []
    for number in range(count):
        lines.append(
            events.encode(
                {
                    "event_id": f"{number:032x}",
                    "event_type": "bid",
                    "op": "insert",
                    "commit_lsn": "0/1",
                    "commit_time": "2026-12-04T00:00:00Z",
                    "table_key": str(number),
                    "listing_id": str(number % 997),
                    "bid_id": str(number),
                    "bidder_id": f"user-{number % 5000}",
                    "amount": f"{1 + number % 300}.50",
                    "placed_at": "2026-12-04T00:00:00Z",
                }
            )
        )
    return lines


def measure(settings: Settings, count: int) -> dict[str, Any]:
    kwargs = settings.boto3_kwargs()
    lines = sample_lines(count)
    sink = KinesisSink.from_settings(settings)
    for line in lines:
        sink.add(line.split(b",")[7].decode(), line)
    sink.flush()

    started = time.perf_counter()
    landed = land_once(settings).landed
    bridge_s = time.perf_counter() - started

    firehose = boto3.client("firehose", **kwargs)
    started = time.perf_counter()
    for start in range(0, len(lines), 500):
        firehose.put_record_batch(
            DeliveryStreamName=settings.delivery_stream_name,
            Records=[{"Data": line} for line in lines[start : start + 500]],
        )
    raw_s = time.perf_counter() - started
    return {
        "events": landed,
        "bridge_s": bridge_s,
        "events_per_s": landed / bridge_s,
        "raw_put_s": raw_s,
        "raw_events_per_s": count / raw_s,
    }
