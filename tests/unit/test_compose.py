"""docker-compose.localstack.yml cannot run here (no Docker engine): check its structure."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.localstack.yml"


def test_compose_file_offers_localstack_and_a_logical_decoding_postgres_on_loopback() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]

    assert set(services) == {"localstack", "postgres"}
    assert services["localstack"]["ports"] == ["127.0.0.1:4566:4566"]
    needed = {"s3", "kinesis", "firehose"}
    assert needed <= set(services["localstack"]["environment"]["SERVICES"].split(","))
    postgres = services["postgres"]
    assert postgres["ports"] == ["127.0.0.1:5432:5432"]
    assert "wal_level=logical" in postgres["command"]
    assert all("healthcheck" in service for service in services.values())


def test_readme_points_the_project_at_the_compose_services() -> None:
    readme = (COMPOSE.parent / "README.md").read_text()
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]["environment"]

    assert "export AWS_ENDPOINT_URL=http://127.0.0.1:4566" in readme
    assert (
        f"user={environment['POSTGRES_USER']} password={environment['POSTGRES_PASSWORD']}" in readme
    )
