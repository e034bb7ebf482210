"""Fixtures every test may use; no service starts unless a test asks for one.

Real services for integration and end-to-end tests, started once per session:

* ``aws_endpoint``: moto's server on a free 127.0.0.1 port, stopped by pid at the end;
* ``base_settings``: settings pointing at it, with the bucket, stream and delivery
  stream provisioned;
* ``postgres``: a throw-away Postgres with ``wal_level=logical``;
* ``spark``: one local Spark session for every test (its s3a endpoint is fixed when
  it is created, so every test shares the one endpoint).

Tests that need an isolated bucket use ``fresh_bucket``.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest

from cli.stack import LOCAL_AWS_ENV
from encore.settings import Settings
from infra.provision import provision
from local.services import LocalPostgres, MotoServer, free_port

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


@pytest.fixture(scope="session")
def aws_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = MotoServer(tmp_path_factory.mktemp("moto"), free_port())
    server.start()
    try:
        yield server.endpoint_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def base_settings(aws_endpoint: str) -> Settings:
    settings = Settings.load(
        {}, aws_endpoint_url=aws_endpoint, spark_shuffle_partitions=2, presign_secret="test-secret"
    )
    provision(settings)
    return settings


@pytest.fixture
def fresh_bucket(base_settings: Settings) -> Settings:
    """Settings with a bucket, stream and delivery stream of the test's own."""
    suffix = uuid.uuid4().hex[:8]
    settings = base_settings.replace(
        bucket=f"encore-test-{suffix}",
        stream_name=f"encore-changes-{suffix}",
        delivery_stream_name=f"encore-landing-{suffix}",
    )
    provision(settings)
    return settings


@pytest.fixture
def export_head(shared_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """Writes the export's header and first ``rows`` rows, as exported (quotes, spaces and
    all), then the ``extra`` rows, to ``slice.csv``; returns its path."""

    def write(rows: int, extra: Sequence[Sequence[str]] = ()) -> Path:
        source = shared_data / "encore" / "user_interaction.csv"
        target = tmp_path / "slice.csv"
        with open(source, newline="") as handle, open(target, "w", newline="") as out:
            writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
            for number, row in enumerate(csv.reader(handle)):
                if number > rows:
                    break
                writer.writerow(row)
            writer.writerows(extra)
        return target

    return write


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    # pytest's own temporary folders are private to root; the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="encore-pg-"))
    root.chmod(0o755)
    server = LocalPostgres(root, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def spark(base_settings: Settings) -> Iterator[Any]:
    from local.spark import local_session

    session = local_session(base_settings, "encore-tests")
    yield session
    session.stop()


@pytest.fixture
def s3(base_settings: Settings) -> Any:
    return boto3.client("s3", **base_settings.boto3_kwargs())


@pytest.fixture
def fresh_database(postgres: LocalPostgres, fresh_bucket: Settings) -> Iterator[Settings]:
    """``fresh_bucket`` settings with a database and replication slot name of their own."""
    import psycopg2

    database = "test_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(postgres.dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    admin.close()
    yield fresh_bucket.replace(
        database_dsn=postgres.dsn.replace(f"dbname={postgres.database}", f"dbname={database}"),
        slot_name=f"slot_{database}",
    )
    # A slot left behind holds WAL and one of the server's few slots: drop it with the database.
    admin = psycopg2.connect(postgres.dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (database,),
        )
        cursor.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s",
            (database,),
        )
        cursor.execute(f"DROP DATABASE IF EXISTS {database}")
    admin.close()
