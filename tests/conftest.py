"""Fixtures every test may use; no service starts unless a test asks for one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.stack import LOCAL_AWS_ENV

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVENTS = Path(__file__).resolve().parent / "events"

# No test may reach for real AWS credentials or an instance metadata endpoint.
for _name, _value in LOCAL_AWS_ENV.items():
    os.environ[_name] = _value
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        pytest.fail(f"the project's data folder {DATA} is missing; it must sit beside the checkout")
    return DATA
