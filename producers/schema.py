"""Apply the ordered SQL migrations in ``producers/migrations`` once each.

Applied versions are recorded in ``schema_migrations``; running again applies
only what is new, so the command is safe to repeat.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

logger = logging.getLogger(__name__)


def migrations() -> list[tuple[str, str]]:
    """(version, sql) pairs in the order they apply."""
    folder = resources.files("producers") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [(entry.name.removesuffix(".sql"), entry.read_text()) for entry in files]


def migrate(conn: Any) -> list[str]:
    """Apply pending migrations in one transaction each; return the versions applied."""
    with conn, conn.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in cursor.fetchall()}

    applied = []
    for version, sql in migrations():
        if version in done:
            continue
        with conn, conn.cursor() as cursor:
            cursor.execute(sql)
            cursor.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        logger.info("applied migration %s", version)
        applied.append(version)
    return applied
