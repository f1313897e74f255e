"""cluster/kv_wire.py against the generated protobuf classes: encode_chunk writes what SerializeToString writes,
decode_chunk reads what the generated parser reads (and refuses what it refuses), and ChunkPacker cuts payloads
into chunks within the limit, at block boundaries, as runs only when asked to."""
from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from partita.cluster.kv_wire import ChunkPacker, crc32, decode_chunk, encode_chunk
from partita.protos.partita.v1 import kv_transfer_pb2 as pb


def reference(transfer_id: str, seq: int, pieces, is_last: bool) -> pb.KvChunk:
    return pb.KvChunk(transfer_id=transfer_id, seq=seq, is_last=is_last, blocks=[
        pb.KvBlockPayload(layer=layer, block_index=index, data=bytes(data), crc32=zlib.crc32(data),
                          num_blocks=count if count > 1 else 0) for layer, index, count, data in pieces])


CASES = [
    ("", 0, [], False),
    ("t" * 32, 0, [], True),
    ("tid", 3, [(0, 0, 1, memoryview(b"\x01" * 100))], False),
    ("tid", 2**40, [(31, 7, 4, memoryview(bytes(range(256)) * 40)), (31, 11, 1, memoryview(b"s" * 300))], True),
    ("tid\u00e9", 1, [(200, 300, 1, memoryview(b"x"))] * 3, False),
]


def as_fields(chunk) -> tuple:
    return (chunk.transfer_id, chunk.seq, chunk.is_last,
            [(b.layer, b.block_index, bytes(b.data), b.crc32, b.num_blocks) for b in chunk.blocks])


@pytest.mark.parametrize("case", CASES)
def test_encode_is_what_serialize_writes_and_decode_reads_it_back(case):
    wire = encode_chunk(*case)
    assert wire == reference(*case).SerializeToString()
    assert as_fields(decode_chunk(wire)) == as_fields(pb.KvChunk.FromString(wire))


def test_decode_skips_unknown_fields_and_keeps_the_last_value():
    chunk = reference("tid", 5, [(1, 2, 3, memoryview(b"abc" * 10))], True)
    wire = chunk.SerializeToString() + b"\x48\x07" + b"\x52\x02hi" + b"\x10\x09"  # field 9, field 10, seq again
    parsed = pb.KvChunk.FromString(wire)
    assert parsed.seq == 9
    assert as_fields(decode_chunk(wire)) == as_fields(parsed)


def agree(wire: bytes) -> None:
    """decode_chunk accepts wire only if the generated parser does, and then reads the same message."""
    try:
        expected = as_fields(pb.KvChunk.FromString(wire))
    except DecodeError:
        with pytest.raises(ValueError):
            decode_chunk(wire)
        return
    try:
        got = as_fields(decode_chunk(wire))
    except ValueError:
        return  # stricter than protobuf (groups), never looser
    assert got == expected


def test_decode_agrees_with_protobuf_on_truncated_and_corrupted_bytes():
    wire = encode_chunk("tid", 300, [(1, 2, 3, memoryview(bytes(range(200)))), (1, 5, 1, memoryview(b"q" * 20))],
                        True)
    for end in range(len(wire)):
        agree(wire[:end])
    rng = random.Random(0)
    for _ in range(3000):
        corrupt = bytearray(wire)
        for _ in range(rng.randint(1, 3)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        agree(bytes(corrupt))
    for junk in (b"\x00", b"\x08", b"\x0a\x05ab", b"\xff" * 11, b"\x1a\x03\x1a\x05abcde", b"\x0a\x02\xff\xfe"):
        agree(junk)


def pack(payloads, chunk_bytes: int, bytes_per_block: int, num_blocks: int, runs: bool) -> list[list]:
    packer = ChunkPacker(chunk_bytes, bytes_per_block, num_blocks, runs)
    chunks = [pieces for payload in payloads for pieces in packer.add(*payload)]
    return chunks + [packer.take()]


@pytest.mark.parametrize("runs", [True, False])
def test_packer_cuts_runs_at_block_boundaries_within_the_limit(runs):
    bpb, n = 10, 7
    payloads = [(layer, 0, bytes([layer]) * bpb * n) for layer in range(3)]
    payloads = [p for layer in range(3) for p in (payloads[layer], (layer, n, b"s" * 25))]  # blocks, then state
    chunks = pack(payloads, 35, bpb, n, runs)
    assert all(sum(len(d) for *_, d in pieces) <= 35 for pieces in chunks)
    seen = {}
    for pieces in chunks:
        for layer, index, count, data in pieces:
            if index == n:
                assert count == 1 and len(data) == 25
            else:
                assert len(data) == count * bpb and (count == 1 or runs)
            seen.setdefault(layer, []).append((index, bytes(data)))
    for layer in range(3):
        assert b"".join(d for _, d in sorted(seen[layer])) == payloads[2 * layer][2] + b"s" * 25
    if runs:
        assert max(count for pieces in chunks for _, _, count, _ in pieces) == 3


def test_packer_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="chunk limit"):
        pack([(0, 0, b"x" * 20)], 15, 20, 1, True)
    with pytest.raises(ValueError, match="whole number"):
        pack([(0, 0, b"x" * 25)], 100, 20, 2, True)


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 5 * 1024 + 3, 3 * 2**20 + 1])
def test_crc32_is_zlibs(size):
    """The wire's crc32 (ISA-L's where installed) is zlib.crc32, the value the protocol names, on bytes and on
    the byte views the exporter hands over."""
    data = random.Random(size).randbytes(size)
    view = memoryview(np.frombuffer(data, dtype=np.uint8))
    assert crc32(data) == crc32(view) == zlib.crc32(data)
    assert crc32(data[size // 2:], crc32(data[:size // 2])) == zlib.crc32(data)
