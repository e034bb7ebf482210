from __future__ import annotations

import pytest

from lambdas.presign.handler import SIGV4_MAX_EXPIRY_S, allowed_expiry
from lambdas.presign.tokens import TokenError, sign_token, verify_token

NOW = 1_800_000_000


def test_a_signed_token_proves_its_user() -> None:
    token = sign_token("secret", "5a486531-0201-43e0-bd81-d544bb08d0dc", NOW + 60)

    assert verify_token("secret", token, now=NOW) == "5a486531-0201-43e0-bd81-d544bb08d0dc"


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda token: token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), "does not match"),
        (lambda token: sign_token("other", "u1", NOW + 60), "does not match"),
        (lambda token: token.replace(f".{NOW + 60}.", f".{NOW + 9999}."), "does not match"),
        (lambda token: "dTI." + token.split(".", 1)[1], "does not match"),  # user u2, u1's proof
        (lambda token: "not-a-token", "is not <user>.<expires>.<signature>"),
        (lambda token: "!!.x.y", "malformed"),
    ],
)
def test_a_tampered_token_is_refused(mangle, reason: str) -> None:
    token = mangle(sign_token("secret", "u1", NOW + 60))

    with pytest.raises(TokenError, match=reason):
        verify_token("secret", token, now=NOW)


def test_an_expired_token_is_refused() -> None:
    with pytest.raises(TokenError, match="expired"):
        verify_token("secret", sign_token("secret", "u1", NOW - 1), now=NOW)


@pytest.mark.parametrize(
    ("requested", "configured", "credentials_left", "allowed"),
    [
        (8 * 24 * 3600, 30 * 24 * 3600, None, SIGV4_MAX_EXPIRY_S),  # 8 days: capped at 7
        (600, 3600, None, 600),
        (7200, 3600, None, 3600),
        (3600, SIGV4_MAX_EXPIRY_S, 1200.5, 1200),  # temporary credentials die sooner
    ],
)
def test_expiry_is_the_least_of_request_maximum_and_credentials(
    requested: int, configured: int, credentials_left: float | None, allowed: int
) -> None:
    assert allowed_expiry(requested, configured, credentials_left) == allowed
