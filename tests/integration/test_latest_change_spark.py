"""The Spark form of the latest-change rule picks what the pure rule picks."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from encore import changes


def test_spark_picks_the_latest_change_as_the_pure_rule_does(spark: Any) -> None:
    candidates = [
        ("a", "k1", "insert", "0/9", "2026-12-04T15:00:00Z", None),
        ("b", "k1", "update", "0/10", "2026-12-04T15:00:00Z", None),
        ("c", "k2", "update", "1/0", "2026-12-04T15:00:00Z", None),
        ("d", "k2", "update", "0/FFFFFFFF", "2026-12-04T16:00:00Z", None),
        ("e", "k3", "update", "0/20", "2026-12-04T15:00:01Z", None),
        ("f", "k3", "update", "0/20", "2026-12-04T15:00:00Z", None),
        ("g", "k4", "delete", "0/30", "2026-12-04T15:00:00Z", None),
        ("h", "k4", "update", "0/30", "2026-12-04T15:00:00Z", None),
        ("i", "k5", "update", "0/40", "2026-12-04T15:00:00Z", "live"),
        ("j", "k5", "insert", "0/40", "2026-12-04T15:00:00Z", "live"),
        ("k", "k6", "update", "0/50", "2026-12-04T15:00:00Z", "sold"),
        ("l", "k6", "update", "0/50", "2026-12-04T15:00:00Z", "live"),
        ("m", "k7", "update", "0/60", "2026-12-04T15:00:00Z", "live"),
        ("n", "k7", "update", "0/60", "2026-12-04T15:00:00Z", "live"),
    ]
    rows = [(*row[:4], datetime.fromisoformat(row[4]), row[5]) for row in candidates]
    frame = spark.createDataFrame(
        rows,
        "event_id STRING, key STRING, op STRING, commit_lsn STRING, commit_time TIMESTAMP, "
        "status STRING",
    )

    picked = changes.latest_per_key(frame, "key").collect()

    by_key: dict[str, list[dict[str, str | None]]] = defaultdict(list)
    for event_id, key, op, lsn, at, status in candidates:
        by_key[key].append(
            {"event_id": event_id, "op": op, "commit_lsn": lsn, "commit_time": at, "status": status}
        )
    expected = {key: changes.latest_change(group)["event_id"] for key, group in by_key.items()}
    latest = {row["key"]: row["event_id"] for row in picked}
    assert len(picked) == len(latest)
    assert latest == expected
    assert expected == {
        "k1": "b",
        "k2": "c",
        "k3": "e",
        "k4": "g",
        "k5": "i",
        "k6": "k",
        "k7": "n",
    }
