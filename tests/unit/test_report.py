from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from cli.report import render_report

SUMMARY: dict[str, Any] = {
    "export": {"bids_planned": 10, "rows_rejected": 1, "rejects_file": "/tmp/r.csv"},
    "database": {"bids_inserted": 10},
    "capture": {"changes_captured": 14},
    "landing": {"bid_events": 10},
    "popularity": {
        "total_bids": 10,
        "top10": [
            {"rank": 1, "title": "Funko <Pop> & co", "trending_score": 2.5},
            {"rank": 2, "title": "Card", "trending_score": 1.0},
        ],
    },
    "recommendations": {
        "interactions_read": 10,
        "metrics": {
            "als": {"precision_at_10": 0.2, "ndcg_at_10": 0.3},
            "popularity": {"precision_at_10": 0.1, "ndcg_at_10": 0.15},
        },
    },
    "timeline": [{"t": 0.0, "inserted": 0, "landed": 0}, {"t": 1.5, "inserted": 10, "landed": 14}],
    "checks": {"passed": True, "problems": []},
}


class _Figures(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[str] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "svg":
            self.svgs.append(dict(attrs)["aria-label"] or "")

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def test_report_draws_every_plot_and_escapes_titles() -> None:
    page = render_report(SUMMARY)
    parser = _Figures()
    parser.feed(page)

    assert parser.svgs == [
        "Bids at each stage",
        "Bids inserted and events landed during the replay",
        "Popularity leaders (trending score, live listings)",
        "Evaluation on held-out bids: ALS against the popularity baseline",
    ]
    assert "Funko <Pop> & co" in "".join(parser.texts)
    assert "<Pop>" not in page
    assert "all checks passed" in page


def test_report_without_leaders_or_metrics_says_so_instead_of_an_empty_plot() -> None:
    summary = {
        **SUMMARY,
        "popularity": {"total_bids": 0, "top10": []},
        "recommendations": {"interactions_read": None, "metrics": None},
    }
    parser = _Figures()
    parser.feed(render_report(summary))

    assert parser.svgs == [
        "Bids at each stage",
        "Bids inserted and events landed during the replay",
    ]
    text = "".join(parser.texts)
    assert "Popularity leaders (trending score, live listings): nothing to show." in text
    assert "ALS against the popularity baseline: nothing to show." in text


def test_evaluation_bars_pair_each_metric_and_colour_them_by_model() -> None:
    import re

    from cli.report import MODEL_COLOURS

    page = render_report(SUMMARY)
    plot = page[page.index("Evaluation on held-out bids") :]
    plot = plot[: plot.index("</svg>")]

    labels = re.findall(r'text-anchor="end">([^<]+)</text>', plot)
    fills = re.findall(r'<rect [^>]*fill="([^"]+)"', plot)
    assert labels == [
        "export als precision_at_10",
        "export popularity precision_at_10",
        "export als ndcg_at_10",
        "export popularity ndcg_at_10",
    ]
    assert fills == [MODEL_COLOURS["als"], MODEL_COLOURS["popularity"]] * 2


def test_long_leader_labels_are_shortened_so_their_rank_stays_visible() -> None:
    summary = {
        **SUMMARY,
        "popularity": {
            "total_bids": 1,
            "top10": [{"rank": 1, "title": "A very long title " * 5, "trending_score": 1.0}],
        },
    }

    page = render_report(summary)

    assert "1. A very long title A very long \u2026" in page
