"""The presign Lambda: a short-lived URL for the caller's own recommendations.

Shaped for a Lambda function URL or an API Gateway HTTP API (payload 2.0):
``GET /recommendations/{user_id}?expires_in=SECONDS`` with
``Authorization: Bearer <token>`` (see :mod:`lambdas.presign.tokens`).

=========================  ====================================================
answer                     when
=========================  ====================================================
200 ``{"url", ...}``       the token proves the user; the URL reads their document
401                        no token, or a malformed, tampered or expired one
403                        the token is valid but names another user
400                        no user id in the path or query, or a bad expires_in
200, source popular-global the user has no document in the live run (new users,
                           or no run yet): the URL reads the global popularity feed
=========================  ====================================================

The URL's life is the least of the requested ``expires_in`` (default 15
minutes), ``ENCORE_PRESIGN_MAX_EXPIRY_S`` (at most SigV4's 7 days) and the
remaining life of the signing credentials: a URL signed with a Lambda role's
temporary credentials dies with them, whatever it says. The URL is signed for
the bucket's own region.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from encore import layout
from encore.settings import Settings
from lambdas import json_logging
from lambdas.presign.tokens import TokenError, verify_token

json_logging.configure()
logger = logging.getLogger(__name__)

SIGV4_MAX_EXPIRY_S = 7 * 24 * 3600
DEFAULT_EXPIRY_S = 900
POINTER_CACHE_S = 60.0

_settings: Settings | None = None
_state: dict[str, Any] = {}


class _Reply(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json", "Cache-Control": "no-store"},
        "body": json.dumps(body),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    global _settings
    json_logging.request_id.set(getattr(context, "aws_request_id", None))
    settings = _settings = _settings or Settings.load()
    try:
        user_id = _requested_user(event)
        caller = _caller(event, settings)
        if caller != user_id:
            raise _Reply(403, "the token belongs to another user")
        requested = _requested_expiry(event)
    except _Reply as reply:
        logger.info("refused with %d: %s", reply.status, reply)
        return _response(reply.status, {"message": str(reply)})
    answer = presigned_url_for_user(settings, user_id, requested)
    logger.info("presigned %s for a user (source %s)", answer["key"], answer["source"])
    return _response(200, answer)


def _requested_user(event: dict[str, Any]) -> str:
    path = event.get("rawPath") or event.get("path") or ""
    parts = [part for part in path.split("/") if part]
    query = event.get("queryStringParameters") or {}
    if len(parts) >= 2 and parts[-2] == "recommendations":
        return str(parts[-1])
    if query.get("user_id"):
        return str(query["user_id"])
    raise _Reply(400, "give the user id as /recommendations/{user_id} or ?user_id=")


def _caller(event: dict[str, Any], settings: Settings) -> str:
    headers = {key.lower(): value for key, value in (event.get("headers") or {}).items()}
    scheme, _, token = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _Reply(401, "send Authorization: Bearer <token>")
    try:
        return verify_token(settings.require_presign_secret(), token.strip())
    except TokenError as exc:
        raise _Reply(401, str(exc)) from exc


def _requested_expiry(event: dict[str, Any]) -> int:
    raw = (event.get("queryStringParameters") or {}).get("expires_in")
    if raw is None:
        return DEFAULT_EXPIRY_S
    try:
        value = int(raw)
    except ValueError as exc:
        raise _Reply(400, f"expires_in={raw!r} is not a whole number of seconds") from exc
    if value < 1:
        raise _Reply(400, f"expires_in={value} must be positive")
    return value


def presigned_url_for_user(settings: Settings, user_id: str, expires_in: int) -> dict[str, Any]:
    """A presigned GET URL for the user's document in the live run, else the global feed."""
    s3 = _signing_client(settings)
    key, source = _document_key(settings, s3, user_id)
    expiry = allowed_expiry(expires_in, settings.presign_max_expiry_s, _credentials_left_s())
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": settings.bucket, "Key": key}, ExpiresIn=expiry
    )
    return {"url": url, "expires_in": expiry, "source": source, "key": key}


def allowed_expiry(requested: int, configured_max: int, credentials_left: float | None) -> int:
    """The least of the request, the configured maximum, 7 days and the credentials' life."""
    limits = [requested, configured_max, SIGV4_MAX_EXPIRY_S]
    if credentials_left is not None:
        limits.append(int(credentials_left))
    return max(1, min(limits))


def _credentials_left_s() -> float | None:
    credentials = boto3.Session().get_credentials()
    expiry = getattr(credentials, "_expiry_time", None)
    if expiry is None:
        return None
    return float((expiry - datetime.now(UTC)).total_seconds())


def _signing_client(settings: Settings) -> Any:
    """An S3 client in the bucket's own region (cached), so the signature matches it."""
    cached = _state.get("client")
    if cached is not None and _state.get("client_for") == settings:
        return cached
    probe = boto3.client("s3", **settings.boto3_kwargs())
    region = probe.get_bucket_location(Bucket=settings.bucket).get("LocationConstraint")
    kwargs = {**settings.boto3_kwargs(), "region_name": region or "us-east-1"}
    client = boto3.client("s3", config=Config(signature_version="s3v4"), **kwargs)
    _state.update(client=client, client_for=settings, pointer=None, pointer_read=0.0)
    return client


def _document_key(settings: Settings, s3: Any, user_id: str) -> tuple[str, str]:
    run_id = _live_run(settings, s3)
    if run_id is not None:
        try:
            key = layout.user_document_key(run_id, user_id)
        except ValueError:
            return layout.global_feed_key(), "popular-global"
        try:
            head = s3.head_object(Bucket=settings.bucket, Key=key)
            return key, head.get("Metadata", {}).get("source", "recommendations")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in {"404", "NoSuchKey", "NotFound"}:
                raise
    return layout.global_feed_key(), "popular-global"


def _live_run(settings: Settings, s3: Any) -> str | None:
    """The run the pointer names, read again at most once a minute."""
    if time.monotonic() - _state.get("pointer_read", 0.0) < POINTER_CACHE_S:
        return _state.get("pointer")
    try:
        body = s3.get_object(Bucket=settings.bucket, Key=layout.RECOMMENDATIONS_POINTER)["Body"]
        run_id = json.loads(body.read())["run_id"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in {"404", "NoSuchKey", "NotFound"}:
            raise
        run_id = None
    _state.update(pointer=run_id, pointer_read=time.monotonic())
    return run_id
