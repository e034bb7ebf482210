"""Command output: bare lines on the right stream, never through the root logger."""

from __future__ import annotations

import logging

import pytest

from encore.output import output_logger


def test_output_lines_reach_their_stream_bare_and_only_once(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    output = output_logger("tests.output_example")

    with caplog.at_level(logging.DEBUG):
        output.info('{"users": %d}', 3)
        output.error("deploy failed: %s", "no stack")

    captured = capsys.readouterr()
    assert captured.out == '{"users": 3}\n'
    assert captured.err == "deploy failed: no stack\n"
    assert caplog.records == []  # the root logger's handlers never see them
    assert output_logger("tests.output_example") is output
    assert len(output.handlers) == 2
