"""The shapes the nightly job publishes, and the pointer switch, against an in-process S3."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import boto3
import pytest
from moto import mock_aws

from batch import publish
from encore import layout
from encore.settings import Settings

USER_ID = "18446744073709551615"
ROW: dict[str, Any] = {
    "user_id": USER_ID,
    "source": "als",
    "items": [
        {
            "listing_id": 10_000_000_042,
            "title": "Funko Loki #985",
            "category": "Collectible Toys",
            "sub_category": "Funko",
            "price": Decimal("12.50"),
            "score": 0.75,
        }
    ],
}


def test_a_user_document_carries_ids_as_strings_and_prices_as_decimal_text() -> None:
    document = publish.user_document(ROW, "night-1", "2026-06-01T12:00:00.000000Z")

    assert document["schema_version"] == 1
    assert (document["user_id"], document["run_id"], document["source"]) == (
        "18446744073709551615",
        "night-1",
        "als",
    )
    assert document["items"] == [
        {
            "listing_id": "10000000042",
            "title": "Funko Loki #985",
            "category": "Collectible Toys",
            "sub_category": "Funko",
            "price": "12.50",
            "score": 0.75,
        }
    ]


def test_a_batch_line_has_the_personalize_shape() -> None:
    assert publish.batch_line(ROW) == {
        "input": {"userId": "18446744073709551615"},
        "output": {"recommendedItems": ["10000000042"], "scores": [0.75]},
    }


@pytest.mark.parametrize(
    ("uri", "bucket"), [("s3a://encore-pipeline", "encore-pipeline"), ("s3://b/", "b")]
)
def test_the_bucket_comes_from_the_base_uri(uri: str, bucket: str) -> None:
    assert publish.bucket_of(uri) == bucket


@pytest.mark.parametrize("uri", ["https://encore-pipeline", "s3a://", "encore-pipeline"])
def test_a_base_uri_that_is_not_a_bucket_is_refused(uri: str) -> None:
    with pytest.raises(ValueError, match="is not s3://bucket"):
        publish.bucket_of(uri)


@pytest.fixture
def s3() -> Any:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="encore-pipeline")
        yield client


def test_documents_are_put_one_per_user_with_their_source_and_bad_ids_are_skipped(
    s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish, "s3_client", lambda settings: s3)
    rows = [ROW, {**ROW, "user_id": "a/b", "items": []}]

    counts = list(
        publish._put_documents(Settings(), "encore-pipeline", "night-1", "2026-06-01T12:00Z", rows)
    )

    assert counts == [(1, 1)]
    key = layout.user_document_key("night-1", USER_ID)
    stored = s3.get_object(Bucket="encore-pipeline", Key=key)
    assert stored["Metadata"] == {"source": "als"}
    assert json.loads(stored["Body"].read())["items"][0]["listing_id"] == "10000000042"


def test_the_pointer_names_the_run_and_its_manifest(s3: Any) -> None:
    assert publish.read_pointer(s3, "encore-pipeline") is None

    publish.switch_pointer(s3, "encore-pipeline", "night-2", "2026-06-02T03:00:00.000000Z")

    assert publish.read_pointer(s3, "encore-pipeline") == {
        "run_id": "night-2",
        "manifest": layout.manifest_key("night-2"),
        "published_at": "2026-06-02T03:00:00.000000Z",
    }


def test_a_failed_write_says_which_key(s3: Any) -> None:
    with pytest.raises(publish.PublishError, match="s3://missing-bucket/recommendations/"):
        publish.put_json(s3, "missing-bucket", layout.manifest_key("night-1"), {})
