"""User tokens the app signs and the presign Lambda checks.

A token is ``<user>.<expires>.<signature>``: the user id in unpadded
base64url, the expiry as Unix seconds, and HMAC-SHA256 of ``<user id>.<expires>``
under the shared secret, in unpadded base64url. The app signs a token when
the user logs in; the Lambda trusts nothing else in the request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time


class TokenError(ValueError):
    """The token is malformed, tampered with or expired; the message says which."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: str, user_id: str, expires_at: int) -> bytes:
    return hmac.new(secret.encode(), f"{user_id}.{expires_at}".encode(), hashlib.sha256).digest()


def sign_token(secret: str, user_id: str, expires_at: int) -> str:
    """A token for ``user_id`` valid until ``expires_at`` (Unix seconds)."""
    return f"{_b64(user_id.encode())}.{expires_at}.{_b64(_signature(secret, user_id, expires_at))}"


def verify_token(secret: str, token: str, now: float | None = None) -> str:
    """The user id the token proves, or :class:`TokenError`."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token is not <user>.<expires>.<signature>")
    try:
        user_id = _unb64(parts[0]).decode()
        expires_at = int(parts[1])
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise TokenError("token is malformed") from exc
    if not hmac.compare_digest(signature, _signature(secret, user_id, expires_at)):
        raise TokenError("token signature does not match")
    if expires_at <= (time.time() if now is None else now):
        raise TokenError("token has expired")
    return user_id
