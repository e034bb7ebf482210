"""The endpoint switch: an endpoint that already answers is used as it is (LocalStack's case)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import boto3
import pytest

from cli.stack import start_stack
from local.services import MotoServer, ServiceError, free_port

pytestmark = pytest.mark.integration


def test_an_answering_endpoint_is_used_and_no_moto_is_started(
    aws_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(tempfile.mkdtemp(prefix="encore-stack-"))
    root.chmod(0o755)
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_endpoint)
    monkeypatch.setenv("ENCORE_DATABASE_DSN", "host=127.0.0.1 port=1 dbname=none")

    stack = start_stack(root, fresh=True)
    try:
        assert stack.endpoint is None and stack.postgres is None
        assert stack.settings.aws_endpoint_url == aws_endpoint
        s3 = boto3.client("s3", **stack.settings.boto3_kwargs())
        assert stack.settings.bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    finally:
        stack.stop()
    assert not (root / "stack.json").exists()


def test_a_busy_port_is_refused_before_anything_is_deleted(tmp_path: Path) -> None:
    busy = MotoServer(tmp_path / "busy", free_port())
    busy.start()
    (tmp_path / "postgres").mkdir()
    try:
        with pytest.raises(ServiceError, match="already in use"):
            start_stack(tmp_path, fresh=True, endpoint_port=busy.port)
        assert (tmp_path / "postgres").exists()
    finally:
        busy.stop()
