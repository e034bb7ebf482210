"""Settings for every stage, read once from the environment into a typed object.

Each setting has one environment variable, named in ``ENV`` below, and one
default, stated once in the dataclass. An explicit keyword argument to
:meth:`Settings.load` beats the environment. Booleans accept only
``true/false/1/0/yes/no`` so that ``"false"`` never reads as true.

The AWS endpoint is a setting like any other: unset on AWS, where boto3 finds
the real endpoints, and ``http://127.0.0.1:4566`` locally, where moto's server
or LocalStack answers. Stage code never names an endpoint itself.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """A setting is missing or cannot be parsed."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline. Field order is the order of the settings table."""

    # Where things live.
    aws_region: str = "us-east-1"
    aws_endpoint_url: str | None = None
    bucket: str = "encore-pipeline"
    stream_name: str = "encore-changes"
    delivery_stream_name: str = "encore-landing"
    database_dsn: str | None = None
    database_secret_id: str | None = None

    # Change capture.
    slot_name: str = "encore_capture"
    publication_name: str = "encore_capture"
    capture_max_bytes: int = 64 * 1024 * 1024
    capture_time_margin_s: float = 10.0
    capture_linger_s: float = 0.0
    capture_poll_s: float = 0.5

    # Popularity feeds.
    feed_top_n: int = 10
    trending_half_life_s: float = 3600.0
    stream_trigger_s: float = 2.0
    watermark_s: float = 600.0

    # Nightly recommendations.
    recs_per_user: int = 10
    als_rank: int = 16
    als_reg: float = 0.1
    als_alpha: float = 10.0
    als_iterations: int = 10
    als_seed: int = 42
    weight_bid_count: float = 1.0
    weight_amount: float = 0.2
    recency_half_life_days: float = 30.0
    eval_max_users: int = 20_000
    als_tune_every_days: int = 7

    # Serving.
    presign_secret: str | None = None
    presign_max_expiry_s: int = 7 * 24 * 3600

    # Local runs.
    spark_master: str = "local[2]"
    spark_shuffle_partitions: int = 4

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default: the process environment).

        Keyword arguments win over the environment; unknown names are an error.
        """
        environ = os.environ if environ is None else environ
        known = {f.name: f for f in fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)!r}")

        values: dict[str, Any] = {}
        for name, field in known.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            raw = environ.get(ENV[name])
            if raw is not None and raw != "":
                values[name] = _parse(ENV[name], raw, field.type)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def require_dsn(self) -> str:
        if not self.database_dsn:
            raise SettingsError(f"{ENV['database_dsn']} is not set: give the Postgres DSN")
        return self.database_dsn

    def require_presign_secret(self) -> str:
        if not self.presign_secret:
            raise SettingsError(
                f"{ENV['presign_secret']} is not set: give the secret the app signs tokens with"
            )
        return self.presign_secret

    def boto3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``boto3.client``: the region and, locally, the endpoint."""
        kwargs: dict[str, Any] = {"region_name": self.aws_region}
        if self.aws_endpoint_url:
            kwargs["endpoint_url"] = self.aws_endpoint_url
        return kwargs


ENV: dict[str, str] = {f.name: "ENCORE_" + f.name.upper() for f in fields(Settings)}
ENV["aws_region"] = "AWS_REGION"
ENV["aws_endpoint_url"] = "AWS_ENDPOINT_URL"


def _parse(variable: str, raw: str, type_name: Any) -> Any:
    text = str(type_name)
    try:
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
        if text.startswith("bool"):
            return parse_bool(raw)
    except ValueError as exc:
        raise SettingsError(f"{variable}={raw!r} is not a valid {text.split()[0]}") from exc
    return raw


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with any password replaced by ``***``, for logs and messages."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
        return dsn
    words = []
    for word in dsn.split():
        key, _, _ = word.partition("=")
        words.append(f"{key}=***" if key.strip().lower() == "password" else word)
    return " ".join(words)


HELP: dict[str, str] = {
    "aws_region": "AWS region of the bucket, stream and delivery stream",
    "aws_endpoint_url": "AWS endpoint; unset on AWS, `http://127.0.0.1:4566` locally",
    "bucket": "S3 bucket holding landing data, feeds and recommendations",
    "stream_name": "Kinesis Data Stream the capture puts change events to",
    "delivery_stream_name": "Firehose delivery stream landing the events in S3",
    "database_dsn": "libpq DSN of the marketplace's Postgres (its password is never logged)",
    "database_secret_id": "Secrets Manager secret (RDS JSON shape) to build the DSN from, on AWS",
    "slot_name": "logical replication slot the capture reads",
    "publication_name": "publication naming the captured tables",
    "capture_max_bytes": "most event bytes one capture run sends",
    "capture_linger_s": "keep reading the slot this long after it is drained (AWS: 45)",
    "capture_poll_s": "pause between reads of a drained slot while lingering",
    "capture_time_margin_s": "a capture run stops this long before its Lambda timeout",
    "feed_top_n": "listings in each popularity feed",
    "trending_half_life_s": "half-life of a bid's weight in the trending score",
    "stream_trigger_s": "micro-batch interval of the continuous popularity job",
    "watermark_s": "how late an event may arrive before it is counted as late",
    "recs_per_user": "recommendations in each user's document",
    "als_rank": "ALS latent factors",
    "als_reg": "ALS regularisation",
    "als_alpha": "ALS implicit-feedback confidence scale",
    "als_iterations": "ALS iterations",
    "als_seed": "ALS random seed (training is deterministic)",
    "eval_max_users": "users the nightly evaluation and tuning use at most (a seeded sample)",
    "als_tune_every_days": "nights reuse the published night's tuned ALS parameters until the "
    "search is this old (0: search every night)",
    "weight_bid_count": "confidence weight of a user's bid count on an item",
    "weight_amount": "confidence weight of log(1 + amount bid) on an item",
    "recency_half_life_days": "half-life of a bid's weight in the confidence",
    "presign_secret": "secret the app signs user tokens with (HMAC-SHA256)",
    "presign_max_expiry_s": "longest life of a presigned URL (SigV4 allows 7 days)",
    "spark_master": "Spark master for local runs",
    "spark_shuffle_partitions": "shuffle partitions for local runs (small keeps them fast)",
}


def settings_table() -> str:
    """The settings as a markdown table, in field order: the README embeds it."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for item in fields(Settings):
        default = "unset" if item.default is None else f"`{item.default}`"
        rows.append(f"| `{ENV[item.name]}` | {default} | {HELP.get(item.name, '')} |")
    return "\n".join(rows)
