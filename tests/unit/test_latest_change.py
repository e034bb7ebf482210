"""Which change of a row stands, as a pure rule (the Spark form is held to it in integration)."""

from __future__ import annotations

import pytest

from encore import changes, events


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("0/9", "0/10"),  # string order would put 0/9 last
        ("0/A", "0/10"),
        ("0/FFFFFFFF", "1/0"),  # the low half wraps into the high half
        ("9/0", "A/0"),
        ("0/16B3748", "0/16B3749"),
    ],
)
def test_lsns_order_by_wal_position(earlier: str, later: str) -> None:
    assert events.parse_lsn(earlier) < events.parse_lsn(later)


@pytest.mark.parametrize("text", ["16B3748", "", "0/G"])
def test_what_is_not_an_lsn_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        changes.latest_change([change("a", "update", text), change("b", "update", "0/1")])


def change(
    event_id: str,
    op: str,
    lsn: str,
    at: str = "2026-12-04T15:00:00.000000Z",
    status: str | None = None,
) -> dict[str, str | None]:
    return {
        "event_id": event_id,
        "op": op,
        "commit_lsn": lsn,
        "commit_time": at,
        "status": status,
    }


@pytest.mark.parametrize(
    ("candidates", "latest"),
    [
        ([change("a", "insert", "0/9"), change("b", "update", "0/10")], "b"),
        ([change("a", "update", "1/0"), change("b", "update", "0/FFFFFFFF", "2027")], "a"),
        (
            [
                change("a", "update", "0/20", "2026-12-04T15:00:01.000000Z"),
                change("b", "update", "0/20", "2026-12-04T15:00:00.000000Z"),
            ],
            "a",
        ),
        ([change("b", "insert", "0/30"), change("a", "update", "0/30")], "a"),
        ([change("a", "delete", "0/30"), change("b", "update", "0/30")], "a"),
        (
            [
                change("a", "update", "0/30", status="sold"),
                change("b", "update", "0/30", status="live"),
            ],
            "a",
        ),
        (
            [change("b", "delete", "0/30"), change("a", "update", "0/30", status="ended")],
            "b",
        ),
        ([change("a", "update", "0/30"), change("b", "update", "0/30")], "b"),
    ],
    ids=[
        "lsn-numeric",
        "lsn-before-time",
        "time-breaks-lsn-tie",
        "update-after-insert",
        "delete-last",
        "closed-status-wins",
        "delete-before-status",
        "event-id",
    ],
)
def test_the_latest_change_follows_lsn_time_operation_status_then_id(
    candidates: list[dict[str, str | None]], latest: str
) -> None:
    assert changes.latest_change(candidates)["event_id"] == latest
    assert changes.latest_change(candidates[::-1])["event_id"] == latest
