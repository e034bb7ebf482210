from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from producers.loader import (
    FIRST_LISTING_ID,
    ExportError,
    Loaded,
    catalogue_rows,
    count_lines,
    parse_export,
    plan_listings,
    read_export,
    split_loaded,
)

HEADER = (
    '"uid","userName","catagory","sub_catagory","product","listing_amount","counts",'
    '"total_bid_amount"\n'
)


def parse(body: str):
    return parse_export(io.StringIO(HEADER + body), source="test.csv")


def test_loader_maps_misspelled_headers_and_trims_trailing_spaces() -> None:
    export = parse('"u1","collector_001 ","Toys","Funko","Bakugo Print ","1","2","30"\n')

    (row,) = export.interactions
    assert (row.user_name, row.category, row.sub_category, row.title) == (
        "collector_001",
        "Toys",
        "Funko",
        "Bakugo Print",
    )
    assert (row.price, row.bid_count, row.bid_total) == (Decimal(1), 2, Decimal(30))


def test_loader_reads_a_newline_inside_a_quoted_field_and_numbers_lines_by_record_start() -> None:
    export = parse(
        '"u1","a","Toys","Designer Toys\r\n","T1","1","1","5"\n'
        '"","b","Toys","Funko","T2","1","1","5"\n'
    )

    assert export.interactions[0].sub_category == "Designer Toys"
    (reject,) = export.rejected
    assert reject.line == 4  # header is line 1; the first record spans lines 2 and 3
    assert reject.reason == "uid is empty"  # named as in the file


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ('"u1","a","Toys","Funko","T","1","2","ten"', "total_bid_amount 'ten' is not a number"),
        ('"u1","a","Toys","Funko","T","1","two","10"', "counts 'two' is not a whole number"),
        ('"u1","a","Toys","Funko","T","1","3","0.02"', "cannot be split into 3 positive bids"),
        ('"u1","a","Toys","Funko","T","NaN","1","5"', "listing_amount 'NaN' is not finite"),
        ('"u1","a","Toys","Funko","T","1.005","1","5"', "listing_amount 1.005 has fractions"),
        ('"u1","a","Toys","Funko","T","1","1"', "has 7 fields, expected 8"),
    ],
)
def test_loader_rejects_a_bad_row_with_its_reason_and_keeps_the_rest(
    fields: str, reason: str
) -> None:
    export = parse(fields + "\n" + '"u2","b","Toys","Funko","T","1","1","5"\n')

    assert [row.user_id for row in export.interactions] == ["u2"]
    (reject,) = export.rejected
    assert reject.line == 2
    assert reason in reject.reason


def test_loader_merges_rows_that_are_equal_after_trimming() -> None:
    export = parse(
        '"u1","a","Toys","Funko","Print ","1","1","5"\n'
        '"u1","a","Toys","Funko","Print","1","2","7"\n'
    )

    (row,) = export.interactions
    assert (row.bid_count, row.bid_total) == (3, Decimal(12))
    assert export.rows_merged == 1


def test_loader_rejects_a_row_that_repeats_an_earlier_one_exactly() -> None:
    export = parse(
        '"u1","a","Toys","Funko","Print","1","1","5"\n'
        '"u2","b","Toys","Funko","Print","1","1","3"\n'
        '"u1","a","Toys","Funko","Print","1","1","5"\n'
    )

    assert [(row.user_id, row.bid_count) for row in export.interactions] == [("u1", 1), ("u2", 1)]
    (rejected,) = export.rejected
    assert rejected.line == 4
    assert rejected.reason.startswith("repeats line 2 field for field")
    assert export.rows_merged == 0


def test_loader_refuses_an_export_without_the_expected_header() -> None:
    with pytest.raises(ExportError, match="header lacks uid, userName"):
        parse_export(io.StringIO('"a","b"\n"1","2"\n'), source="bad.csv")


def test_loader_reads_the_real_export_exactly(shared_data) -> None:
    export = read_export(shared_data / "encore" / "user_interaction.csv")

    assert export.rows_read == 3373
    assert export.rejected == []
    assert export.bid_count == 7948
    assert sum(row.bid_total for row in export.interactions) == Decimal(431818)
    assert len({row.user_id for row in export.interactions}) == 316
    assert {row.sub_category for row in export.interactions} >= {"Designer Toys"}
    listings = plan_listings(export.interactions)
    assert all(listing.id > 2**32 for listing in listings)
    assert len({listing.id for listing in listings}) == len(listings)


def test_loader_progress_reaches_the_line_count_of_the_real_export(shared_data) -> None:
    path = shared_data / "encore" / "user_interaction.csv"
    steps: list[int] = []

    export = read_export(path, on_progress=steps.append)

    # Quoted newlines make 3,373 records and a header span 3,378 lines.
    assert sum(steps) == count_lines(path) == 3378
    assert len(steps) == export.rows_read + 1


@pytest.mark.parametrize(
    ("body", "lines"),
    [
        ('"u1","a","Toys","Designer Toys\r\n","T1","1","1","5"\n\n', 4),
        ('"u1","a","Toys","Funko","T1","1","1","5"', 2),
    ],
    ids=["quoted-newline-and-blank-line", "no-final-newline"],
)
def test_loader_progress_counts_every_line_once(tmp_path, body: str, lines: int) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes((HEADER + body).encode())
    steps: list[int] = []

    read_export(path, on_progress=steps.append)

    assert sum(steps) == count_lines(path) == lines


WINDOW = (datetime(2026, 11, 28, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC))


def loaded_earlier() -> Loaded:
    """A database holding one earlier load: u1's two bids on Toys/Funko/Print at 1.00."""
    return Loaded(
        categories={"Toys": 1},
        sub_categories={("Toys", "Funko"): 1},
        listings={("Toys", "Funko", "Print", Decimal("1.00")): FIRST_LISTING_ID},
        windows={FIRST_LISTING_ID: WINDOW},
        bids={("u1", FIRST_LISTING_ID): (2, Decimal("30.00"))},
        last_bid_id=2,
    )


def test_loading_again_keeps_the_ids_in_the_database_and_numbers_new_things_after_them() -> None:
    export = parse(
        '"u1","a","Toys","Funko","Print","1","2","30"\n'
        '"u2","b","Books","Comics","Annual","4","1","4"\n'
        '"u2","b","Toys","Funko","Print","1","1","2"\n'
    )
    loaded = loaded_earlier()

    listings = plan_listings(export.interactions, loaded)
    rows = catalogue_rows(export, listings, {FIRST_LISTING_ID + 1: WINDOW}, loaded)

    assert [(listing.id, listing.title) for listing in listings] == [
        (FIRST_LISTING_ID + 1, "Annual"),
        (FIRST_LISTING_ID, "Print"),
    ]
    assert rows["categories"] == [(2, "Books")]
    assert rows["sub_categories"] == [(2, 2, "Comics")]
    assert [row[:3] for row in rows["listings"]] == [(FIRST_LISTING_ID + 1, "Annual", 2)]


@pytest.mark.parametrize(
    ("row", "agrees"),
    [
        ('"u1","a","Toys","Funko","Print","1","2","30"', True),
        ('"u1","a","Toys","Funko","Print","1","3","40"', False),
    ],
    ids=["same-bids", "other-bids"],
)
def test_a_row_whose_bidder_has_bids_on_its_listing_is_not_loaded_again(
    row: str, agrees: bool
) -> None:
    export = parse(row + "\n" + '"u2","b","Toys","Funko","Print","1","1","2"\n')
    loaded = loaded_earlier()

    new, already = split_loaded(
        export.interactions, plan_listings(export.interactions, loaded), loaded
    )

    assert [row.user_id for row in new] == ["u2"]
    (skipped,) = already
    assert (skipped.row.user_id, skipped.bid_count, skipped.bid_total) == ("u1", 2, Decimal(30))
    assert skipped.agrees is agrees
