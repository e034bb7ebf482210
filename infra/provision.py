"""Create the bucket, the Kinesis stream and the Firehose delivery stream, idempotently.

For the local endpoint (moto's server or LocalStack). On AWS the template in
``infra/`` creates the same resources from the same definitions
(``encore.resources``). Running this twice changes nothing the second time.

Locally the delivery stream is a direct-put stream: moto's Firehose accepts a
Kinesis source but never reads it, so ``local.firehose_bridge`` does that hop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import boto3
from botocore.exceptions import ClientError

from encore.resources import Resources, resources
from encore.settings import Settings

logger = logging.getLogger(__name__)

#: moto and LocalStack accept any role; on AWS the template creates the real one.
LOCAL_FIREHOSE_ROLE = "arn:aws:iam::000000000000:role/encore-firehose"


def provision(settings: Settings) -> Resources:
    spec = resources(settings)
    kwargs = settings.boto3_kwargs()
    _ensure_bucket(boto3.client("s3", **kwargs), spec.bucket, settings.aws_region)
    _ensure_stream(boto3.client("kinesis", **kwargs), spec)
    _ensure_delivery_stream(boto3.client("firehose", **kwargs), spec)
    return spec


def _ensure_bucket(s3: Any, bucket: str, region: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
        return
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in {"404", "NoSuchBucket", "NotFound"}:
            raise
    create: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        create["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(**create)
    logger.info("created bucket %s", bucket)


def _ensure_stream(kinesis: Any, spec: Resources) -> None:
    stream = spec.stream
    try:
        kinesis.describe_stream_summary(StreamName=stream.name)
    except kinesis.exceptions.ResourceNotFoundException:
        create: dict[str, Any] = {
            "StreamName": stream.name,
            "StreamModeDetails": {"StreamMode": stream.mode},
        }
        if stream.mode == "PROVISIONED":
            create["ShardCount"] = stream.shard_count
        kinesis.create_stream(**create)
        logger.info("created stream %s (%s)", stream.name, stream.mode)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=stream.name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
    )


def _ensure_delivery_stream(firehose: Any, spec: Resources) -> None:
    delivery = spec.delivery
    try:
        firehose.describe_delivery_stream(DeliveryStreamName=delivery.name)
        return
    except firehose.exceptions.ResourceNotFoundException:
        pass
    firehose.create_delivery_stream(
        DeliveryStreamName=delivery.name,
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": LOCAL_FIREHOSE_ROLE,
            "BucketARN": f"arn:aws:s3:::{delivery.bucket}",
            "Prefix": delivery.prefix,
            "ErrorOutputPrefix": delivery.error_prefix,
            "BufferingHints": {
                "IntervalInSeconds": delivery.buffer_interval_s,
                "SizeInMBs": delivery.buffer_size_mib,
            },
            "CompressionFormat": "UNCOMPRESSED",
        },
    )
    for _ in range(60):
        status = firehose.describe_delivery_stream(DeliveryStreamName=delivery.name)
        if status["DeliveryStreamDescription"]["DeliveryStreamStatus"] == "ACTIVE":
            break
        time.sleep(0.5)
    logger.info(
        "created delivery stream %s -> s3://%s/%s", delivery.name, delivery.bucket, delivery.prefix
    )
