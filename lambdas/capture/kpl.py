"""KPL aggregated records, framed by hand.

An aggregated record is the magic bytes ``f3 89 9a c2``, then one protobuf
``AggregatedRecord`` message, then the MD5 digest of that message (the
aggregation format of the Kinesis Producer Library, which the Kinesis Client
Library, Firehose and ``aws-kinesis-agg`` deaggregate)::

    message AggregatedRecord {
      repeated string partition_key_table = 1;
      repeated string explicit_hash_key_table = 2;
      repeated Record records = 3;
    }
    message Record {
      required uint64 partition_key_index = 1;
      optional uint64 explicit_hash_key_index = 2;
      required bytes data = 3;
    }

``aws-kinesis-agg`` builds a protobuf object per user record, which cost the
capture more than decoding and encoding the change itself. Here a user record
is two appends: its framing, made from bytes kept per partition key, and its
data. The message is written in field order, as protobuf serializers write
it, so an aggregate is byte for byte the one ``aws-kinesis-agg`` builds from
the same user records (the tests check this, and deaggregate with it).
"""

from __future__ import annotations

import hashlib

MAGIC = b"\xf3\x89\x9a\xc2"
DIGEST_SIZE = 16

# Field keys: (field number << 3) | wire type, 0 for varints and 2 for bytes.
_PARTITION_KEY_TABLE = b"\x0a"
_EXPLICIT_HASH_KEY_TABLE = b"\x12"
_RECORD = b"\x1a"
_PARTITION_KEY_INDEX = b"\x08"
_EXPLICIT_HASH_KEY_INDEX = b"\x10"
_DATA = b"\x1a"


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: Varints of every value under 2**14 (at most two bytes): most record sizes and indexes.
_SMALL_VARINTS = tuple(_encode_varint(value) for value in range(1 << 14))


def varint(value: int) -> bytes:
    """``value`` (not negative) as a protobuf base-128 varint."""
    return _SMALL_VARINTS[value] if value < 1 << 14 else _encode_varint(value)


def _field(key: bytes, payload: bytes) -> bytes:
    return key + varint(len(payload)) + payload


class Aggregate:
    """One aggregated record being filled, at most ``max_size`` bytes once sealed.

    The Kinesis record that carries it takes the partition key and explicit
    hash key of its first user record, as the KPL does.
    """

    __slots__ = (
        "_hash_key_indexes",
        "_hash_key_table",
        "_key_table",
        "_prefixes",
        "_records",
        "count",
        "explicit_hash_key",
        "max_size",
        "partition_key",
        "size",
    )

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = len(MAGIC) + DIGEST_SIZE
        self.count = 0
        self.partition_key = ""
        self.explicit_hash_key = ""
        self._key_table: list[bytes] = []
        self._hash_key_table: list[bytes] = []
        self._hash_key_indexes: dict[str, int] = {}
        #: Partition key -> the start of its records: both table indexes and the data key.
        self._prefixes: dict[str, bytes] = {}
        self._records: list[bytes] = []

    def add(self, partition_key: str, explicit_hash_key: str, data: bytes) -> bool:
        """Append one user record; False, with nothing added, if it would not fit."""
        prefix = self._prefixes.get(partition_key)
        new_entries: tuple[bytes, ...] = ()
        if prefix is None:
            key_entry = _field(_PARTITION_KEY_TABLE, partition_key.encode())
            hash_key_index = self._hash_key_indexes.get(explicit_hash_key)
            if hash_key_index is None:
                hash_key_index = len(self._hash_key_table)
                new_entries = (
                    key_entry,
                    _field(_EXPLICIT_HASH_KEY_TABLE, explicit_hash_key.encode()),
                )
            else:
                new_entries = (key_entry,)
            prefix = b"".join(
                (
                    _PARTITION_KEY_INDEX,
                    varint(len(self._key_table)),
                    _EXPLICIT_HASH_KEY_INDEX,
                    varint(hash_key_index),
                    _DATA,
                )
            )

        length = len(data)
        head = prefix + varint(length)
        header = _RECORD + varint(len(head) + length) + head
        added = len(header) + length
        for entry in new_entries:
            added += len(entry)
        if self.size + added > self.max_size:
            return False

        if new_entries:
            self._key_table.append(new_entries[0])
            if len(new_entries) == 2:
                self._hash_key_indexes[explicit_hash_key] = len(self._hash_key_table)
                self._hash_key_table.append(new_entries[1])
            self._prefixes[partition_key] = prefix
        if not self.count:
            self.partition_key = partition_key
            self.explicit_hash_key = explicit_hash_key
        self._records.append(header)
        self._records.append(data)
        self.size += added
        self.count += 1
        return True

    def seal(self) -> bytes:
        """The aggregated record's bytes: magic, message, digest of the message."""
        message = b"".join((*self._key_table, *self._hash_key_table, *self._records))
        return b"".join((MAGIC, message, hashlib.md5(message, usedforsecurity=False).digest()))
