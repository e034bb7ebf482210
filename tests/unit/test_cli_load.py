"""`encore load` names a path that is not an export file, and `encore url` an empty user id,
before either needs a stack."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import EXIT_ERROR, main


@pytest.mark.parametrize(
    ("name", "said"), [("exports", "is a folder"), ("gone.csv", "is no such file")]
)
def test_load_names_a_path_that_is_not_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, said: str
) -> None:
    (tmp_path / "exports").mkdir()

    code = main(["load", str(tmp_path / name)])

    error = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert f"{tmp_path / name} {said}: pass the path of the marketplace's CSV export" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("user_id", ["", "  "])
def test_url_refuses_an_empty_user_id(capsys: pytest.CaptureFixture[str], user_id: str) -> None:
    code = main(["url", user_id])

    assert code == EXIT_ERROR
    assert "the user id is empty" in capsys.readouterr().err
