"""KvChunk messages (protos/partita/v1/kv_transfer.proto) written and read without protobuf message objects.

The KV bytes are most of what a transfer costs: building a `KvBlockPayload` copies its data into the message
and `SerializeToString` copies it again; on the receiving side parsing copies the data into the message and
each read of `data` copies it once more, all under the GIL, on the event loop. Here a chunk's wire form is the
join of small field headers with views of the exported payloads (one copy, by `bytes.join`, which like
`crc32` releases the GIL on large inputs, so that encoding runs on a thread beside the event loop), and
`decode_chunk` reads the received bytes in place: its payloads' data are views of them.

`crc32` is ISA-L's (the `isal` package, a dependency): the same CRC-32 as zlib.crc32, computed with carry-less
multiplies at 13 GB/s where zlib's table method reaches 2.4-3 GB/s; it was the sender's largest cost per chunk.
zlib's is the fallback where isal is not installed.

Both are protobuf's encoding of KvChunk: `encode_chunk` writes what SerializeToString writes, field for field,
and `decode_chunk` reads any KvChunk encoding (unknown fields skipped, as fields are only ever added), refusing
with ValueError whatever the generated parser refuses (tests/cluster/test_kv_wire.py checks both against it).

`ChunkPacker` splits one request's payloads into chunks of at most `chunk_bytes` payload bytes: block runs are
cut at block boundaries, into runs of several blocks when the receiver accepts them (ReserveResponse
`accepts_block_runs`), else into single blocks as older receivers expect.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence

import grpc

try:
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

from partita.protos.partita.v1 import kv_transfer_pb2 as pb

SEND_STREAM = "/partita.v1.KvTransfer/SendStream"
Piece = tuple[int, int, int, memoryview]  # (layer, first block index, blocks in data (1 for the state), data)

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_U32, _U64 = 2**32 - 1, 2**64 - 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _uint(number: int, value: int) -> bytes:
    """A proto3 scalar field; zero is the default and is left out, as SerializeToString does."""
    return _tag(number, _VARINT) + _varint(value) if value else b""


def encode_chunk(transfer_id: str, seq: int, pieces: Sequence[Piece], is_last: bool) -> bytes:
    """The wire form of KvChunk(transfer_id, seq, blocks=[KvBlockPayload(layer, block_index, data, crc32 of data,
    num_blocks: left out for one block)], is_last)."""
    tid = transfer_id.encode()
    parts = [_tag(1, _LEN) + _varint(len(tid)) + tid if tid else b"", _uint(2, seq)]
    for layer, index, num_blocks, data in pieces:
        head = _uint(1, layer) + _uint(2, index) + _tag(3, _LEN) + _varint(len(data))
        tail = _uint(4, crc32(data)) + _uint(5, num_blocks if num_blocks > 1 else 0)
        parts += [_tag(3, _LEN) + _varint(len(head) + len(data) + len(tail)) + head, data, tail]
    parts.append(_uint(4, int(is_last)))
    return b"".join(parts)


class ChunkPacker:
    """Cuts payloads (layer, first block index, data: whole blocks, or the state at index `num_blocks`) into
    pieces and groups them into chunks of at most chunk_bytes payload bytes, in order."""

    def __init__(self, chunk_bytes: int, bytes_per_block: int, num_blocks: int, runs: bool):
        self.chunk_bytes, self.bytes_per_block, self.num_blocks = chunk_bytes, bytes_per_block, num_blocks
        self.runs = runs
        self.pieces: list[Piece] = []
        self.size = 0

    def add(self, layer: int, index: int, data: bytes) -> Iterator[list[Piece]]:
        """Takes one payload; yields each chunk's pieces as it fills up."""
        view = memoryview(data)
        unit = len(view) if index >= self.num_blocks else self.bytes_per_block
        if not view or len(view) % unit:
            raise ValueError(f"payload (layer {layer}, block {index}): {len(view)} bytes is not a whole number of "
                             f"{unit}-byte blocks")
        if unit > self.chunk_bytes:
            raise ValueError(f"a payload of {unit} bytes does not fit the chunk limit of {self.chunk_bytes} bytes")
        while view:
            count = min(len(view) // unit, (self.chunk_bytes - self.size) // unit if self.runs else 1)
            if count == 0 or self.size + unit > self.chunk_bytes:
                yield self.take()
                continue
            self.pieces.append((layer, index, count if index < self.num_blocks else 1, view[:count * unit]))
            self.size += count * unit
            index += count
            view = view[count * unit:]

    def take(self) -> list[Piece]:
        """The pieces gathered so far (one chunk's), leaving the packer empty."""
        pieces, self.pieces, self.size = self.pieces, [], 0
        return pieces


class WirePayload(NamedTuple):
    """A KvBlockPayload as read by decode_chunk; data is a view of the received message."""

    layer: int
    block_index: int
    data: memoryview
    crc32: int
    num_blocks: int


class WireChunk(NamedTuple):
    """A KvChunk as read by decode_chunk."""

    transfer_id: str
    seq: int
    blocks: list[WirePayload]
    is_last: bool


def _read_varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 70:
        if pos >= end:
            raise ValueError("a KvChunk field ends inside a varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("a KvChunk varint is longer than 10 bytes")


def _fields(raw: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value: a varint's value or a length-delimited field's start, position after
    the field) for each field in raw[pos:end]; fixed-size fields are skipped over and yielded with value 0."""
    while pos < end:
        key, pos = _read_varint(raw, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("a KvChunk field has number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(raw, pos, end)
        elif wire_type == _LEN:
            length, value = _read_varint(raw, pos, end)
            pos = value + length
        elif wire_type in (_I64, _I32):
            value, pos = 0, pos + (8 if wire_type == _I64 else 4)
        else:  # groups: never written by a KvTransfer sender
            raise ValueError(f"KvChunk field {number} has wire type {wire_type}")
        if pos > end:
            raise ValueError(f"KvChunk field {number} runs past the end of its message")
        yield number, wire_type, value, pos


def _decode_payload(raw: bytes, view: memoryview, pos: int, end: int) -> WirePayload:
    layer = index = crc = count = 0
    data = view[0:0]
    for number, wire_type, value, after in _fields(raw, pos, end):
        if wire_type == _LEN and number == 3:
            data = view[value:after]
        elif wire_type == _VARINT:
            if number == 1:
                layer = value & _U32
            elif number == 2:
                index = value & _U32
            elif number == 4:
                crc = value & _U32
            elif number == 5:
                count = value & _U32
    return WirePayload(layer, index, data, crc, count)


def decode_chunk(raw: bytes) -> WireChunk:
    """Reads a KvChunk's wire form (module docstring); ValueError if it is not one."""
    view = memoryview(raw)
    transfer_id, seq, blocks, is_last = "", 0, [], False
    for number, wire_type, value, after in _fields(raw, 0, len(raw)):
        if wire_type == _LEN and number == 1:
            transfer_id = str(raw[value:after], "utf-8")  # UnicodeDecodeError is a ValueError
        elif wire_type == _LEN and number == 3:
            blocks.append(_decode_payload(raw, view, value, after))
        elif wire_type == _VARINT and number == 2:
            seq = value & _U64
        elif wire_type == _VARINT and number == 4:
            is_last = value != 0
    return WireChunk(transfer_id, seq, blocks, is_last)


def send_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """KvTransfer.SendStream on `channel`, taking chunks already in wire form (no serializer) and reading KvAcks."""
    return channel.stream_stream(SEND_STREAM, request_serializer=None, response_deserializer=pb.KvAck.FromString)
