"""Load the marketplace's export (``user_interaction.csv``) into Postgres.

The export has one row per (user, category, sub-category, listing title,
listing price) with the user's bid count and bid total. Its quirks are real
and handled here, never by editing the file:

* misspelled headers (``catagory``, ``sub_catagory``) are mapped to names;
* trailing spaces in titles and handles are trimmed, and so is a CR/LF inside
  a quoted field (``"Designer Toys\\r\\n"``); rows that become equal after
  trimming are merged by adding their counts and totals (``rows_merged``);
* a record that repeats an earlier loaded one field for field is rejected: the
  export has one row per user, title and price, so an exact copy is an
  accident (a file appended twice), and adding it would double those bids;
* every field is quoted, and a quoted field may hold a newline, so records are
  read with the ``csv`` module and numbered by the line they start on.

A row that cannot be loaded (no user id, a count or amount that is not a
number, a total too small to split into positive bids) is written to the
rejects file with its line number and reason, and the load goes on.

Each distinct (category, sub-category, title, price) becomes one listing: the
export has no listing ids. Listing ids start above 2**32 so that every stage
is exercised with ids that do not fit in 32 bits.

Loading is safe to repeat. What the database already holds (:func:`read_loaded`)
keeps its id: a category by its title, a sub-category by its category and title,
a listing by its four fields; what is new is numbered after the largest id in
use. A row whose bidder already has bids on its listing is already loaded and
is not loaded again (:func:`split_loaded`), so a second load of the same export
inserts nothing, and a load of a larger one inserts only the rows that are new.

Limitations: a row counts as loaded by its bidder and listing alone, so bids the
marketplace itself placed there make an export's row count as loaded too (its
count and total then disagree, which the caller reports). New bids on a listing
whose auction already closed leave its status as it was.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO, TypeVar

logger = logging.getLogger(__name__)

HEADER_NAMES = {
    "uid": "user_id",
    "username": "user_name",
    "catagory": "category",
    "category": "category",
    "sub_catagory": "sub_category",
    "sub_category": "sub_category",
    "product": "title",
    "listing_amount": "price",
    "counts": "bid_count",
    "total_bid_amount": "bid_total",
}
REQUIRED = (
    "user_id",
    "user_name",
    "category",
    "sub_category",
    "title",
    "price",
    "bid_count",
    "bid_total",
)
#: The export's own column names, for messages.
EXPORT_NAMES = {
    "user_id": "uid",
    "user_name": "userName",
    "category": "catagory",
    "sub_category": "sub_catagory",
    "title": "product",
    "price": "listing_amount",
    "bid_count": "counts",
    "bid_total": "total_bid_amount",
}
FIRST_LISTING_ID = 10_000_000_000
CENT = Decimal("0.01")
#: Catalogue rows per ``executemany``: the unit of the catalogue's progress.
CATALOGUE_CHUNK = 1000


class ExportError(ValueError):
    """The export as a whole cannot be read (not one bad row: those are rejected)."""


@dataclass(frozen=True)
class Interaction:
    """One user's bids on one listing, as the export aggregates them."""

    user_id: str
    user_name: str
    category: str
    sub_category: str
    title: str
    price: Decimal
    bid_count: int
    bid_total: Decimal

    @property
    def listing_key(self) -> tuple[str, str, str, Decimal]:
        return (self.category, self.sub_category, self.title, self.price)


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str
    fields: tuple[str, ...]


@dataclass
class Export:
    source: str
    interactions: list[Interaction] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    rows_read: int = 0
    #: Rows added to an earlier row that equals them after trimming.
    rows_merged: int = 0
    header: tuple[str, ...] = ()

    @property
    def bid_count(self) -> int:
        return sum(row.bid_count for row in self.interactions)


@dataclass(frozen=True)
class Listing:
    id: int
    category: str
    sub_category: str
    title: str
    price: Decimal

    @property
    def key(self) -> tuple[str, str, str, Decimal]:
        return (self.category, self.sub_category, self.title, self.price)


@dataclass
class Loaded:
    """What the database already holds, by the fields the export names things with.

    ``windows`` maps the id of every listing to its auction's (starts_at, ends_at);
    ``bids`` maps (bidder, listing id) to the count and total of the bids placed there.
    """

    categories: dict[str, int] = field(default_factory=dict)
    sub_categories: dict[tuple[str, str], int] = field(default_factory=dict)
    listings: dict[tuple[str, str, str, Decimal], int] = field(default_factory=dict)
    windows: dict[int, tuple[datetime, datetime]] = field(default_factory=dict)
    bids: dict[tuple[str, int], tuple[int, Decimal]] = field(default_factory=dict)
    last_bid_id: int = 0


@dataclass(frozen=True)
class AlreadyLoaded:
    """An export row whose bidder already has bids on its listing: the count and total
    of those bids."""

    row: Interaction
    bid_count: int
    bid_total: Decimal

    @property
    def agrees(self) -> bool:
        """The bids in the database are the row's own: the same count and total."""
        return (self.bid_count, self.bid_total) == (self.row.bid_count, self.row.bid_total)


def read_export(path: Path | str, on_progress: Callable[[int], None] | None = None) -> Export:
    """Read the export at ``path``; ``on_progress`` gets the lines read, record by record."""
    with open(path, newline="", encoding="utf-8") as handle:
        return parse_export(handle, source=str(path), on_progress=on_progress)


def count_lines(path: Path | str) -> int:
    """Lines in the file, as :func:`read_export` reports them: the size of its progress."""
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def parse_export(
    handle: TextIO, source: str = "<export>", on_progress: Callable[[int], None] | None = None
) -> Export:
    export = Export(source=source)
    merged: dict[tuple[str, str, str, str, Decimal], Interaction] = {}
    #: The line of each record loaded, by its fields as written.
    loaded_at: dict[tuple[str, ...], int] = {}
    records = _numbered_records(handle, on_progress)

    try:
        header_line, header = next(records)
    except StopIteration as exc:
        raise ExportError(f"{source} is empty") from exc
    columns = [HEADER_NAMES.get(name.strip().lower(), name.strip().lower()) for name in header]
    missing = [name for name in REQUIRED if name not in columns]
    if missing:
        expected = ", ".join(EXPORT_NAMES[name] for name in missing)
        raise ExportError(
            f"{source} line {header_line}: the header lacks {expected} "
            f"(the export's header is {', '.join(EXPORT_NAMES.values())})"
        )
    export.header = tuple(name.strip() for name in header)
    # Reasons name the file's own columns, not this module's.
    in_file = {
        internal: original.strip() for internal, original in zip(columns, header, strict=True)
    }
    renamed = re.compile(r"\b(" + "|".join(REQUIRED) + r")\b")

    for line, fields in records:
        export.rows_read += 1
        try:
            row = _interaction(dict(zip(columns, fields, strict=False)), len(fields), len(columns))
            first = loaded_at.setdefault(tuple(fields), line)
            if first != line:
                raise ValueError(
                    f"repeats line {first} field for field (the export has one row per user, "
                    "title and price)"
                )
        except ValueError as exc:
            reason = renamed.sub(
                lambda match: in_file.get(match.group(1), match.group(1)), str(exc)
            )
            export.rejected.append(Rejected(line, reason, tuple(fields)))
            logger.warning("%s line %d rejected: %s", source, line, reason)
            continue
        key = (row.user_id, *row.listing_key)
        earlier = merged.get(key)
        if earlier is not None:
            export.rows_merged += 1
            row = Interaction(
                **{
                    **earlier.__dict__,
                    "bid_count": earlier.bid_count + row.bid_count,
                    "bid_total": earlier.bid_total + row.bid_total,
                }
            )
        merged[key] = row

    export.interactions = list(merged.values())
    logger.info(
        "%s: %d rows read, %d interactions, %d bids, %d rejected",
        source,
        export.rows_read,
        len(export.interactions),
        export.bid_count,
        len(export.rejected),
    )
    return export


def _numbered_records(
    handle: TextIO, on_progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line the record starts on, fields), skipping blank lines."""
    reader = csv.reader(handle)
    line_after = 0
    for fields in reader:
        start, line_after = line_after + 1, reader.line_num
        if on_progress:
            on_progress(line_after - start + 1)
        if fields and any(value.strip() for value in fields):
            yield start, fields


def _clean(text: str) -> str:
    return " ".join(text.split()) if "\n" in text or "\r" in text else text.strip()


def _interaction(raw: dict[str, str], width: int, expected: int) -> Interaction:
    if width != expected:
        raise ValueError(f"has {width} fields, expected {expected}")
    values = {name: _clean(raw.get(name, "")) for name in REQUIRED}
    for name in ("user_id", "category", "sub_category", "title"):
        if not values[name]:
            raise ValueError(f"{name} is empty")

    price = _decimal(values["price"], "price")
    if price < 0:
        raise ValueError(f"price {values['price']!r} is negative")
    # The database keeps cents: a finer price would be rounded there and then no
    # longer name the same listing when the export is loaded again.
    if price != price.quantize(CENT):
        raise ValueError(f"price {price} has fractions of a cent")
    total = _decimal(values["bid_total"], "bid_total")
    try:
        count = int(values["bid_count"])
    except ValueError as exc:
        raise ValueError(f"bid_count {values['bid_count']!r} is not a whole number") from exc
    if count < 1:
        raise ValueError(f"bid_count {count} is not positive")
    if total < CENT * count:
        raise ValueError(f"bid_total {total} cannot be split into {count} positive bids")
    if total != total.quantize(CENT):
        raise ValueError(f"bid_total {total} has fractions of a cent")

    return Interaction(
        user_id=values["user_id"],
        user_name=values["user_name"] or values["user_id"],
        category=values["category"],
        sub_category=values["sub_category"],
        title=values["title"],
        price=price,
        bid_count=count,
        bid_total=total,
    )


def _decimal(text: str, name: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"{name} {text!r} is not a number") from exc
    if not value.is_finite():
        raise ValueError(f"{name} {text!r} is not finite")
    return value


def read_loaded(conn: Any) -> Loaded:
    """Read the categories, sub-categories, listings and bids already in the database."""
    loaded = Loaded()
    with conn, conn.cursor() as cursor:
        cursor.execute("SELECT id, title FROM categories")
        loaded.categories = {title: number for number, title in cursor.fetchall()}
        cursor.execute(
            "SELECT s.id, c.title, s.title FROM sub_categories s"
            " JOIN categories c ON c.id = s.category_id"
        )
        loaded.sub_categories = {(category, title): number for number, category, title in cursor}
        # The marketplace may list the same item twice: its first listing stands for both.
        cursor.execute(
            "SELECT l.id, c.title, s.title, l.title, l.price, l.starts_at, l.ends_at"
            " FROM listings l JOIN categories c ON c.id = l.category_id"
            " JOIN sub_categories s ON s.id = l.sub_category_id ORDER BY l.id DESC"
        )
        for number, category, sub_category, title, price, starts_at, ends_at in cursor:
            loaded.listings[(category, sub_category, title, price)] = number
            loaded.windows[number] = (starts_at, ends_at)
        cursor.execute(
            "SELECT bidder_id, listing_id, count(*), sum(amount) FROM bids"
            " GROUP BY bidder_id, listing_id"
        )
        loaded.bids = {
            (bidder, listing): (count, total) for bidder, listing, count, total in cursor
        }
        cursor.execute("SELECT coalesce(max(id), 0) FROM bids")
        loaded.last_bid_id = cursor.fetchone()[0]
    return loaded


Key = TypeVar("Key", bound=Hashable)


def _numbered(keys: Sequence[Key], known: dict[Key, int], largest: int) -> dict[Key, int]:
    """An id for each of ``keys``: the one ``known`` gives it, else the next one after
    ``largest``, in the order of ``keys``."""
    ids: dict[Key, int] = {}
    for key in keys:
        if key not in known:
            largest += 1
        ids[key] = known.get(key, largest)
    return ids


def plan_listings(interactions: list[Interaction], loaded: Loaded | None = None) -> list[Listing]:
    """One listing per distinct (category, sub-category, title, price), in sorted order:
    with the id ``loaded`` has for it, else a new one."""
    loaded = loaded or Loaded()
    keys = sorted({row.listing_key for row in interactions})
    ids = _numbered(keys, loaded.listings, max([FIRST_LISTING_ID - 1, *loaded.windows]))
    return [Listing(ids[key], *key) for key in keys]


def split_loaded(
    interactions: list[Interaction], listings: list[Listing], loaded: Loaded
) -> tuple[list[Interaction], list[AlreadyLoaded]]:
    """The rows still to load, and those whose bidder already has bids on their listing."""
    listing_ids = {listing.key: listing.id for listing in listings}
    new: list[Interaction] = []
    already: list[AlreadyLoaded] = []
    for row in interactions:
        found = loaded.bids.get((row.user_id, listing_ids[row.listing_key]))
        if found is None:
            new.append(row)
        else:
            already.append(AlreadyLoaded(row, *found))
    return new, already


def write_rejects(export: Export, path: Path) -> None:
    """Write rejected rows as CSV: source, line, reason, then the row's fields under the
    export's own header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "line", "reason", *export.header])
        for reject in export.rejected:
            writer.writerow([export.source, reject.line, reject.reason, *reject.fields])


def catalogue_rows(
    export: Export,
    listings: list[Listing],
    windows: dict[int, Any],
    loaded: Loaded | None = None,
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows to insert per table, parents first: users, categories, sub-categories
    and listings, leaving out those ``loaded`` already has. ``windows`` maps the id of
    each new listing to its (starts_at, ends_at)."""
    loaded = loaded or Loaded()
    users = sorted({(row.user_id, row.user_name) for row in export.interactions})
    categories = sorted({row.category for row in export.interactions})
    category_ids = _numbered(
        categories, loaded.categories, max(loaded.categories.values(), default=0)
    )
    sub_categories = sorted({(row.category, row.sub_category) for row in export.interactions})
    sub_category_ids = _numbered(
        sub_categories, loaded.sub_categories, max(loaded.sub_categories.values(), default=0)
    )
    return {
        "users": users,
        "categories": [
            (number, title)
            for title, number in category_ids.items()
            if title not in loaded.categories
        ],
        "sub_categories": [
            (number, category_ids[category], title)
            for (category, title), number in sub_category_ids.items()
            if (category, title) not in loaded.sub_categories
        ],
        "listings": [
            (
                listing.id,
                listing.title,
                category_ids[listing.category],
                sub_category_ids[(listing.category, listing.sub_category)],
                listing.price,
                *windows[listing.id],
            )
            for listing in listings
            if listing.key not in loaded.listings
        ],
    }


_CATALOGUE_INSERTS = {
    "users": "INSERT INTO users (id, user_name) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
    "categories": "INSERT INTO categories (id, title) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
    "sub_categories": "INSERT INTO sub_categories (id, category_id, title) VALUES (%s, %s, %s)"
    " ON CONFLICT (id) DO NOTHING",
    "listings": "INSERT INTO listings (id, title, category_id, sub_category_id, price, starts_at,"
    " ends_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
}


def insert_catalogue(
    conn: Any,
    rows: dict[str, list[tuple[Any, ...]]],
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Insert :func:`catalogue_rows` in one transaction; existing rows are kept.

    ``on_progress`` gets the rows sent, chunk by chunk.
    """
    with conn, conn.cursor() as cursor:
        for table, values in rows.items():
            for start in range(0, len(values), CATALOGUE_CHUNK):
                chunk = values[start : start + CATALOGUE_CHUNK]
                cursor.executemany(_CATALOGUE_INSERTS[table], chunk)
                if on_progress:
                    on_progress(len(chunk))
