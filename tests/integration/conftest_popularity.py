"""Helpers for the popularity job's integration tests: events, landed files, feeds.

Imported by ``test_popularity.py``; the services (moto, Spark) come from
``conftest.py`` beside this file.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3

from encore import events, layout
from encore.settings import Settings


@dataclass
class Bucket:
    """A bucket of one test's own, and what the job needs to find it."""

    settings: Settings
    s3: Any

    @property
    def name(self) -> str:
        return self.settings.bucket

    @property
    def base_uri(self) -> str:
        return f"s3a://{self.name}"

    def land(self, arrival: datetime, name: str, lines: Iterable[bytes]) -> str:
        """Put one landed file, as Firehose would; returns its key."""
        key = layout.landing_key(arrival, name)
        self.s3.put_object(Bucket=self.name, Key=key, Body=b"".join(lines))
        return key

    def json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())

    def raw(self, key: str) -> tuple[bytes, datetime]:
        response = self.s3.get_object(Bucket=self.name, Key=key)
        return response["Body"].read(), response["LastModified"]

    def keys(self, prefix: str) -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def quarantined(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for key in self.keys(layout.POPULARITY_QUARANTINE_PREFIX):
            if key.rsplit("/", 1)[-1].startswith("part-"):
                body = self.s3.get_object(Bucket=self.name, Key=key)["Body"].read().decode()
                rows.extend(json.loads(line) for line in body.splitlines() if line)
        return rows


def new_bucket(settings: Settings) -> Bucket:
    bucket_settings = settings.replace(bucket=f"popularity-{uuid.uuid4().hex[:10]}")
    s3 = boto3.client("s3", **bucket_settings.boto3_kwargs())
    s3.create_bucket(Bucket=bucket_settings.bucket)
    return Bucket(bucket_settings, s3)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Changes:
    """Contract events with commit LSNs that grow by one, as a WAL would give them.

    Starting at 8 puts ``0/9`` before ``0/10``, which string order gets wrong.
    """

    next_lsn: int = 8

    def _commit(self, table: str, key: str, op: str, commit_time: datetime) -> dict[str, str]:
        commit_lsn = events.format_lsn(self.next_lsn)
        change_lsn = events.format_lsn(self.next_lsn - 1)
        self.next_lsn += 1
        return {
            "event_id": events.event_id(commit_lsn, change_lsn, table, key, op),
            "op": op,
            "commit_lsn": commit_lsn,
            "commit_time": iso(commit_time),
            "table_key": key,
        }

    def listing(
        self,
        listing_id: str,
        at: datetime,
        *,
        title: str | None = None,
        category: str | None = None,
        sub_category: str | None = None,
        status: str = "live",
        op: str = "insert",
    ) -> dict[str, str | None]:
        event: dict[str, str | None] = {
            **self._commit("listings", listing_id, op, at),
            "event_type": "listing",
            "listing_id": listing_id,
        }
        if op != "delete":
            event.update(
                title=title,
                category=category,
                sub_category=sub_category,
                status=status,
                category_id=category and layout.slug(category),
            )
        return event

    def bid(
        self,
        bid_id: str,
        listing_id: str,
        bidder_id: str | None,
        amount: str,
        placed_at: datetime,
        *,
        op: str = "insert",
    ) -> dict[str, str | None]:
        event: dict[str, str | None] = {
            **self._commit("bids", bid_id, op, placed_at),
            "event_type": "bid",
            "bid_id": bid_id,
            "listing_id": listing_id,
        }
        if op != "delete":
            event.update(bidder_id=bidder_id, amount=amount, placed_at=iso(placed_at))
        return event


def encoded(events_: Iterable[dict[str, str | None]]) -> list[bytes]:
    return [events.encode(event) for event in events_]
