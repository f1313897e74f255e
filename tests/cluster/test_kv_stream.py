"""KV migration streamed layer by layer under the prefill (`cluster/kv_stream_client.py`) over a real gRPC
KvTransfer server on 127.0.0.1, tiny random models on CPU, a chunked prefill (45 tokens, 32 per step).

Greedy output equals the colocated engine's token for token (none, int4, kivi2); a corrupted streamed chunk is
refused (DATA_LOSS) and the request still completes through the non-streamed retry; a refused Reserve takes
the export-after-prefill path; every block returns to the free pool on both sides. On a GPU (marked `gpu`), the
same-GPU variant copies the layers into a decode worker's mapped cache (another process, CUDA IPC) and falls back
to chunks when a copy fails.
"""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from partita.cluster import kv_stream_client
from partita.cluster.kv_stream_client import prefill_and_migrate
from partita.protos.partita.v1 import kv_transfer_pb2 as pb
from tests.cluster.test_kv_transfer import (GPU_CONFIG, GREEDY, PROMPT, WIRE_GREEDY, Pair, all_free, colocated,
                                           same_gpu_decode_worker, same_gpu_prefill)


async def run_streamed(pair: Pair, request_id: str = "r", **kwargs):
    m = await prefill_and_migrate(pair.prefill, pair.channel, request_id, PROMPT, GREEDY, WIRE_GREEDY, **kwargs)
    async with contextlib.aclosing(m.prefill_outputs):
        if m.result is None:
            rest = [t async for o in m.prefill_outputs for t in o.new_token_ids]
            return m.first.new_token_ids + rest, m
    return m.first.new_token_ids + await pair.outputs[request_id], m


# chunk sizes below each format's whole transfer (none 96 KiB, int4 13.5 KiB, kivi2 24 KiB here), so that
# several chunks go out however the layers' arrival and the sends interleave
@pytest.mark.parametrize("kv_format,chunk_kib", [("none", 16), ("int4", 4), ("kivi2", 16)])
def test_streamed_pd_equals_colocated(kv_format, chunk_kib):
    async def main():
        async with Pair(kv_format) as pair:
            tokens, m = await run_streamed(pair, chunk_bytes=chunk_kib * 1024, window=2)
            await pair.assert_all_free()
            return tokens, m
    tokens, m = asyncio.run(main())
    assert m.streamed and m.result is not None and m.result.num_chunks > 1, m.result
    assert m.times.admitted < m.times.first_send <= m.times.last_ack
    assert 0.0 <= m.times.hidden_share <= 1.0
    assert tokens == colocated(kv_format)


def test_layers_reach_the_sink_during_the_final_prefill_step():
    async def main():
        async with Pair("int4") as pair:
            seen = []

            def start(e):
                from partita.workers.kv_migration import stream_layers
                e.add_request("r", PROMPT, GREEDY, prefill_only=True)
                stream_layers(e, "r", lambda payloads: seen.append((payloads[0][0], e.requests["r"].seq.status,
                                                                   len(e.requests["r"].seq.token_ids))))

            stream = pair.prefill.adopt("r", start)
            async with contextlib.aclosing(stream):
                await anext(stream)
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
            return seen
    seen = asyncio.run(main())
    # every layer once, in order, before the first token was appended (the step was still running)
    assert [layer for layer, _, _ in seen] == list(range(len(seen))) and len(seen) >= 2
    assert all(n == len(PROMPT) for _, _, n in seen)


def test_corrupt_streamed_chunk_is_detected_and_the_request_completes(monkeypatch):
    real = kv_stream_client.pack_chunks
    corrupted = []

    async def corrupt_second_chunk(*args):
        async for wire in real(*args):
            chunk = pb.KvChunk.FromString(wire)
            if chunk.seq == 1 and not corrupted:
                data = bytearray(chunk.blocks[0].data)
                data[0] ^= 0xFF
                chunk.blocks[0].data = bytes(data)  # the crc32 still describes the original bytes
                corrupted.append(chunk.transfer_id)
                wire = chunk.SerializeToString()
            yield wire

    monkeypatch.setattr(kv_stream_client, "pack_chunks", corrupt_second_chunk)

    async def main():
        async with Pair("int8") as pair:
            tokens, m = await run_streamed(pair, chunk_bytes=8 * 1024)
            await pair.assert_all_free()
            return tokens, m
    tokens, m = asyncio.run(main())
    assert corrupted and not m.streamed and m.result is not None  # the non-streamed retry moved it
    assert m.result.transfer_id != corrupted[0]
    assert tokens == colocated("int8")


def test_refused_reserve_takes_the_export_after_prefill_path():
    async def main():
        async with Pair("none", num_kv_blocks=8) as pair:
            await asyncio.wrap_future(pair.decode.submit(
                lambda e: e.reserve_migrated("hog", [3] * 100)))  # 7 of 8 blocks: no room for 45 tokens
            tokens, m = await run_streamed(pair)
            await asyncio.wrap_future(pair.decode.submit(lambda e: e.abort_reserved("hog")))
            await pair.assert_all_free()
            return tokens, m
    tokens, m = asyncio.run(main())
    assert not m.streamed and m.result is None  # refused twice: decoded on the prefill engine
    assert tokens == colocated("none")


def _streamed_in_place(kv_format: str) -> tuple[list[int], kv_stream_client.StreamedMigration, dict]:
    """prefill_and_migrate to a decode worker in a child process on this GPU, its cache mapped here; returns the
    tokens (prefill's first, then the decode worker's), the migration, and the decode worker's report."""
    with same_gpu_decode_worker(kv_format) as (port, decoded):
        async def main():
            async with same_gpu_prefill(kv_format, port) as (prefill, channel, peer):
                m = await prefill_and_migrate(prefill, channel, "r", PROMPT, GREEDY, WIRE_GREEDY, peer=peer)
                await m.prefill_outputs.aclose()
                assert await all_free(prefill), "the prefill engine kept blocks"
                return m

        m = asyncio.run(main())
        decode = decoded()
    return m.first.new_token_ids + decode["tokens"], m, decode


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_same_gpu_streamed_in_place_equals_colocated(kv_format):
    """Layers copied into the decode worker's mapped cache during the prefill's last step: no chunks, greedy output
    equal to the colocated engine's on the GPU, every block back on both sides."""
    tokens, m, decode = _streamed_in_place(kv_format)
    assert m.streamed and m.result.in_place and m.result.num_chunks == 0 and m.result.bytes_sent > 0
    assert m.times.admitted < m.times.first_send <= m.times.last_ack
    assert tokens == colocated(kv_format, "cuda", GPU_CONFIG)
    assert decode["all_free"]


@pytest.mark.gpu
def test_failed_copy_in_place_falls_back_to_chunks(monkeypatch):
    """A copy that fails inside the forward pass: the reservation is aborted and the held request is sent in chunks
    instead; the output still equals the colocated engine's."""
    from partita.workers import kv_ipc

    def broken(plan, layer):
        raise RuntimeError("simulated copy failure")

    monkeypatch.setattr(kv_ipc, "_copy_layer", broken)
    tokens, m, decode = _streamed_in_place("int4")
    assert not m.streamed and m.result is not None and not m.result.in_place and m.result.num_chunks > 0
    assert tokens == colocated("int4", "cuda", GPU_CONFIG)
    assert decode["all_free"]
