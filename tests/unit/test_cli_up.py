"""``encore up`` says in words what runs where and how to stop it; ``--json`` gives the
endpoint and the DSN to scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import pipeline, stack
from cli.main import EXIT_OK, main
from encore.settings import Settings
from local.services import LocalPostgres, MotoServer

DSN = "host=127.0.0.1 port=5433 dbname=encore user=encore"


@pytest.fixture
def started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No stack is up; starting one records it under ``tmp_path`` without running anything."""
    calls: list[str] = []
    up = stack.LocalStack(
        Settings.load({}, aws_endpoint_url="http://127.0.0.1:4566", database_dsn=DSN),
        LocalPostgres(tmp_path / "postgres", 5433),
        MotoServer(tmp_path / "moto", 4566),
        state_file=tmp_path / stack.STACK_FILE,
    )

    def start_stack(fresh: bool) -> stack.LocalStack:
        calls.append("start")
        return up

    monkeypatch.setattr(stack, "running_stack", lambda: None)
    monkeypatch.setattr(stack, "start_stack", start_stack)
    monkeypatch.setattr(pipeline, "prepare_database", lambda settings: calls.append("migrate"))
    return calls


def test_up_says_what_runs_where_and_how_to_stop_it(
    started: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["up"])

    lines = capsys.readouterr().out.splitlines()
    assert code == EXIT_OK
    assert started == ["start", "migrate"]
    assert lines == [
        f"local stack up (state in {tmp_path})",
        f"  Postgres      {DSN}",
        "  AWS endpoint  http://127.0.0.1:4566 (moto's server)",
        "  bucket        s3://encore-pipeline, stream encore-changes",
        "`encore load EXPORT` loads an export; `encore down` stops the stack.",
    ]


def test_up_with_json_prints_the_endpoint_and_the_dsn(
    started: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["up", "--json"])

    assert code == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {
        "aws_endpoint_url": "http://127.0.0.1:4566",
        "database_dsn": DSN,
    }


def test_up_while_up_describes_the_running_stack_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    external = stack.LocalStack(
        Settings.load(
            {},
            aws_endpoint_url="http://127.0.0.1:4566",
            database_dsn="host=127.0.0.1 dbname=encore user=encore password=s3cret",
        ),
        None,
        None,
        state_file=tmp_path / stack.STACK_FILE,
    )
    monkeypatch.setattr(stack, "running_stack", lambda: external)
    monkeypatch.setattr(stack, "start_stack", lambda fresh: pytest.fail("started a stack"))

    code = main(["up"])

    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert out.startswith(f"local stack already up (state in {tmp_path})\n")
    assert "password=*** (ENCORE_DATABASE_DSN, not started here)" in out
    assert "s3cret" not in out
    assert "http://127.0.0.1:4566 (AWS_ENDPOINT_URL, not started here)" in out
