"""The whole pipeline on a slice of the real export, with exact counts end to end.

Real Postgres with logical decoding, the capture handler in-process, Kinesis
and Firehose on moto's server over HTTP, the local Firehose stand-in, and
both Spark jobs on local Spark reading and writing through s3a.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cli import pipeline
from encore import layout
from encore.settings import Settings

pytestmark = pytest.mark.integration

SLICE_ROWS = 400
ANCHOR = datetime(2026, 12, 1, 12, tzinfo=UTC)


@pytest.fixture
def export_slice(export_head: Callable[..., Path]) -> Path:
    """The export's first rows as exported, then two rows the loader must reject."""
    return export_head(
        SLICE_ROWS,
        [
            ["", "nobody", "Toys", "Funko", "Orphan", "1", "1", "5"],
            ["u-bad", "bad", "Toys", "Funko", "Priceless", "1", "1", "lots"],
        ],
    )


def run_everything(settings: Settings, export: Path, rejects: Path, spark: Any) -> dict[str, Any]:
    from batch.recommend import run_nightly
    from spark_streaming.popularity import run_popularity

    pipeline.prepare_database(settings)
    load = pipeline.load_export(settings, export, rejects, ANCHOR)
    flow = pipeline.replay_live(settings, load, ANCHOR, per_transaction=25)
    base_uri = layout.uri(settings.bucket, "", "s3a").rstrip("/")
    return {
        "load": load,
        "flow": flow,
        "landed": pipeline.landed_event_counts(settings),
        "popularity": run_popularity(spark, base_uri, settings, available_now=True, now=ANCHOR),
        "nightly": run_nightly(spark, base_uri, settings, now=ANCHOR),
    }


def test_pipeline_counts_agree_end_to_end_serves_a_user_and_a_rerun_doubles_nothing(
    fresh_database: Settings, export_slice: Path, tmp_path: Path, spark: Any
) -> None:
    settings = fresh_database
    first = run_everything(settings, export_slice, tmp_path / "rejects.csv", spark)

    load, flow = first["load"], first["flow"]
    planned = sum(row.bid_count for row in load.export.interactions)
    amount = sum((row.bid_total for row in load.export.interactions), Decimal(0))
    assert load.export.rows_read == SLICE_ROWS + 2
    lines = export_slice.read_bytes().count(b"\n")  # quoted newlines make some records longer
    assert [reject.line for reject in load.export.rejected] == [lines - 1, lines]
    rejects = (tmp_path / "rejects.csv").read_text().splitlines()
    assert len(rejects) == 3 and "uid is empty" in rejects[1] and "not a number" in rejects[2]

    assert flow.bids_inserted == planned == len(load.bids)
    assert first["landed"]["bid.insert"] == planned
    assert first["landed"]["listing.insert"] == len(load.listings)
    assert first["landed"]["listing.update"] == flow.auctions_closed
    assert flow.changes_captured == planned + len(load.listings) + flow.auctions_closed
    assert first["popularity"]["total_bids"] == planned
    assert Decimal(first["popularity"]["total_amount"]) == amount
    assert first["nightly"]["interactions_read"] == planned
    assert first["nightly"]["users"] == len({row.user_id for row in load.export.interactions})

    from lambdas.presign.handler import presigned_url_for_user

    user_id = next(iter(first["nightly"]["sample"]))
    with urllib.request.urlopen(presigned_url_for_user(settings, user_id, 600)["url"]) as reply:
        document = json.loads(reply.read())
    assert (document["user_id"], document["run_id"]) == (user_id, first["nightly"]["run_id"])
    listing_ids = [item["listing_id"] for item in document["items"]]
    assert len(listing_ids) == len(set(listing_ids))

    second = run_everything(settings, export_slice, tmp_path / "rejects.csv", spark)

    assert second["flow"].bids_inserted == 0
    assert second["flow"].changes_captured == 0
    assert second["landed"] == first["landed"]
    for key in ("total_bids", "total_amount", "bid_events", "duplicates_removed"):
        assert second["popularity"][key] == first["popularity"][key], key
    assert second["nightly"]["interactions_read"] == planned
    assert second["nightly"]["users"] == first["nightly"]["users"]
