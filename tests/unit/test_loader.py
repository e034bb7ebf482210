from __future__ import annotations

import io
from decimal import Decimal

import pytest

from producers.loader import (
    ExportError,
    count_lines,
    parse_export,
    plan_listings,
    read_export,
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
