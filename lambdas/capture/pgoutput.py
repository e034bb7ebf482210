"""Decode the messages of Postgres's ``pgoutput`` logical decoding plugin (protocol 1).

``pgoutput`` is the plugin built into Postgres 10 and later, and the one RDS
and Aurora offer alongside ``test_decoding``; unlike ``test_decoding`` (a
sample plugin whose text output must be re-parsed) it sends length-prefixed
values, marks unchanged TOASTed columns explicitly, and is limited to the
tables of a publication, so busy tables outside it cost the capture nothing.

Message layouts follow "Logical Replication Message Formats" in the Postgres
documentation. Column values arrive in their text form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

#: A column whose TOASTed value did not change and was not sent.
UNCHANGED = object()


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


@dataclass(frozen=True)
class Change:
    """An insert, update or delete of one row; values are text, None or ``UNCHANGED``."""

    op: str
    relation: Relation
    new: dict[str, object] | None
    old: dict[str, object] | None


Message = Begin | Commit | Relation | Change | None


class Decoder:
    """Decodes a sequence of pgoutput messages; remembers relations between them."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}

    def decode(self, data: bytes) -> Message:
        reader = _Reader(data)
        kind = reader.byte()
        try:
            if kind == b"B":
                return Begin(reader.int64(), _timestamp(reader.int64()), reader.int32())
            if kind == b"C":
                reader.int8()
                return Commit(reader.int64(), reader.int64(), _timestamp(reader.int64()))
            if kind == b"R":
                return self._relation(reader)
            if kind in (b"I", b"U", b"D"):
                return self._change(kind, reader)
            if kind in (b"Y", b"O", b"M"):
                return None  # type, origin and generic messages carry no row changes
            if kind == b"T":
                raise DecodingError("TRUNCATE of a captured table cannot be sent as row changes")
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise DecodingError(f"message {kind!r} is malformed at byte {reader.offset}") from exc
        raise DecodingError(f"unknown message type {kind!r}")

    def _relation(self, reader: _Reader) -> Relation:
        relation = Relation(reader.int32(), reader.string(), reader.string(), chr(reader.int8()))
        for _ in range(reader.int16()):
            flags = reader.int8()
            name = reader.string()
            type_oid = reader.int32()
            reader.int32()  # type modifier
            relation.columns.append(Column(name, type_oid, bool(flags & 1)))
        self.relations[relation.oid] = relation
        return relation

    def _change(self, kind: bytes, reader: _Reader) -> Change:
        oid = reader.int32()
        relation = self.relations.get(oid)
        if relation is None:
            raise DecodingError(f"change for relation {oid} before its Relation message")
        old = new = None
        marker = reader.byte()
        if marker in (b"K", b"O"):
            old = self._tuple(relation, reader)
            marker = reader.byte() if kind == b"U" else b""
        if marker == b"N":
            new = self._tuple(relation, reader)
        op = {b"I": "insert", b"U": "update", b"D": "delete"}[kind]
        return Change(op, relation, new, old)

    @staticmethod
    def _tuple(relation: Relation, reader: _Reader) -> dict[str, object]:
        # The hot path of the capture: parse in place with offsets, no per-field calls.
        data, offset = reader.data, reader.offset
        (count,) = _INT16.unpack_from(data, offset)
        offset += 2
        if count != len(relation.columns):
            raise DecodingError(
                f"{relation.name}: tuple has {count} columns, relation has {len(relation.columns)}"
            )
        values: dict[str, object] = {}
        for column in relation.columns:
            kind = data[offset]
            offset += 1
            if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
                (length,) = _INT32.unpack_from(data, offset)
                offset += 4
                end = offset + length
                if end > len(data):
                    raise IndexError("message ends early")
                values[column.name] = bytes(data[offset:end]).decode()
                offset = end
            elif kind == 0x6E:  # 'n' null
                values[column.name] = None
            elif kind == 0x75:  # 'u' unchanged TOASTed value, not sent
                values[column.name] = UNCHANGED
            else:
                raise DecodingError(
                    f"{relation.name}.{column.name}: unknown value kind {chr(kind)!r}"
                )
        reader.offset = offset
        return values


_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        if len(chunk) != size:
            raise IndexError("message ends early")
        self.offset += size
        return bytes(chunk)

    def byte(self) -> bytes:
        return self.take(1)

    def int8(self) -> int:
        return int(struct.unpack("!b", self.take(1))[0])

    def int16(self) -> int:
        return int(struct.unpack("!h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack("!i", self.take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack("!q", self.take(8))[0])

    def string(self) -> str:
        end = bytes(self.data[self.offset :]).index(b"\0")
        text = bytes(self.data[self.offset : self.offset + end]).decode()
        self.offset += end + 1
        return text


def _timestamp(microseconds: int) -> datetime:
    return POSTGRES_EPOCH + timedelta(microseconds=microseconds)
