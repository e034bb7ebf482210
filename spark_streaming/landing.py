"""Read landed change events as a stream and split them into valid events and rejects.

Firehose lands one contract event per CSV line (see :mod:`encore.events`) under
``landing/YYYY/MM/DD/HH/``. The files have no header, and a quoted field may hold
commas, doubled quotes and newlines, so the reader needs ``multiLine`` and an
RFC 4180 quote escape (Spark's default escape is a backslash, which would break a
title such as ``12\\" vinyl``).

Every column is read as a string and checked here, rather than letting the CSV
reader cast to the contract's types: a row whose timestamp or amount does not
parse then gets a reason that names the column, instead of a silent NULL. Rows
with the wrong number of fields come back from the reader with the raw text in a
corrupt-record column. Valid rows are cast to the types of
:func:`encore.events.spark_ddl`.

Limitations: an unbalanced quote makes the CSV reader take everything up to the
next quote (often the rest of the file) as one field. That text is quarantined
as one malformed row, so nothing vanishes, but the events inside it are not
counted until the file is fixed and landed again under a new name.
"""

from __future__ import annotations

import re

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DataType,
    DecimalType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from encore import events

#: The CSV reader puts the raw text of a row with the wrong field count here.
CORRUPT_COLUMN = "_corrupt_record"
SOURCE_COLUMN = "source_file"
REASON_COLUMN = "reason"
RECORD_COLUMN = "record"

#: Landed files per micro-batch; a backlog is worked off in several batches.
MAX_FILES_PER_TRIGGER = 1000

RAW_SCHEMA = StructType(
    [StructField(name, StringType()) for name in events.COLUMNS]
    + [StructField(CORRUPT_COLUMN, StringType())]
)

_REQUIRED = ("event_id", "event_type", "op", "commit_lsn", "commit_time", "table_key")
_LSN = r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$"
_TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$"
# At most 16 integer and 2 fractional digits: the value fits DECIMAL(18,2) unrounded.
_DECIMAL = r"^-?\d{1,16}(\.\d{1,2})?$"


def read_landing_stream(spark: SparkSession, landing_uri: str) -> DataFrame:
    """A streaming DataFrame of landed rows: every contract column as a string.

    Besides the contract columns it carries the corrupt-record column and
    ``source_file``, the landed object each row came from.
    """
    raw = (
        spark.readStream.format("csv")
        .schema(RAW_SCHEMA)
        .option("header", "false")
        .option("multiLine", "true")
        .option("recursiveFileLookup", "true")
        .option("escape", '"')
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT_COLUMN)
        .option("maxFilesPerTrigger", MAX_FILES_PER_TRIGGER)
        .load(landing_uri)
    )
    return raw.withColumn(SOURCE_COLUMN, F.input_file_name())


def validate(raw: DataFrame) -> DataFrame:
    """Check every row against the contract.

    Returns the contract columns, cast to their types, plus ``source_file``,
    ``reason`` (NULL for a valid event, else why the row was rejected) and
    ``record`` (the row as the reader saw it, for the quarantine).
    """
    blanked = raw.select(
        *[_blank_to_null(name) for name in events.COLUMNS], CORRUPT_COLUMN, SOURCE_COLUMN
    )
    return blanked.select(
        *[_typed(name) for name in events.COLUMNS],
        SOURCE_COLUMN,
        rejection_reason().alias(REASON_COLUMN),
        F.coalesce(
            F.col(CORRUPT_COLUMN), F.to_json(F.struct(*[F.col(n) for n in events.COLUMNS]))
        ).alias(RECORD_COLUMN),
    )


def rejection_reason() -> Column:
    """The first broken rule of a row (over string columns), or NULL if it has none."""
    checks: list[tuple[Column, str]] = [
        (
            F.col(CORRUPT_COLUMN).isNotNull(),
            f"malformed csv record: expected {len(events.COLUMNS)} fields",
        ),
        (
            F.col("schema_version") != F.lit(events.SCHEMA_VERSION),
            f"schema_version is not {events.SCHEMA_VERSION}",
        ),
        *[(F.col(name).isNull(), f"{name} is missing") for name in _REQUIRED],
        (~F.col("event_type").isin(*events.EVENT_TYPES), "event_type is unknown"),
        (~F.col("op").isin(*events.OPERATIONS), "op is unknown"),
        (~F.col("commit_lsn").rlike(_LSN), "commit_lsn is not an LSN"),
        (
            F.col("status").isNotNull() & ~F.col("status").isin(*events.LISTING_STATUSES),
            "status is unknown",
        ),
        *[(_bad_time(name), f"{name} is not an ISO-8601 UTC time") for name in events.TIME_COLUMNS],
        *[
            (_bad_decimal(name), f"{name} is not a decimal(18,2)")
            for name in events.DECIMAL_COLUMNS
        ],
        (F.col("listing_id").isNull() & _names_a_listing(), "listing_id is missing"),
        ((F.col("event_type") == "bid") & F.col("bid_id").isNull(), "bid_id is missing"),
        (_is_bid_change() & F.col("amount").isNull(), "amount is missing"),
        (_is_bid_change() & F.col("placed_at").isNull(), "placed_at is missing"),
    ]
    # when() without otherwise() is NULL, so coalesce picks the first failed check.
    return F.coalesce(*[F.when(failed, F.lit(reason)) for failed, reason in checks])


def contract_type(name: str) -> DataType:
    """The Spark type of a contract column, as :data:`encore.events.SPARK_TYPES` names it."""
    spark_type = events.SPARK_TYPES[name]
    if spark_type == "STRING":
        return StringType()
    if spark_type == "TIMESTAMP":
        return TimestampType()
    match = re.fullmatch(r"DECIMAL\((\d+),(\d+)\)", spark_type)
    if match is None:
        raise ValueError(f"no Spark type for {name} {spark_type!r}")
    return DecimalType(int(match[1]), int(match[2]))


def _blank_to_null(name: str) -> Column:
    # Spark reads an unquoted empty field as NULL but a quoted one as ""; the contract
    # says both are NULL.
    return F.when(F.col(name) == "", None).otherwise(F.col(name)).alias(name)


def _typed(name: str) -> Column:
    spark_type = events.SPARK_TYPES[name]
    if spark_type == "STRING":
        return F.col(name)
    return F.expr(f"try_cast({name} AS {spark_type})").alias(name)


def _bad_time(name: str) -> Column:
    value = F.col(name)
    parsed = F.expr(f"try_cast({name} AS TIMESTAMP)")
    return value.isNotNull() & (~value.rlike(_TIME) | parsed.isNull())


def _bad_decimal(name: str) -> Column:
    return F.col(name).isNotNull() & ~F.col(name).rlike(_DECIMAL)


def _is_bid_change() -> Column:
    """An insert or update of a bid: the rows that must carry the bid's values."""
    return (F.col("event_type") == "bid") & (F.col("op") != "delete")


def _names_a_listing() -> Column:
    """Every event but a bid delete, which may carry only the bid's key."""
    return (F.col("event_type") == "listing") | _is_bid_change()
