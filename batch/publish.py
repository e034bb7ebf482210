"""Publish one night's recommendations without disturbing readers of the last one.

Everything a run writes lives under ``recommendations/runs/<run_id>/``
(:mod:`encore.layout`): one JSON document per user, the whole night as JSON
Lines in the shape of an Amazon Personalize batch-inference output, and a
manifest. Only when all of them are written is the pointer
``recommendations/current.json`` replaced, with one PUT, which S3 makes
visible atomically. A reader resolves the pointer first, so it sees either
last night's complete set or tonight's, never a mixture; a run that fails
half-way leaves the pointer, and so every reader, where it was. A rerun
with the same run id overwrites the same keys with the same documents.

Per-user documents are written by the Spark executors, each partition with
its own S3 client built from the settings (region and, locally, endpoint),
so the writing spreads over the cluster like the rest of the job. Each
document is one ``put_object``: a reader never sees half a document. The
user's ``source`` also travels as object metadata (``x-amz-meta-source``), so
the presign Lambda learns it from a ``HEAD`` without reading the document.

Limitations: old runs are never deleted; an S3 lifecycle rule on
``recommendations/runs/`` should expire them. The batch file is assembled on
the driver (about 400 bytes per user, spooled to disk past 64 MiB).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from decimal import Decimal
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from pyspark.errors import PythonException
from pyspark.sql import DataFrame

from encore import layout
from encore.settings import Settings

logger = logging.getLogger(__name__)

DOCUMENT_SCHEMA_VERSION = 1
DOCUMENTS_PER_TASK = 5_000
SPOOL_BYTES = 64 * 1024 * 1024
#: PUTs in flight per task: each waits on the network, not the CPU.
PUT_THREADS = 16
JSON_CONTENT = "application/json"


class PublishError(RuntimeError):
    """A run's output could not be written; the pointer was not switched."""


def bucket_of(base_uri: str) -> str:
    """``s3a://bucket`` or ``s3://bucket`` -> ``bucket``."""
    parts = urlsplit(base_uri)
    if parts.scheme not in {"s3", "s3a", "s3n"} or not parts.netloc:
        raise ValueError(f"base uri {base_uri!r} is not s3://bucket or s3a://bucket")
    return parts.netloc


def s3_client(settings: Settings) -> Any:
    import boto3

    return boto3.client("s3", **settings.boto3_kwargs())


def user_document(row: Any, run_id: str, generated_at: str) -> dict[str, Any]:
    """The JSON document of one user, from a row of ``user_id``, ``source``, ``items``."""
    return {
        "schema_version": DOCUMENT_SCHEMA_VERSION,
        "user_id": row["user_id"],
        "run_id": run_id,
        "generated_at": generated_at,
        "source": row["source"],
        "items": [
            {
                "listing_id": str(item["listing_id"]),
                "title": item["title"],
                "category": item["category"],
                "sub_category": item["sub_category"],
                "price": _decimal_text(item["price"]),
                "score": float(item["score"]),
            }
            for item in row["items"]
        ],
    }


def _decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def write_user_documents(
    documents: DataFrame, settings: Settings, bucket: str, run_id: str, generated_at: str
) -> dict[str, int]:
    """Write every user's document from the executors; return written and skipped counts.

    A user id that cannot be part of a key (see ``layout.user_document_key``)
    is skipped and counted, never written under another name.
    """
    users = documents.count()
    partitions = max(
        documents.sparkSession.sparkContext.defaultParallelism,
        -(-users // DOCUMENTS_PER_TASK),
    )
    writes = documents.repartition(partitions, "user_id").rdd.mapPartitions(
        partial(_put_documents, settings, bucket, run_id, generated_at)
    )
    try:
        results = writes.collect()
    except PythonException as exc:
        raise PublishError(
            f"writing user documents under s3://{bucket}/{layout.run_prefix(run_id)} failed: "
            f"{str(exc).strip().splitlines()[-1]}"
        ) from exc
    counts = {"written": sum(r[0] for r in results), "skipped": sum(r[1] for r in results)}
    if counts["skipped"]:
        logger.warning(
            "%d users have ids that cannot be keys; no document written", counts["skipped"]
        )
    logger.info(
        "wrote %d user documents under s3://%s/%s",
        counts["written"],
        bucket,
        layout.run_prefix(run_id),
    )
    return counts


def _put_documents(
    settings: Settings, bucket: str, run_id: str, generated_at: str, rows: Iterable[Any]
) -> Iterator[tuple[int, int]]:
    """PUT one task's documents, ``PUT_THREADS`` at a time; yield (written, skipped).

    At most twice ``PUT_THREADS`` documents are held at once. The first
    failed PUT fails the task (Spark retries it; a PUT is idempotent).
    """
    client = s3_client(settings)
    written = skipped = 0

    def put(key: str, body: bytes, source: str) -> None:
        client.put_object(
            Bucket=bucket, Key=key, Body=body, ContentType=JSON_CONTENT, Metadata={"source": source}
        )

    pending: set[Future[None]] = set()
    with ThreadPoolExecutor(PUT_THREADS) as pool:
        for row in rows:
            try:
                key = layout.user_document_key(run_id, row["user_id"])
            except ValueError as exc:
                logger.warning("user document skipped: %s", exc)
                skipped += 1
                continue
            body = json.dumps(user_document(row, run_id, generated_at)).encode()
            pending.add(pool.submit(put, key, body, row["source"]))
            if len(pending) >= 2 * PUT_THREADS:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                written += _settled(done)
        written += _settled(wait(pending).done)
    yield written, skipped


def _settled(done: set[Future[None]]) -> int:
    """How many of ``done`` succeeded; raises the first failure."""
    for future in done:
        future.result()
    return len(done)


def batch_line(row: Any) -> dict[str, Any]:
    """One user in the Personalize batch-inference output shape."""
    return {
        "input": {"userId": row["user_id"]},
        "output": {
            "recommendedItems": [str(item["listing_id"]) for item in row["items"]],
            "scores": [float(item["score"]) for item in row["items"]],
        },
    }


def write_batch_output(s3: Any, documents: DataFrame, bucket: str, run_id: str) -> int:
    """Write every user as one JSON line, in user id order; return the number of lines."""
    key = layout.batch_output_key(run_id)
    lines = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        for row in documents.orderBy("user_id").toLocalIterator():
            spool.write(json.dumps(batch_line(row)).encode() + b"\n")
            lines += 1
        spool.seek(0)
        try:
            s3.upload_fileobj(spool, bucket, key, ExtraArgs={"ContentType": "application/x-ndjson"})
        except (BotoCoreError, ClientError) as exc:
            raise PublishError(f"cannot write s3://{bucket}/{key}: {exc}") from exc
    logger.info("wrote %d lines to s3://%s/%s", lines, bucket, key)
    return lines


def put_json(s3: Any, bucket: str, key: str, document: dict[str, Any]) -> None:
    body = json.dumps(document, indent=2, default=str).encode()
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=JSON_CONTENT)
    except (BotoCoreError, ClientError) as exc:
        raise PublishError(f"cannot write s3://{bucket}/{key}: {exc}") from exc


def switch_pointer(s3: Any, bucket: str, run_id: str, published_at: str) -> dict[str, str]:
    """Point readers at ``run_id``: the last write of a run, one atomic PUT."""
    pointer = {
        "run_id": run_id,
        "manifest": layout.manifest_key(run_id),
        "published_at": published_at,
    }
    put_json(s3, bucket, layout.RECOMMENDATIONS_POINTER, pointer)
    logger.info("s3://%s/%s now points at run %s", bucket, layout.RECOMMENDATIONS_POINTER, run_id)
    return pointer


def read_pointer(s3: Any, bucket: str) -> dict[str, Any] | None:
    """The pointer's contents, or None when no run was ever published."""
    try:
        response = s3.get_object(Bucket=bucket, Key=layout.RECOMMENDATIONS_POINTER)
    except s3.exceptions.NoSuchKey:
        return None
    pointer: dict[str, Any] = json.loads(response["Body"].read())
    return pointer


def read_manifest(s3: Any, bucket: str) -> dict[str, Any] | None:
    """The manifest of the run the pointer names, or None when no run was ever published."""
    pointer = read_pointer(s3, bucket)
    if pointer is None:
        return None
    response = s3.get_object(Bucket=bucket, Key=layout.manifest_key(pointer["run_id"]))
    manifest: dict[str, Any] = json.loads(response["Body"].read())
    return manifest
