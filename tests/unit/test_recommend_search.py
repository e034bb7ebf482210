"""When a night reuses the tuned ALS parameters of the published night, and when it searches."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from moto import mock_aws

from batch import publish
from batch.recommend import _published_search, reusable_search, search_basis
from encore.settings import Settings

SEARCHED_AT = datetime(2026, 6, 1, 2, 0, tzinfo=UTC)
SETTINGS = Settings(als_tune_every_days=7)
CHOSEN = {"rank": 8, "reg": 0.01, "alpha": 10.0, "iterations": 10, "seed": 42}
TUNING = [{"rank": 8, "reg": 0.01, "ndcg_at_10": 0.21}, {"rank": 16, "reg": 0.1, "ndcg_at_10": 0.2}]


def manifest(settings: Settings = SETTINGS, at: datetime = SEARCHED_AT) -> dict[str, Any]:
    """A published night's manifest, as the nightly job writes it after a search."""
    return {
        "run_id": "night-1",
        "evaluation": {
            "params": CHOSEN,
            "tuning": TUNING,
            "search": {
                "run_id": "night-1",
                "at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "basis": search_basis(settings),
                "reused": False,
            },
        },
    }


def test_a_search_younger_than_the_cadence_is_reused_with_its_scores() -> None:
    reused = reusable_search(manifest(), search_basis(SETTINGS), SEARCHED_AT + timedelta(days=6), 7)

    assert reused is not None
    assert reused["params"] == CHOSEN
    assert reused["tuning"] == TUNING
    assert reused["search"]["run_id"] == "night-1"


@pytest.mark.parametrize(
    ("age", "every_days"),
    [(timedelta(days=7), 7), (timedelta(days=30), 7), (-timedelta(hours=1), 7), (timedelta(0), 0)],
)
def test_an_old_search_a_search_from_the_future_or_a_cadence_of_zero_searches_again(
    age: timedelta, every_days: int
) -> None:
    assert (
        reusable_search(manifest(), search_basis(SETTINGS), SEARCHED_AT + age, every_days) is None
    )


@pytest.mark.parametrize(
    "changed",
    [
        {"als_rank": 32},
        {"als_alpha": 40.0},
        {"weight_amount": 0.5},
        {"recency_half_life_days": 7.0},
        {"eval_max_users": 5_000},
    ],
)
def test_a_search_on_another_basis_is_not_reused(changed: dict[str, Any]) -> None:
    tonight = search_basis(SETTINGS.replace(**changed))

    assert reusable_search(manifest(), tonight, SEARCHED_AT + timedelta(days=1), 7) is None


def test_a_changed_grid_searches_again(monkeypatch: pytest.MonkeyPatch) -> None:
    published = manifest()
    monkeypatch.setattr("batch.evaluation.TUNING_GRID", {"rank": (8, 16, 32), "reg": (0.1,)})

    assert reusable_search(published, search_basis(SETTINGS), SEARCHED_AT, 7) is None


def test_no_published_night_or_one_without_a_recorded_search_searches() -> None:
    older = manifest()
    del older["evaluation"]["search"]

    assert reusable_search(None, search_basis(SETTINGS), SEARCHED_AT, 7) is None
    assert reusable_search(older, search_basis(SETTINGS), SEARCHED_AT, 7) is None


@mock_aws
def test_the_published_nights_search_is_read_through_the_pointer() -> None:
    settings = SETTINGS.replace(aws_endpoint_url=None)
    s3 = boto3.client("s3", region_name=settings.aws_region)
    s3.create_bucket(Bucket=settings.bucket)
    tonight = SEARCHED_AT + timedelta(days=1)
    basis = search_basis(settings)

    assert _published_search(settings, settings.bucket, basis, tonight) is None
    publish.put_json(s3, settings.bucket, "recommendations/runs/night-1/manifest.json", manifest())
    publish.switch_pointer(s3, settings.bucket, "night-1", "2026-06-01T03:00:00Z")
    reused = _published_search(settings, settings.bucket, basis, tonight)
    assert reused is not None
    assert reused["params"] == CHOSEN


def _broken(**changes: Any) -> bytes:
    """A published manifest whose recorded search has ``changes``."""
    evaluation = manifest()["evaluation"]
    search = {**evaluation["search"], **changes.pop("search", {})}
    return json.dumps({"evaluation": {**evaluation, "search": search, **changes}}).encode()


@mock_aws
@pytest.mark.parametrize(
    "body",
    [b"{", _broken(params={"rank": 8}), _broken(search={"at": "yesterday"})],
    ids=["not JSON", "parameters that do not fit", "a time that is not one"],
)
def test_an_unreadable_published_manifest_means_a_new_search(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    settings = SETTINGS.replace(aws_endpoint_url=None)
    s3 = boto3.client("s3", region_name=settings.aws_region)
    s3.create_bucket(Bucket=settings.bucket)
    s3.put_object(
        Bucket=settings.bucket, Key="recommendations/runs/night-1/manifest.json", Body=body
    )
    publish.switch_pointer(s3, settings.bucket, "night-1", "2026-06-01T03:00:00Z")

    assert _published_search(settings, settings.bucket, search_basis(settings), SEARCHED_AT) is None
    assert "searching again" in caplog.text
