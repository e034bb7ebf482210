"""Where every object lives in the pipeline's bucket.

=========================================================  =========================
key                                                        written by
=========================================================  =========================
``landing/YYYY/MM/DD/HH/<name>``                           Firehose (the local bridge)
``landing-errors/<reason>/YYYY/MM/DD/<name>``              Firehose, records it could not land
``dead-letter/capture/YYYY/MM/DD/<event_id>.json``        capture, records too large to send
``quarantine/popularity/batch_id=<n>/...``                streaming job, rows it could not use
``checkpoints/popularity/``                                streaming job's checkpoint
``state/popularity/{events,folded,progress}/``             streaming job's state, by batch
``feeds/popularity/global.json``                           streaming job, the global top N
``feeds/popularity/category/<category-slug>.json``         streaming job, top N per category
``recommendations/current.json``                           nightly job, pointer to the live run
``recommendations/runs/<run_id>/users/<user_id>.json``     nightly job, one user's document
``recommendations/runs/<run_id>/batch.jsonl``              nightly job, all users (Personalize)
``recommendations/runs/<run_id>/manifest.json``            nightly job, model, counts, metrics
``reports/latest.html``                                    the command line, the last run's report
=========================================================  =========================

A user's document is found by reading the pointer first; last night's run
stays readable until tonight's pointer is written (see ``batch``).
"""

from __future__ import annotations

import re
from datetime import datetime

LANDING_PREFIX = "landing/"
LANDING_ERROR_PREFIX = "landing-errors/"
CAPTURE_DEAD_LETTER_PREFIX = "dead-letter/capture/"
POPULARITY_QUARANTINE_PREFIX = "quarantine/popularity/"
POPULARITY_CHECKPOINT_PREFIX = "checkpoints/popularity/"
POPULARITY_STATE_PREFIX = "state/popularity/"
FEEDS_PREFIX = "feeds/popularity/"
RECOMMENDATIONS_PREFIX = "recommendations/"
RECOMMENDATIONS_POINTER = RECOMMENDATIONS_PREFIX + "current.json"
REPORT_KEY = "reports/latest.html"


def landing_key(arrival: datetime, name: str) -> str:
    return f"{LANDING_PREFIX}{arrival:%Y/%m/%d/%H}/{name}"


def landing_error_key(reason: str, arrival: datetime, name: str) -> str:
    return f"{LANDING_ERROR_PREFIX}{reason}/{arrival:%Y/%m/%d}/{name}"


def capture_dead_letter_key(arrival: datetime, event_id: str) -> str:
    return f"{CAPTURE_DEAD_LETTER_PREFIX}{arrival:%Y/%m/%d}/{event_id}.json"


def slug(title: str) -> str:
    """A key-safe name for a category title: ``Comics & Manga`` -> ``comics-manga``."""
    return re.sub(r"[^a-z0-9]+", "-", title.strip().lower()).strip("-") or "unnamed"


def global_feed_key() -> str:
    return FEEDS_PREFIX + "global.json"


def category_feed_key(category: str) -> str:
    return f"{FEEDS_PREFIX}category/{slug(category)}.json"


def run_prefix(run_id: str) -> str:
    return f"{RECOMMENDATIONS_PREFIX}runs/{run_id}/"


def user_document_key(run_id: str, user_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", user_id):
        raise ValueError(f"user id {user_id!r} cannot be part of a key")
    return f"{run_prefix(run_id)}users/{user_id}.json"


def batch_output_key(run_id: str) -> str:
    return run_prefix(run_id) + "batch.jsonl"


def manifest_key(run_id: str) -> str:
    return run_prefix(run_id) + "manifest.json"


def uri(bucket: str, key: str, scheme: str = "s3") -> str:
    """``s3://bucket/key`` (or ``s3a://`` for Spark against an emulator)."""
    return f"{scheme}://{bucket}/{key}"
