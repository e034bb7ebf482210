from __future__ import annotations

import pytest

from encore.settings import ENV, Settings, SettingsError, parse_bool, redact_dsn


def test_settings_read_the_environment_and_an_argument_wins() -> None:
    environ = {"ENCORE_BUCKET": "from-env", "ENCORE_FEED_TOP_N": "25", "AWS_REGION": "eu-west-1"}

    settings = Settings.load(environ, bucket="from-argument")

    assert (settings.bucket, settings.feed_top_n, settings.aws_region) == (
        "from-argument",
        25,
        "eu-west-1",
    )


def test_settings_name_the_variable_that_does_not_parse() -> None:
    with pytest.raises(SettingsError, match="ENCORE_FEED_TOP_N='ten' is not a valid int"):
        Settings.load({"ENCORE_FEED_TOP_N": "ten"})


def test_settings_refuse_unknown_names_and_name_a_missing_dsn() -> None:
    with pytest.raises(SettingsError, match="unknown settings"):
        Settings.load({}, colour="blue")
    with pytest.raises(SettingsError, match=ENV["database_dsn"]):
        Settings.load({}).require_dsn()


@pytest.mark.parametrize(("raw", "value"), [("false", False), ("0", False), ("TRUE", True)])
def test_parse_bool_reads_false_as_false(raw: str, value: bool) -> None:
    assert parse_bool(raw) is value


def test_parse_bool_refuses_anything_else() -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("maybe")


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            "host=db user=encore password=s3cret dbname=x",
            "host=db user=encore password=*** dbname=x",
        ),
        ("postgresql://encore:s3cret@db:5432/x", "postgresql://encore:***@db:5432/x"),
    ],
)
def test_redact_dsn_hides_the_password(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown


def test_settings_command_piped_into_a_reader_that_stops_early_is_quiet() -> None:
    import subprocess
    import sys

    pipeline = subprocess.run(
        f"{sys.executable} -m cli.main settings | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        check=False,
    )

    assert pipeline.returncode == 0
    assert pipeline.stdout.startswith("| variable")
    assert pipeline.stderr == ""
