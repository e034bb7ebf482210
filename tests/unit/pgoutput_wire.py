"""pgoutput (protocol 1) messages built byte by byte, as Postgres sends them, for the tests."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from lambdas.capture.pgoutput import UNCHANGED


def relation(oid: int, table: str, columns: Sequence[tuple[str, int]]) -> bytes:
    """A Relation message: table ``public.<table>``, replica identity full, columns with
    their type oids."""
    body = b"".join(
        b"\1" + name.encode() + b"\0" + struct.pack("!ii", type_oid, -1)
        for name, type_oid in columns
    )
    header = struct.pack("!I", oid) + b"public\0" + table.encode() + b"\0f"
    return b"R" + header + struct.pack("!h", len(columns)) + body


def tuple_data(*values: object) -> bytes:
    """TupleData: None is NULL, ``UNCHANGED`` an unchanged TOASTed value, the rest text."""
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        else:
            text = value if isinstance(value, bytes) else str(value).encode()
            out += b"t" + struct.pack("!i", len(text)) + text
    return out


def begin(final_lsn: int, xid: int = 9) -> bytes:
    """A Begin message; the commit time is the Postgres epoch."""
    return b"B" + struct.pack("!qqi", final_lsn, 0, xid)


def commit(commit_lsn: int, end_lsn: int) -> bytes:
    """A Commit message; the commit time is the Postgres epoch."""
    return b"C" + struct.pack("!bqqq", 0, commit_lsn, end_lsn, 0)
