"""PD disaggregation over a real gRPC KvTransfer server on 127.0.0.1: a prefill AsyncEngine, a decode
AsyncEngine behind `start_kv_transfer_server`, the client in between (tiny random models, CPU).

Greedy PD output equals colocated output token for token (every KV format against the colocated engine of the
same format), with payloads of block runs or of single blocks as the receiver accepts; a corrupted chunk is
refused (DATA_LOSS), the attempt aborted and retried, and the request still completes; a run that is corrupt,
reaches past the last block, overlaps a received block or has the wrong size aborts the transfer and frees its
blocks; a truncated transfer (Commit early) is refused and never used; Reserve without room answers
RESOURCE_EXHAUSTED; a format mismatch answers INVALID_ARGUMENT and falls back to colocated decode; every block
returns to the free pool on both sides.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import threading
import zlib

import grpc
import pytest
import torch

from partita.cluster import kv_transfer_client, kv_transfer_server
from partita.cluster.async_engine import AsyncEngine
from partita.cluster.auth import bearer_token_interceptors
from partita.cluster.kv_transfer_client import migrate_or_resume, reserve_request, send_kv
from partita.cluster.kv_transfer_server import KvTransferServicer, start_kv_transfer_server
from partita.cluster.kv_wire import send_stream
from partita.protos.partita.v1 import inference_pb2, kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers import Engine, EngineConfig, SamplingParams
from partita.workers.kv_migration import export_request, kv_layout, layer_byte_rows

CONFIG = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
PROMPT = [(7 * j) % 500 + 2 for j in range(45)]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
WIRE_GREEDY = inference_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def colocated(kv_format: str, device: str = "cpu", config: dict = CONFIG) -> list[int]:
    engine = Engine("tiny-llama", device=device, kv_format=kv_format, config=EngineConfig(**config))
    engine.add_request("r", PROMPT, GREEDY)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    return tokens


class Pair:
    """A prefill engine, a decode engine behind a KvTransfer server, a channel to it, decode outputs by request."""

    def __init__(self, kv_format: str, decode_format: str | None = None, api_key: str | None = None,
                 client_token: str | None = None, device: str = "cpu", config: dict = CONFIG, **decode_config):
        self.api_key, self.client_token = api_key, client_token
        self.prefill = AsyncEngine.from_model("tiny-llama", device=device, kv_format=kv_format,
                                              config=EngineConfig(**config))
        self.decode = AsyncEngine.from_model("tiny-llama", device=device, kv_format=decode_format or kv_format,
                                             config=EngineConfig(**{**config, **decode_config}))
        self.outputs: dict[str, asyncio.Task] = {}

    def on_commit(self, request_id, outputs) -> None:
        async def collect():
            return [t async for o in outputs for t in o.new_token_ids]
        self.outputs[request_id] = asyncio.get_running_loop().create_task(collect())

    async def __aenter__(self):
        self.server, port, self.servicer = await start_kv_transfer_server(
            self.decode, on_commit=self.on_commit, max_chunk_bytes=64 * 1024, reaper_interval_s=0.05,
            api_key=self.api_key)
        interceptors = bearer_token_interceptors(self.client_token) if self.client_token else None
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.aio.insecure_channel(self.address, interceptors=interceptors)
        self.stub = kv_transfer_pb2_grpc.KvTransferStub(self.channel)
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await self.server.stop(None)
        self.servicer.close()
        self.prefill.shutdown()
        self.decode.shutdown()

    async def run(self, request_id: str = "r", **send_kwargs) -> tuple[list[int], object]:
        """PD generate: prefill-only on the prefill engine, migrate (or fall back), tokens from wherever decoded."""
        stream = self.prefill.adopt(request_id, lambda e: e.add_request(request_id, PROMPT, GREEDY, prefill_only=True))
        async with contextlib.aclosing(stream):
            first = await anext(stream)
            result = await migrate_or_resume(self.prefill, self.channel, request_id, WIRE_GREEDY, **send_kwargs)
            if result is None:
                rest = [t async for o in stream for t in o.new_token_ids]
                return first.new_token_ids + rest, None
        return first.new_token_ids + await self.outputs[request_id], result

    async def held_and_reserved(self, ttl_s: float = 30.0):
        """Prefills "r" held for migration, reserves its transfer by hand: (prefill stream, export, transfer id,
        the first chunk: the first block alone). The caller closes the stream and releases "r"."""
        stream = self.prefill.adopt("r", lambda e: e.add_request("r", PROMPT, GREEDY, prefill_only=True))
        await anext(stream)
        export = await asyncio.wrap_future(self.prefill.submit(lambda e: export_request(e, "r")))
        reserve = reserve_request("r", PROMPT, export.layout, model="", sender_id="", ttl_s=ttl_s)
        tid = (await self.stub.Reserve(reserve)).transfer_id
        layer, index, data = export.payloads[0]
        data = bytes(data[:export.layout.bytes_per_block])
        first = pb.KvChunk(transfer_id=tid, seq=0, blocks=[pb.KvBlockPayload(
            layer=layer, block_index=index, data=data, crc32=zlib.crc32(data))])
        return stream, export, tid, first

    async def assert_all_free(self) -> None:
        for engine in (self.prefill, self.decode):
            def check(e):
                assert e.blocks.num_free_blocks == e.blocks.num_blocks
                assert len(e.blocks.free_seq_slots) == e.config.max_num_seqs
                assert not e.scheduler.held
            await asyncio.wrap_future(engine.submit(check))
        assert not self.servicer.transfers


async def eventually(condition, tries: int = 100, every_s: float = 0.02) -> bool:
    """Whether condition() (a value, or an awaitable of one) holds within tries x every_s seconds."""
    for _ in range(tries):
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return True
        await asyncio.sleep(every_s)
    return False


@pytest.mark.parametrize("kv_format", ["none", "fp8", "int8", "int4", "kivi2"])
def test_pd_over_grpc_equals_colocated(kv_format):
    async def main():
        async with Pair(kv_format) as pair:
            tokens, result = await pair.run(chunk_bytes=16 * 1024, window=2)
            await pair.assert_all_free()
            return tokens, result
    tokens, result = asyncio.run(main())
    assert result is not None and result.attempts == 1 and result.num_chunks >= 1
    assert tokens == colocated(kv_format)


def test_kv_port_refuses_senders_without_the_token():
    """A wrong token is refused (UNAUTHENTICATED, not retried): the request decodes on the prefill engine; the
    right token migrates it."""
    async def main():
        token = "t" * 32
        async with Pair("int8", api_key=token, client_token="wrong-token-of-32-characters----") as pair:
            refused = await pair.run()
            await pair.assert_all_free()
        async with Pair("int8", api_key=token, client_token=token) as pair:
            accepted = await pair.run()
            await pair.assert_all_free()
        return refused, accepted
    (refused_tokens, refused), (tokens, accepted) = asyncio.run(main())
    assert refused is None and accepted is not None and accepted.attempts == 1
    assert refused_tokens == tokens == colocated("int8")


def corrupted(wire: bytes) -> bytes:
    """The chunk with its first payload's first byte flipped; the crc32 still describes the original bytes."""
    chunk = pb.KvChunk.FromString(wire)
    data = bytearray(chunk.blocks[0].data)
    data[0] ^= 0xFF
    chunk.blocks[0].data = bytes(data)
    return chunk.SerializeToString()


def test_corrupt_chunk_is_detected_and_retried(monkeypatch):
    real = kv_transfer_client.build_chunks
    calls = []

    def corrupt_first_attempt(transfer_id, *args):
        calls.append(transfer_id)
        for chunk in real(transfer_id, *args):
            yield corrupted(chunk) if len(calls) == 1 and pb.KvChunk.FromString(chunk).seq == 1 else chunk

    monkeypatch.setattr(kv_transfer_client, "build_chunks", corrupt_first_attempt)

    async def main():
        async with Pair("int8") as pair:
            tokens, result = await pair.run(chunk_bytes=8 * 1024)
            await pair.assert_all_free()
            return tokens, result
    tokens, result = asyncio.run(main())
    assert len(calls) == 2 and result.attempts == 2
    assert tokens == colocated("int8")


def test_decode_worker_dying_mid_transfer_falls_back_to_colocated(monkeypatch):
    """The decode side's server goes away after the first chunks of a transfer: both attempts fail, the request
    decodes on the prefill engine with the colocated tokens, and the prefill side's blocks all come back."""
    real = kv_transfer_client.build_chunks
    pairs = []

    def die_after_two_chunks(*args):
        for chunk in real(*args):
            if pb.KvChunk.FromString(chunk).seq == 2 and not pairs[0].stopped:
                pairs[0].stopped = True
                asyncio.get_running_loop().create_task(pairs[0].server.stop(None))
            yield chunk

    monkeypatch.setattr(kv_transfer_client, "build_chunks", die_after_two_chunks)

    async def main():
        async with Pair("int4") as pair:
            pair.stopped = False
            pairs.append(pair)
            tokens, result = await pair.run(chunk_bytes=2 * 1024, window=1, timeout_s=5.0)
            def check(e):
                assert e.blocks.num_free_blocks == e.blocks.num_blocks and not e.scheduler.held
            await asyncio.wrap_future(pair.prefill.submit(check))
            return tokens, result
    tokens, result = asyncio.run(main())
    assert result is None  # decoded on the prefill engine
    assert tokens == colocated("int4")


def test_runs_to_a_receiver_that_takes_them_single_blocks_to_one_that_does_not(monkeypatch):
    """Payloads carry runs of consecutive blocks when the receiver's ReserveResponse accepts them, and single
    blocks otherwise (an older receiver); either way the request migrates with the colocated tokens."""
    counts = []
    real_admit = KvTransferServicer._admit

    async def admit(self, incoming, chunk):
        counts.extend(max(b.num_blocks, 1) for b in chunk.blocks)
        return await real_admit(self, incoming, chunk)

    monkeypatch.setattr(KvTransferServicer, "_admit", admit)

    async def main(runs: bool):
        async with Pair("int4") as pair:
            real_reserve = pair.servicer._reserve

            async def reserve(request):
                response = await real_reserve(request)
                response.accepts_block_runs = runs
                return response

            pair.servicer._reserve = reserve
            tokens, result = await pair.run(chunk_bytes=64 * 1024)
            await pair.assert_all_free()
            return tokens, result
    for runs in (True, False):
        counts.clear()
        tokens, result = asyncio.run(main(runs))
        assert result is not None and tokens == colocated("int4")
        assert (max(counts) > 1) == runs


def run_chunk(tid: str, seq: int, layer: int, index: int, data, count: int, crc_of=None):
    return pb.KvChunk(transfer_id=tid, seq=seq, blocks=[pb.KvBlockPayload(
        layer=layer, block_index=index, data=bytes(data), crc32=zlib.crc32(crc_of or data), num_blocks=count)])


def test_corrupt_run_is_data_loss_and_frees_the_blocks():
    """A run of blocks whose bytes do not match its crc32 is refused with DATA_LOSS (also when the next chunk is
    already being read behind it) and the reservation is freed at once."""
    async def main():
        async with Pair("none") as pair:
            stream, export, tid, _ = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                (layer, index, data), (next_layer, _, next_data) = export.payloads[:2]
                count = len(data) // export.layout.bytes_per_block
                assert count > 1 and next_layer == layer + 1
                bad = bytearray(data)
                bad[-1] ^= 0xFF
                call = pair.stub.SendStream()
                await call.write(run_chunk(tid, 0, layer, index, bytes(bad), count, crc_of=data))
                await call.write(run_chunk(tid, 1, next_layer, 0, next_data, count))
                await call.done_writing()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.DATA_LOSS and "crc32" in err.value.details()
                assert tid not in pair.servicer.transfers
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_a_chunk_written_after_the_receiver_refused_the_stream_fails_the_attempt():
    """The receiver refuses a corrupt chunk (DATA_LOSS) and ends the stream while the sender is still writing the
    next: the sender's attempt fails with the receiver's status (AttemptFailed, which `send_kv` retries), not with
    gRPC's "RPC already finished"."""
    async def main():
        async with Pair("none") as pair:
            stream, export, tid, first = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                bad = bytearray(first.SerializeToString())
                bad[-10] ^= 0xFF  # inside the block's data: its crc32 no longer matches

                async def chunks():
                    yield bytes(bad)
                    assert await eventually(lambda: tid not in pair.servicer.transfers)  # refused and freed
                    yield first.SerializeToString()

                with pytest.raises(kv_transfer_client.AttemptFailed) as err:
                    await kv_transfer_client.stream_chunks(pair.channel, tid, chunks(), 8, 30)
                assert err.value.code == grpc.StatusCode.DATA_LOSS and "crc32" in str(err.value)
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


@pytest.mark.parametrize("case", ["past the last block", "overlapping a received block", "short of its size"])
def test_bad_runs_abort_the_transfer(case):
    async def main():
        async with Pair("none") as pair:
            stream, export, tid, first = await pair.held_and_reserved()  # first: block 0 of layer 0 alone
            async with contextlib.aclosing(stream):
                layer, _, data = export.payloads[0]
                width = export.layout.bytes_per_block
                count = len(data) // width
                second = {"past the last block": run_chunk(tid, 1, layer, 1, data[width:], count),
                          "overlapping a received block": run_chunk(tid, 1, layer, 0, data[:2 * width], 2),
                          "short of its size": run_chunk(tid, 1, layer, 1, data[width:-1], count - 1)}[case]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pair.stub.Send(iter([first, second]))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert {"past the last block": "not part of the transfer", "overlapping a received block": "sent twice",
                        "short of its size": "bytes, expected"}[case] in err.value.details()
                assert tid not in pair.servicer.transfers
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_truncated_transfer_is_refused_and_freed():
    async def main():
        async with Pair("none") as pair:
            stream, export, tid, chunk = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                summary = await pair.stub.Send(iter([chunk]))
                assert summary.num_blocks_written == 1
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pair.stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=export.first_token_id))
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "blocks and states received" in err.value.details()
                assert "r" not in pair.outputs
                with pytest.raises(grpc.aio.AioRpcError) as err:  # the aborted transfer takes no more chunks
                    await pair.stub.Send(iter([pb.KvChunk(transfer_id=tid, seq=1)]))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


@pytest.mark.parametrize("kv_format", ["int4", "kivi2"])
def test_chunks_are_written_while_the_engine_thread_is_busy(kv_format):
    """The decode worker writes a transfer's blocks off its engine thread: every chunk is checked, written and
    acknowledged while that thread is busy (here held by a call that waits; in service, decode steps), and the
    state payloads (kivi2's) are written at Commit. The request then decodes what the colocated engine does."""
    async def main():
        async with Pair(kv_format) as pair:
            stream, export, tid, _ = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                started, release = threading.Event(), threading.Event()
                busy = pair.decode.submit(lambda e: (started.set(), release.wait(30)))
                try:
                    assert await eventually(started.is_set)
                    unit = max(export.layout.bytes_per_block, export.layout.state_bytes(export.num_tokens))
                    chunks = kv_transfer_client.build_chunks(tid, export, unit, True)
                    sending = kv_transfer_client.stream_chunks(pair.channel, tid, chunks, 2, 30)
                    sent = await asyncio.wait_for(sending, 10)
                    assert sent > 2 and not busy.done()  # more chunks than the window: acks were needed
                finally:
                    release.set()
                await asyncio.wrap_future(busy)
                await pair.stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=export.first_token_id,
                                                        sampling=WIRE_GREEDY))
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
                assert [export.first_token_id] + await pair.outputs["r"] == colocated(kv_format)
            await pair.assert_all_free()
    asyncio.run(main())


@pytest.mark.parametrize("when", ["before the write", "during the write"])
def test_abort_and_a_chunk_being_written(monkeypatch, when):
    """A chunk's write and the transfer's end exclude each other: an Abort that comes while a chunk is being
    staged frees the blocks and the write that follows is refused (the cache is left as it was); one that comes
    while a chunk is being written waits for that write before the blocks are freed."""
    staging, go = threading.Event(), threading.Event()
    real_stage = kv_transfer_server.stage_payloads

    def stage(*args, **kwargs):
        staged = real_stage(*args, **kwargs)
        if when == "before the write":
            staging.set()
            go.wait(30)
            return staged
        write = staged.write_blocks

        def slow_write():
            staging.set()
            go.wait(30)
            write()
        return dataclasses.replace(staged, write_blocks=slow_write)

    monkeypatch.setattr(kv_transfer_server, "stage_payloads", stage)

    async def main():
        async with Pair("int4") as pair:
            stream, _, tid, chunk = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                def snapshot(e):
                    return [part.clone() for layer in range(e.model_config.num_layers)
                            for part in layer_byte_rows(e, layer)]
                before = await asyncio.wrap_future(pair.decode.submit(snapshot))
                call = pair.stub.SendStream()
                await call.write(chunk)
                await call.done_writing()
                assert await eventually(staging.is_set)
                abort = asyncio.ensure_future(pair.stub.Abort(pb.AbortTransferRequest(transfer_id=tid, reason="test")))
                if when == "during the write":
                    done, _ = await asyncio.wait([abort], timeout=0.3)
                    assert not done  # the free waits for the write under way
                else:
                    assert (await abort).was_reserved
                go.set()
                assert (await abort).was_reserved
                acks = []
                try:
                    acks = [ack.seq async for ack in call]
                except grpc.aio.AioRpcError as e:
                    assert when == "before the write" and e.code() == grpc.StatusCode.INTERNAL
                    assert "aborted before its chunk 0 was written" in e.details()
                assert acks == ([0] if when == "during the write" else [])
                if when == "before the write":
                    after = await asyncio.wrap_future(pair.decode.submit(snapshot))
                    assert all(torch.equal(a, b) for a, b in zip(before, after))
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_sender_dying_mid_stream_frees_the_reservation_at_once():
    """A sender that vanishes mid-SendStream (its call cancelled, as when its process dies) leaves no pages
    behind: the decode side frees them when the stream breaks, long before the reservation's 60 s ttl."""
    async def main():
        async with Pair("int4") as pair:
            stream, _, tid, chunk = await pair.held_and_reserved(ttl_s=60.0)
            async with contextlib.aclosing(stream):
                call = pair.stub.SendStream()
                await call.write(chunk)
                assert (await call.read()).seq == 0
                assert tid in pair.servicer.transfers
                call.cancel()
                assert await eventually(lambda: tid not in pair.servicer.transfers)
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_unreadable_chunk_is_invalid_argument_and_frees_the_reservation():
    async def main():
        async with Pair("int4") as pair:
            stream, _, tid, chunk = await pair.held_and_reserved(ttl_s=60.0)
            async with contextlib.aclosing(stream):
                call = send_stream(pair.channel)()
                await call.write(chunk.SerializeToString())
                assert (await call.read()).seq == 0
                await call.write(b"\xff" * 20)  # a varint that never ends
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "varint" in err.value.details()
                assert await eventually(lambda: tid not in pair.servicer.transfers)
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_out_of_order_and_wrong_size_abort_the_transfer():
    async def main():
        async with Pair("none") as pair:
            layout = await asyncio.wrap_future(pair.decode.submit(kv_layout))
            reserve = pb.ReserveRequest(
                request_id="x", format=layout.to_proto(), num_layers=layout.num_layers, num_blocks=1, num_tokens=4,
                bytes_per_block=layout.bytes_per_block, expected_total_bytes=layout.total_bytes(4),
                prompt_token_ids=[3] * 4)
            for chunk, code in ((lambda t: pb.KvChunk(transfer_id=t, seq=1), grpc.StatusCode.INVALID_ARGUMENT),
                                (lambda t: pb.KvChunk(transfer_id=t, seq=0, blocks=[pb.KvBlockPayload(
                                    data=b"abc", crc32=zlib.crc32(b"abc"))]), grpc.StatusCode.INVALID_ARGUMENT)):
                tid = (await pair.stub.Reserve(reserve)).transfer_id
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pair.stub.Send(iter([chunk(tid)]))
                assert err.value.code() == code
                assert "aborted" in err.value.details()
                await pair.assert_all_free()
            bad = pb.ReserveRequest()
            bad.CopyFrom(reserve)
            bad.num_blocks = 2
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pair.stub.Reserve(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_blocks" in err.value.details()
            ttl = pb.ReserveRequest()
            ttl.CopyFrom(reserve)
            ttl.ttl_s = 0.05
            await pair.stub.Reserve(ttl)
            await asyncio.sleep(0.3)  # the reaper frees it
            await pair.assert_all_free()
    asyncio.run(main())


def test_no_room_is_resource_exhausted_and_falls_back():
    async def main():
        async with Pair("none", num_kv_blocks=8) as pair:
            hog = (await asyncio.wrap_future(pair.decode.submit(
                lambda e: e.reserve_migrated("hog", [3] * 100))))  # 7 of 8 blocks
            assert hog.block_table
            tokens, result = await pair.run()
            assert result is None  # RESOURCE_EXHAUSTED twice, then decoded on the prefill engine
            await asyncio.wrap_future(pair.decode.submit(lambda e: e.abort_reserved("hog")))
            await pair.assert_all_free()
            return tokens
    assert asyncio.run(main()) == colocated("none")


def test_reserve_without_room_status():
    async def main():
        async with Pair("none", num_kv_blocks=8) as pair:
            stream = pair.prefill.adopt("r", lambda e: e.add_request("r", PROMPT, GREEDY, prefill_only=True))
            async with contextlib.aclosing(stream):
                await anext(stream)
                export = await asyncio.wrap_future(pair.prefill.submit(lambda e: export_request(e, "r")))
                await asyncio.wrap_future(pair.decode.submit(lambda e: e.reserve_migrated("hog", [3] * 100)))
                with pytest.raises(kv_transfer_client.KvTransferFailed) as err:
                    await send_kv(pair.channel, export, WIRE_GREEDY)
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "needs 3 KV blocks" in str(err.value)
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await asyncio.wrap_future(pair.decode.submit(lambda e: e.abort_reserved("hog")))
            await pair.assert_all_free()
    asyncio.run(main())


def test_reserve_whose_caller_goes_away_frees_its_blocks():
    """A Reserve cancelled (deadline, client gone) while the engine thread reserves leaves no blocks behind,
    although no transfer was registered for the reaper to find."""
    async def main():
        async with Pair("none") as pair:
            layout = await asyncio.wrap_future(pair.decode.submit(kv_layout))
            engine = await asyncio.wrap_future(pair.decode.submit(lambda e: e))
            reserving, go = threading.Event(), threading.Event()
            plain = engine.reserve_migrated

            def slow_reserve(request_id, prompt):  # the caller goes away while this runs on the engine thread
                reserving.set()
                go.wait(10)
                return plain(request_id, prompt)

            engine.reserve_migrated = slow_reserve
            reserve = reserve_request("r", PROMPT, layout, model="", sender_id="", ttl_s=60.0)
            task = asyncio.ensure_future(pair.servicer._reserve(reserve))
            await asyncio.to_thread(reserving.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            go.set()
            await eventually(lambda: asyncio.wrap_future(pair.decode.submit(
                lambda e: e.blocks.num_free_blocks == e.blocks.num_blocks)))
            await pair.assert_all_free()
    asyncio.run(main())


def test_format_mismatch_is_invalid_argument_and_falls_back():
    async def main():
        async with Pair("int8", decode_format="int4") as pair:
            tokens, result = await pair.run()
            assert result is None
            await pair.assert_all_free()
            return tokens
    assert asyncio.run(main()) == colocated("int8")


def test_same_gpu_path_is_refused_off_the_gpu():
    """OpenCache answers FAILED_PRECONDITION for a CPU cache (the sender then sends chunks), and a Commit claiming
    `written_in_place` without an OpenCache is refused and frees the reservation: no unwritten KV is ever used."""
    async def main():
        async with Pair("int4") as pair:
            assert await kv_transfer_client.open_peer_cache(pair.prefill, pair.channel) is None  # CPU engine
            layout = await asyncio.wrap_future(pair.prefill.submit(kv_layout))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pair.stub.OpenCache(pb.OpenCacheRequest(format=layout.to_proto(), device_uuid="GPU-x"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CPU" in err.value.details()
            stream, export, tid, _ = await pair.held_and_reserved()
            async with contextlib.aclosing(stream):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pair.stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=export.first_token_id,
                                                            written_in_place=True))
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "OpenCache" in err.value.details()
                await asyncio.wrap_future(pair.prefill.submit(lambda e: e.release_prefilled("r")))
            await pair.assert_all_free()
    asyncio.run(main())


SAME_GPU_DECODE_WORKER = r"""
import asyncio, json, sys
from partita.cluster.async_engine import AsyncEngine
from partita.cluster.kv_transfer_server import KvTransferServicer, start_kv_transfer_server
from partita.cluster.kv_wire import send_stream
from partita.workers import EngineConfig

async def main(kv_format, config):
    engine = AsyncEngine.from_model("tiny-llama", device="cuda", kv_format=kv_format, config=EngineConfig(**config))
    tasks = set()

    def on_commit(request_id, outputs):
        async def collect():
            tokens = [t async for o in outputs for t in o.new_token_ids]
            free = await asyncio.wrap_future(engine.submit(
                lambda e: e.blocks.num_free_blocks == e.blocks.num_blocks and not e.scheduler.held))
            print(json.dumps({"tokens": tokens, "all_free": free}), flush=True)
        tasks.add(asyncio.get_running_loop().create_task(collect()))

    server, port, servicer = await start_kv_transfer_server(engine, on_commit=on_commit)
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    await server.stop(None)
    servicer.close()
    engine.shutdown()

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


GPU_CONFIG = {**CONFIG, "kv_cache_memory_bytes": 64 << 20}  # three engines share the GPU: none may take 90% of it


@contextlib.contextmanager
def same_gpu_decode_worker(kv_format: str):
    """A decode worker (SAME_GPU_DECODE_WORKER) in a child process on this GPU: yields its KvTransfer port and a
    function that reads the result of the next request it committed (its tokens, whether its blocks are free)."""
    import json
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", SAME_GPU_DECODE_WORKER, kv_format, json.dumps(GPU_CONFIG)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield json.loads(child.stdout.readline())["port"], lambda: json.loads(child.stdout.readline())
    finally:
        child.stdin.close()
        child.wait(timeout=60)


@contextlib.asynccontextmanager
async def same_gpu_prefill(kv_format: str, port: int):
    """A prefill engine on this GPU, a channel to the decode worker at `port` and that worker's cache mapped here
    (the same-GPU path must be granted)."""
    prefill = AsyncEngine.from_model("tiny-llama", device="cuda", kv_format=kv_format,
                                     config=EngineConfig(**GPU_CONFIG))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        peer = await kv_transfer_client.open_peer_cache(prefill, channel, sender_id="prefill-0")
        assert peer is not None, "the same-GPU path was refused"
        yield prefill, channel, peer
    finally:
        await channel.close()
        prefill.shutdown()


async def all_free(engine: AsyncEngine) -> bool:
    """Every KV block of `engine` free and nothing held for migration."""
    return await asyncio.wrap_future(engine.submit(
        lambda e: e.blocks.num_free_blocks == e.blocks.num_blocks and not e.scheduler.held))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_pd_over_grpc_on_cuda_equals_colocated(kv_format):
    """Chunks over gRPC between two engines on the GPU: the receiver writes the blocks from its checksum thread
    on the decode engine's stream and the states at Commit; greedy output equals the colocated engine's there."""
    async def main():
        async with Pair(kv_format, device="cuda", config=GPU_CONFIG) as pair:
            layout = await asyncio.wrap_future(pair.decode.submit(kv_layout))
            tokens, result = await pair.run(chunk_bytes=max(layout.bytes_per_block, layout.state_bytes(len(PROMPT))))
            assert result is not None and result.num_chunks > 2 and not result.in_place
            await pair.assert_all_free()
            return tokens
    assert asyncio.run(main()) == colocated(kv_format, "cuda", GPU_CONFIG)


@pytest.mark.gpu
@pytest.mark.parametrize("reserved_early", [False, True], ids=["reserved-after", "reserved-early"])
@pytest.mark.parametrize("kv_format", ["none", "int4", "kivi2"])
def test_same_gpu_pd_in_place_equals_colocated(kv_format, reserved_early):
    """A decode worker in another process on the same GPU: the prefill side maps its cache (OpenCache, CUDA IPC),
    copies the blocks (and kivi2's residual) in place, commits without chunks; greedy output equals the colocated
    engine's on the GPU, and every block returns on both sides. Also into a reservation made before the prefill
    (`reserve`, as `EarlyReservation` makes it)."""
    with same_gpu_decode_worker(kv_format) as (port, decoded):
        async def main():
            async with same_gpu_prefill(kv_format, port) as (prefill, channel, peer):
                reserved = None
                if reserved_early:
                    layout = await asyncio.wrap_future(prefill.submit(kv_layout))
                    reserved = await kv_transfer_client.reserve(channel, "r", PROMPT, layout)
                stream = prefill.adopt("r", lambda e: e.add_request("r", PROMPT, GREEDY, prefill_only=True))
                async with contextlib.aclosing(stream):
                    first = await anext(stream)
                    result = await migrate_or_resume(prefill, channel, "r", WIRE_GREEDY, peer=peer,
                                                     reserved=reserved)
                return first.new_token_ids, result, await all_free(prefill)

        first, result, prefill_free = asyncio.run(main())
        decode = decoded()
    assert result is not None and result.in_place and result.num_chunks == 0 and result.bytes_sent > 0
    assert first + decode["tokens"] == colocated(kv_format, "cuda", GPU_CONFIG)
    assert prefill_free and decode["all_free"]
