"""A static HTML report of a run: counts per stage, landing lag over time, the popularity
leaders and the evaluation against the popularity baseline.

Plots are inline SVG drawn here, so the page needs no script, no network and no
plotting package. The demo writes it next to its summary and to the bucket.
"""

from __future__ import annotations

import html
from typing import Any

WIDTH, BAR_HEIGHT, GAP = 640, 22, 6
PALETTE = ("#3b6ea5", "#e07b39", "#5a9e6f", "#b5485d", "#7d6bb3", "#8c8c8c")


#: Characters of a bar's label that fit its 260 pixels at the page's font size.
LABEL_CHARS = 34
MODEL_COLOURS = {"als": PALETTE[0], "popularity": PALETTE[1]}


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "\u2026"


def _bars(
    title: str, rows: list[tuple[str, float]], unit: str = "", colours: list[str] | None = None
) -> str:
    """A horizontal bar chart as an SVG figure; ``colours`` gives each bar's (default: in turn)."""
    if not rows:
        return f"<p>{html.escape(title)}: nothing to show.</p>"
    top = max((value for _, value in rows), default=0) or 1
    label_width = 260
    height = len(rows) * (BAR_HEIGHT + GAP) + GAP
    parts = [
        f'<svg class="plot" role="img" aria-label="{html.escape(title)}" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}">'
    ]
    for number, (label, value) in enumerate(rows):
        y = GAP + number * (BAR_HEIGHT + GAP)
        length = (WIDTH - label_width - 90) * value / top
        parts.append(
            f'<text x="{label_width - 8}" y="{y + 15}" text-anchor="end">'
            f"{html.escape(_label(label))}</text>"
            f'<rect x="{label_width}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" '
            f'fill="{colours[number] if colours else PALETTE[number % len(PALETTE)]}"/>'
            f'<text x="{label_width + length + 6:.1f}" y="{y + 15}">{_number(value)}{unit}</text>'
        )
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def _number(value: float) -> str:
    """Counts exactly (7,948), fractions to three significant digits."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:.3g}"


def _lines(title: str, series: dict[str, list[tuple[float, float]]], x_unit: str) -> str:
    """Line plot of one or more (x, y) series as an SVG figure."""
    points = [point for values in series.values() for point in values]
    if not points:
        return f"<p>{html.escape(title)}: no samples.</p>"
    max_x = max(x for x, _ in points) or 1
    max_y = max(y for _, y in points) or 1
    height, left, bottom = 240, 60, 30
    parts = [
        f'<svg class="plot" role="img" aria-label="{html.escape(title)}" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{WIDTH - 10}" y2="{height - bottom}" '
        'stroke="#444"/>',
        f'<line x1="{left}" y1="10" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
        f'<text x="{left - 6}" y="16" text-anchor="end">{max_y:,.0f}</text>',
        f'<text x="{WIDTH - 10}" y="{height - 8}" text-anchor="end">{max_x:,.1f} {x_unit}</text>',
    ]
    for number, (name, values) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        coords = " ".join(
            f"{left + (WIDTH - left - 10) * x / max_x:.1f},"
            f"{height - bottom - (height - bottom - 10) * y / max_y:.1f}"
            for x, y in values
        )
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
        )
        parts.append(
            f'<text x="{left + 10}" y="{24 + 16 * number}" fill="{colour}">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(parts)}</figure>"


def render_report(summary: dict[str, Any]) -> str:
    """The report page for a demo summary (the shape ``cli.demo`` writes)."""
    export, landing = summary["export"], summary["landing"]
    popularity, recs = summary["popularity"], summary["recommendations"]
    stages = [
        ("bids in the export", float(export["bids_planned"])),
        ("bids inserted", float(summary["database"]["bids_inserted"])),
        ("changes captured", float(summary["capture"]["changes_captured"])),
        ("bid events landed", float(landing["bid_events"])),
        ("bids in the popularity feeds", float(popularity["total_bids"])),
        ("bids read by the nightly job", float(recs["interactions_read"] or 0)),
    ]
    timeline = summary.get("timeline", [])
    lag = {
        "bids inserted": [(point["t"], point["inserted"]) for point in timeline],
        "events landed": [(point["t"], point["landed"]) for point in timeline],
    }
    leaders = [
        (f"{item['rank']}. {item['title']}", float(item["trending_score"]))
        for item in popularity["top10"]
    ]
    metric_rows: list[tuple[str, float]] = []
    metric_colours: list[str] = []
    evaluated = recs.get("metrics_bid_log") or {}
    bid_log = {model: evaluated[model] for model in ("als", "popularity") if model in evaluated}
    for data, metrics in (("export", recs.get("metrics") or {}), ("eBay", bid_log)):
        models = [model for model in MODEL_COLOURS if isinstance(metrics.get(model), dict)]
        names = (
            [name for name, value in metrics.get(models[0], {}).items() if models] if models else []
        )
        # Each metric's models side by side, ALS and popularity each in its own colour.
        for name in names:
            for model in models:
                value = metrics[model].get(name)
                if isinstance(value, int | float):
                    metric_rows.append((f"{data} {model} {name}", float(value)))
                    metric_colours.append(MODEL_COLOURS[model])
    checks = summary.get("checks", {})
    verdict = "all checks passed" if checks.get("passed") else "; ".join(checks.get("problems", []))
    body = "".join(
        [
            "<h1>Encore pipeline run</h1>",
            f'<p class="verdict">{html.escape(verdict)}</p>',
            _bars("Bids at each stage", stages),
            _lines("Bids inserted and events landed during the replay", lag, "s"),
            _bars("Popularity leaders (trending score, live listings)", leaders),
            _bars(
                "Evaluation on held-out bids: ALS against the popularity baseline",
                metric_rows,
                colours=metric_colours,
            ),
            f"<p>Rows rejected from the export: {export['rows_rejected']} "
            f"(<code>{html.escape(str(export['rejects_file']))}</code>).</p>",
        ]
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>Encore pipeline run</title><style>"
        "body{font:14px system-ui,sans-serif;margin:2em;max-width:760px;color:#222}"
        "figure{margin:1.5em 0}figcaption{font-weight:600;margin-bottom:.4em}"
        "svg text{font:12px system-ui,sans-serif}.verdict{font-weight:600}"
        f"</style></head><body>{body}</body></html>"
    )
