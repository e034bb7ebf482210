"""The presign handler against the local endpoint: who may read what, and for how long."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from encore import layout
from encore.settings import Settings
from lambdas.presign import handler as presign
from lambdas.presign.tokens import sign_token

pytestmark = pytest.mark.integration

EVENT = Path(__file__).resolve().parents[1] / "events" / "presign_function_url.json"


@pytest.fixture
def served(fresh_bucket: Settings, s3: Any, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A live run with one user's document, a newer run not yet switched to, and a feed."""
    settings = fresh_bucket.replace(presign_secret="test-secret")
    put = lambda key, body: s3.put_object(  # noqa: E731
        Bucket=settings.bucket, Key=key, Body=json.dumps(body).encode()
    )
    put(layout.user_document_key("night-1", "u1"), {"user_id": "u1", "run_id": "night-1"})
    put(layout.user_document_key("night-2", "u1"), {"user_id": "u1", "run_id": "night-2"})
    put(layout.RECOMMENDATIONS_POINTER, {"run_id": "night-1"})
    put(layout.global_feed_key(), {"feed": "global"})
    monkeypatch.setattr(presign, "_settings", settings)
    return settings


def call(user_id: str, token: str | None, expires_in: str | None = "600") -> dict[str, Any]:
    event = json.loads(EVENT.read_text())
    event["rawPath"] = f"/recommendations/{user_id}"
    event["headers"]["authorization"] = f"Bearer {token}" if token else ""
    event["queryStringParameters"] = {"expires_in": expires_in} if expires_in else None
    return presign.handler(event, None)


def fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def token_for(user_id: str, seconds: int = 300) -> str:
    return sign_token("test-secret", user_id, int(time.time()) + seconds)


def test_the_caller_gets_a_url_for_their_own_document_of_the_live_run(served: Settings) -> None:
    reply = call("u1", token_for("u1"))

    assert reply["statusCode"] == 200
    body = json.loads(reply["body"])
    assert (body["source"], body["expires_in"]) == ("recommendations", 600)
    assert fetch(body["url"]) == {"user_id": "u1", "run_id": "night-1"}  # not the unswitched run


def test_another_users_id_is_forbidden(served: Settings) -> None:
    reply = call("u2", token_for("u1"))

    assert reply["statusCode"] == 403
    assert "another user" in json.loads(reply["body"])["message"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "Bearer"),
        (token_for("u1")[:-3] + "abc", "does not match"),
        (token_for("u1", seconds=-5), "expired"),
    ],
)
def test_a_missing_tampered_or_expired_token_is_unauthorised(
    served: Settings, token: str | None, reason: str
) -> None:
    reply = call("u1", token)

    assert reply["statusCode"] == 401
    assert reason in json.loads(reply["body"])["message"]


def test_an_eight_day_request_gets_seven_days(served: Settings) -> None:
    reply = call("u1", token_for("u1"), expires_in=str(8 * 24 * 3600))

    body = json.loads(reply["body"])
    assert body["expires_in"] == 7 * 24 * 3600
    assert "X-Amz-Expires=604800" in body["url"]


def test_an_unknown_user_gets_the_global_popularity_feed(served: Settings) -> None:
    reply = call("newcomer", token_for("newcomer"))

    body = json.loads(reply["body"])
    assert (reply["statusCode"], body["source"]) == (200, "popular-global")
    assert fetch(body["url"]) == {"feed": "global"}


def test_a_bad_expiry_is_a_bad_request(served: Settings) -> None:
    assert call("u1", token_for("u1"), expires_in="soon")["statusCode"] == 400
