"""Decode the messages of Postgres's ``pgoutput`` logical decoding plugin (protocol 1).

``pgoutput`` is the plugin built into Postgres 10 and later, and the one RDS
and Aurora offer alongside ``test_decoding``; unlike ``test_decoding`` (a
sample plugin whose text output must be re-parsed) it sends length-prefixed
values, marks unchanged TOASTed columns explicitly, and is limited to the
tables of a publication, so busy tables outside it cost the capture nothing.

Message layouts follow "Logical Replication Message Formats" in the Postgres
documentation. Column values arrive in their text form; a row's values are
kept in the order of its relation's columns, as the message sends them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

#: A column whose TOASTed value did not change and was not sent.
UNCHANGED = object()

#: Values of one row in the order of ``Relation.columns``: text, None or ``UNCHANGED``.
Values = list[object]


class DecodingError(ValueError):
    """A pgoutput message could not be decoded; names the message and offset."""


@dataclass(frozen=True)
class Column:
    name: str
    type_oid: int
    is_key: bool


@dataclass
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: list[Column] = field(default_factory=list)


@dataclass(frozen=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(slots=True)
class Change:
    """An insert, update or delete of one row.

    ``old`` is the key (or, with ``REPLICA IDENTITY FULL``, the whole row)
    before an update or delete, when Postgres logged it.
    """

    op: str
    relation: Relation
    new: Values | None
    old: Values | None


Message = Begin | Commit | Relation | Change | None

_OPS = {0x49: "insert", 0x55: "update", 0x44: "delete"}  # 'I', 'U', 'D'
_INT16 = struct.Struct("!h")
_OID = struct.Struct("!I")
_LENGTH = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!bQQq")  # flags, commit LSN, end LSN, commit time
_COLUMN_TAIL = struct.Struct("!Ii")  # type oid, type modifier


class Decoder:
    """Decodes a sequence of pgoutput messages; remembers relations between them."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> Message:
        """One message. Row changes, by far the most frequent, are decoded first."""
        kind = data[0] if data else 0
        try:
            op = _OPS.get(kind)
            if op is not None:
                return self._change(op, data)
            if kind == 0x42:  # 'B'
                final_lsn, micros, xid = _BEGIN.unpack_from(data, 1)
                return Begin(final_lsn, _timestamp(micros), xid)
            if kind == 0x43:  # 'C'
                _, commit_lsn, end_lsn, micros = _COMMIT.unpack_from(data, 1)
                return Commit(commit_lsn, end_lsn, _timestamp(micros))
            if kind == 0x52:  # 'R'
                return self._relation(data)
            if kind in (0x59, 0x4F, 0x4D):  # 'Y', 'O', 'M'
                return None  # type, origin and generic messages carry no row changes
            if kind == 0x54:  # 'T'
                raise DecodingError("TRUNCATE of a captured table cannot be sent as row changes")
        except DecodingError:
            raise
        except (struct.error, IndexError, ValueError) as exc:  # ValueError: bad UTF-8, no NUL
            raise DecodingError(f"message {chr(kind)!r} is malformed: {exc}") from exc
        raise DecodingError(f"unknown message type {chr(kind)!r}")

    def _relation(self, data: bytes) -> Relation:
        (oid,) = _OID.unpack_from(data, 1)
        namespace, offset = _string(data, 5)
        name, offset = _string(data, offset)
        relation = Relation(oid, namespace, name, chr(data[offset]))
        (count,) = _INT16.unpack_from(data, offset + 1)
        offset += 3
        for _ in range(count):
            flags = data[offset]
            column, offset = _string(data, offset + 1)
            type_oid, _ = _COLUMN_TAIL.unpack_from(data, offset)
            offset += 8
            relation.columns.append(Column(column, type_oid, bool(flags & 1)))
        self.relations[oid] = relation
        return relation

    def _change(self, op: str, data: bytes) -> Change:
        (oid,) = _OID.unpack_from(data, 1)
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodingError(f"change for relation {oid} before its Relation message")
        old = new = None
        marker = data[5]
        offset = 6
        if marker == 0x4B or marker == 0x4F:  # 'K' key, 'O' old row
            old, offset = _tuple(relation, data, offset)
            marker = data[offset] if op == "update" else 0
            offset += 1
        if marker == 0x4E:  # 'N' new row
            new, offset = _tuple(relation, data, offset)
        return Change(op, relation, new, old)


def _tuple(relation: Relation, data: bytes, offset: int) -> tuple[Values, int]:
    """The values of one TupleData at ``offset``, and the offset after it.

    The hot path of the capture: every value of every captured row passes here,
    so it parses in place with offsets and no call per field beyond the slice.
    A length running past the end surfaces as an IndexError at the next field
    or at the final check.
    """
    count = (data[offset] << 8) | data[offset + 1]
    offset += 2
    columns = relation.columns
    if count != len(columns):
        raise DecodingError(
            f"{relation.name}: tuple has {count} columns, relation has {len(columns)}"
        )
    unpack = _LENGTH.unpack_from
    values: Values = []
    append = values.append
    for position in range(count):
        kind = data[offset]
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            start = offset + 5
            offset = start + unpack(data, offset + 1)[0]
            append(data[start:offset].decode())
        elif kind == 0x6E:  # 'n' null
            append(None)
            offset += 1
        elif kind == 0x75:  # 'u' unchanged TOASTed value, not sent
            append(UNCHANGED)
            offset += 1
        else:
            raise DecodingError(
                f"{relation.name}.{columns[position].name}: unknown value kind {chr(kind)!r}"
            )
    if offset > len(data):
        raise IndexError("message ends early")
    return values, offset


def _string(data: bytes, offset: int) -> tuple[str, int]:
    """A NUL-terminated string at ``offset``, and the offset after its NUL."""
    end = data.index(b"\0", offset)
    return data[offset:end].decode(), end + 1


def _timestamp(microseconds: int) -> datetime:
    return POSTGRES_EPOCH + timedelta(microseconds=microseconds)
