"""The AWS resources the pipeline needs, defined once.

The local provisioner (``infra.provision``) creates exactly these; the
CloudFormation template in ``infra/`` takes the same names and settings as
parameters, and a test checks that the two agree.

Firehose without prefix expressions appends ``YYYY/MM/DD/HH/`` (UTC) to the
prefix on its own; moto's Firehose does the same, so one prefix serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

from encore import layout
from encore.settings import Settings


@dataclass(frozen=True)
class StreamSpec:
    name: str
    #: ``ON_DEMAND`` scales by itself; ``PROVISIONED`` uses ``shard_count``.
    mode: str = "ON_DEMAND"
    shard_count: int = 2
    retention_hours: int = 24


@dataclass(frozen=True)
class DeliverySpec:
    name: str
    source_stream: str
    bucket: str
    prefix: str = layout.LANDING_PREFIX
    error_prefix: str = layout.LANDING_ERROR_PREFIX
    #: Zero buffering delivers within seconds; AWS allows 0 to 900 s.
    buffer_interval_s: int = 0
    buffer_size_mib: int = 1


@dataclass(frozen=True)
class Resources:
    bucket: str
    stream: StreamSpec
    delivery: DeliverySpec


def resources(settings: Settings) -> Resources:
    return Resources(
        bucket=settings.bucket,
        stream=StreamSpec(name=settings.stream_name),
        delivery=DeliverySpec(
            name=settings.delivery_stream_name,
            source_stream=settings.stream_name,
            bucket=settings.bucket,
        ),
    )
