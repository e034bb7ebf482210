"""The main job: the whole pipeline on the marketplace's own export, on one machine.

Starts the local stack, loads the export, replays its bids as live traffic
while the capture and landing run, runs the popularity job and the nightly
recommendations on local Spark, fetches one user's presigned document over
HTTP, checks the counts agree end to end, prints a summary and writes it as
JSON to ``.encore/summary.json`` (``ENCORE_STATE_DIR`` moves it).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import urllib.request
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from cli import pipeline
from cli.progress import Progress, ProgressFactory, counting
from cli.report import render_report
from cli.stack import local_stack, state_dir
from encore import layout
from encore.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_EXPORT = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "encore" / ("user_interaction.csv")
)


class CheckFailed(RuntimeError):
    """The pipeline ran but its counts disagree."""


def run_demo(
    export_path: Path, say: Any = print, progress: ProgressFactory | None = Progress
) -> dict[str, Any]:
    """Run the pipeline on the export; ``say`` reports each stage's outcome and
    ``progress`` makes the bars of the long ones (None: no bars)."""
    root = state_dir()
    started = time.monotonic()
    anchor = datetime.now(UTC).replace(microsecond=0)
    with local_stack(root) as stack:
        # Only once the stack is ours: a refused run leaves the last run's results alone.
        for leftover in ("summary.json", "report.html"):
            (root / leftover).unlink(missing_ok=True)
        settings = stack.settings.replace(presign_secret=secrets.token_hex(16))
        say(
            f"stack up: postgres {stack.postgres.port if stack.postgres else '(external)'}, "
            f"AWS endpoint {settings.aws_endpoint_url}"
        )

        pipeline.prepare_database(settings)
        load = pipeline.load_export(
            settings,
            export_path,
            root / "rejects" / f"{export_path.stem}.rejects.csv",
            anchor,
            progress=progress,
        )
        export = load.export
        say(
            f"loaded {export.rows_read} rows ({len(export.rejected)} rejected) from {export_path}:"
            f" {len(load.listings)} listings, {len(load.bids)} bids to replay"
        )

        with counting(progress, "replay", len(load.bids), "bids") as on_progress:
            flow = pipeline.replay_live(
                settings, load, anchor, pause_s=0.01, on_progress=on_progress
            )
        landed = pipeline.landed_event_counts(settings)
        say(
            f"replayed {flow.bids_inserted} bids, closed {flow.auctions_closed} auctions; "
            f"captured {flow.changes_captured} changes in {flow.capture_runs} runs; "
            f"landed {flow.landed} records"
        )

        spark_started = time.monotonic()
        from local.spark import local_session

        spark = local_session(settings, "encore-demo")
        try:
            popularity = pipeline.popularity_catch_up(spark, settings, progress)
            say(
                f"popularity: {popularity['total_bids']} bids counted, "
                f"{popularity['feeds_written']} feeds written"
            )

            nightly = pipeline.nightly_run(spark, settings, progress)
            say(f"recommendations: run {nightly['run_id']} for {nightly['users']} users")

            from batch.evaluation import evaluate_bid_log

            bid_log = export_path.parent.parent / "ebay_auctions" / "auction.csv"
            if bid_log.exists():
                nightly["metrics_bid_log"] = evaluate_bid_log(spark, str(bid_log), settings)
                say(f"evaluated the same model on the eBay bid log ({bid_log})")
            else:
                say(f"no eBay bid log at {bid_log} (beside the export's folder): not evaluated")
        finally:
            spark.stop()
        spark_s = time.monotonic() - spark_started

        url_check = _fetch_user_document(settings, nightly)

        summary = _summary(load, flow, landed, popularity, nightly, url_check)
        summary["timeline"] = flow.timeline
        summary["seconds"] = {
            "total": round(time.monotonic() - started, 1),
            "spark": round(spark_s, 1),
        }
        try:
            _check(summary)
        finally:
            path = root / "summary.json"
            path.write_text(json.dumps(summary, indent=2, default=str))
            summary["summary_file"] = str(path)
            summary["report_file"] = str(_publish_report(settings, summary, root))
    return summary


def _publish_report(settings: Settings, summary: dict[str, Any], root: Path) -> Path:
    """Write the HTML report next to the summary and to the bucket."""
    import boto3

    page = render_report(summary)
    path = root / "report.html"
    path.write_text(page)
    boto3.client("s3", **settings.boto3_kwargs()).put_object(
        Bucket=settings.bucket,
        Key=layout.REPORT_KEY,
        Body=page.encode(),
        ContentType="text/html; charset=utf-8",
    )
    return path


def _fetch_user_document(settings: Settings, nightly: dict[str, Any]) -> dict[str, Any]:
    from lambdas.presign.handler import presigned_url_for_user

    user_id = next(iter(nightly["sample"]))
    reply = presigned_url_for_user(settings, user_id, 900)
    with urllib.request.urlopen(reply["url"], timeout=10) as response:
        document = json.loads(response.read())
    return {
        "user_id": user_id,
        "url": reply["url"],
        "expires_in": reply["expires_in"],
        "http_status": response.status,
        "document_user_id": document.get("user_id"),
        "items": len(document.get("items", [])),
        "source": document.get("source"),
    }


def _summary(
    load: pipeline.LoadResult,
    flow: pipeline.FlowCounts,
    landed: dict[str, int],
    popularity: dict[str, Any],
    nightly: dict[str, Any],
    url_check: dict[str, Any],
) -> dict[str, Any]:
    export = load.export
    return {
        "export": {
            "source": export.source,
            "rows_read": export.rows_read,
            "rows_loaded": export.rows_read - len(export.rejected),
            "rows_rejected": len(export.rejected),
            "rejects_file": str(load.rejects_path),
            "interactions": len(export.interactions),
            "listings": len(load.listings),
            "bids_planned": len(load.bids),
            "bid_amount_total": str(sum((bid.amount for bid in load.bids), Decimal(0))),
        },
        "database": {"bids_inserted": flow.bids_inserted, "auctions_closed": flow.auctions_closed},
        "capture": {
            "runs": flow.capture_runs,
            "changes_captured": flow.changes_captured,
            "events_sent": flow.events_captured,
            "dead_lettered": flow.dead_lettered,
            "slot_lag_bytes": flow.last_lag_bytes,
        },
        "landing": {
            "records_landed": flow.landed,
            "errors": flow.landing_errors,
            "distinct_events": landed,
            "bid_events": landed.get("bid.insert", 0),
        },
        "popularity": {
            "total_bids": popularity["total_bids"],
            "total_amount": popularity["total_amount"],
            "duplicates_removed": popularity.get("duplicates_removed"),
            "quarantined": popularity.get("quarantined"),
            "state_events": popularity.get("state_events"),
            "folded_listings": popularity.get("folded_listings"),
            "top10": popularity["top"][:10],
        },
        "recommendations": {
            key: nightly.get(key)
            for key in (
                "run_id",
                "interactions_read",
                "users",
                "users_als",
                "users_fallback",
                "live_listings",
                "metrics",
                "evaluation",
                "metrics_bid_log",
                "sample",
            )
        },
        "presigned_url": url_check,
    }


def _check(summary: dict[str, Any]) -> None:
    bids = summary["database"]["bids_inserted"]
    planned = summary["export"]["bids_planned"]
    landed = summary["landing"]["bid_events"]
    counted = summary["popularity"]["total_bids"]
    read = summary["recommendations"]["interactions_read"]
    problems = []
    if not bids == planned == landed == counted == read:
        problems.append(
            f"bids planned {planned}, inserted {bids}, landed {landed}, "
            f"counted by popularity {counted}, read by the nightly job {read}"
        )
    if summary["popularity"]["total_amount"] != summary["export"]["bid_amount_total"]:
        problems.append(
            f"bid amounts: export {summary['export']['bid_amount_total']}, "
            f"popularity {summary['popularity']['total_amount']}"
        )
    url = summary["presigned_url"]
    if url["http_status"] != 200 or url["document_user_id"] != url["user_id"]:
        problems.append(f"presigned document check failed: {url}")
    summary["checks"] = {"passed": not problems, "problems": problems}
    if problems:
        raise CheckFailed("; ".join(problems))


def _bid_log_metrics(recs: dict[str, Any]) -> dict[str, Any] | None:
    evaluated = recs.get("metrics_bid_log") or {}
    if "als" not in evaluated:
        return None
    return {"als": evaluated["als"], "popularity": evaluated["popularity"]}


def render(summary: dict[str, Any]) -> str:
    export, capture, landing = summary["export"], summary["capture"], summary["landing"]
    popularity, recs = summary["popularity"], summary["recommendations"]
    lines = [
        "",
        "Encore pipeline: summary",
        f"  export rows        {export['rows_read']} read, {export['rows_loaded']} loaded, "
        f"{export['rows_rejected']} rejected ({export['rejects_file']})",
        f"  bids               {summary['database']['bids_inserted']} inserted, "
        f"{export['bid_amount_total']} in amounts",
        f"  capture            {capture['changes_captured']} changes in {capture['runs']} runs, "
        f"{capture['dead_lettered']} dead-lettered, slot lag {capture['slot_lag_bytes']} bytes",
        f"  landing            {landing['bid_events']} bid events landed, "
        f"{sum(landing['distinct_events'].values())} events in all",
        f"  popularity         {popularity['total_bids']} bids, {popularity['total_amount']} "
        f"counted",
        f"  nightly job        {recs['interactions_read']} interactions read, "
        f"{recs['users']} users ({recs['users_als']} by ALS, "
        f"{recs['users_fallback']} by popularity)",
        "",
        "  popularity top 10 (live listings)",
    ]
    for item in popularity["top10"]:
        lines.append(
            f"    {item['rank']:>2}. {item['title'][:60]:<60} {item['bids_7d']:>4} bids"
            f"  score {item['trending_score']:.2f}"
        )
    lines.append("")
    lines.append("  recommendations for three users")
    for user_id, titles in list((recs.get("sample") or {}).items())[:3]:
        lines.append(f"    {user_id}: " + "; ".join(str(title) for title in titles[:3]))
    evaluations = (
        ("the export", recs.get("metrics")),
        ("the eBay bid log", _bid_log_metrics(recs)),
    )
    for data, metrics in evaluations:
        if not metrics:
            continue
        lines.append("")
        lines.append(f"  evaluation on {data} (held-out bids)")
        for model, values in metrics.items():
            if isinstance(values, dict):
                shown = ", ".join(
                    f"{name} {value:.3f}"
                    for name, value in values.items()
                    if isinstance(value, float)
                )
                lines.append(f"    {model:<12} {shown}")
    url = summary["presigned_url"]
    lines += [
        "",
        f"  presigned URL for {url['user_id']} (HTTP {url['http_status']}, {url['items']} items,"
        f" source {url['source']}):",
        f"    {url['url']}",
        "",
        f"  checks passed; {summary['seconds']['total']} s in all.",
        f"  summary: {summary.get('summary_file')}",
        f"  report:  {summary.get('report_file')}",
    ]
    return "\n".join(lines)
