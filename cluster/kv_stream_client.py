"""KV migration streamed layer by layer while the prefill still computes (the prefill worker's side).

    m = await prefill_and_migrate(prefill, channel, request_id, prompt, params, wire_sampling)
    async with contextlib.aclosing(m.prefill_outputs):
        if m.result is None:   # decoded here after all: the rest of the outputs come from the prefill engine
            ...

Unlike `kv_transfer_client.migrate_or_resume` (export after the prefill, then send), the transfer is reserved
on the decode worker before the request enters the prefill engine (its size is known from the prompt), and
during the step that completes the prefill each layer's KV is exported right after that layer's attention
wrote it (`kv_migration.stream_layers`) and handed to SendStream, which sends it while later layers compute.
Commit follows once the first token is sampled and every chunk is acknowledged. With `peer` (the decode worker's
cache mapped on this worker's GPU, `kv_transfer_client.open_peer_cache`) the layers are instead copied device to
device into the reserved blocks as they are computed (`kv_ipc.stream_in_place`), and Commit (`written_in_place`)
follows once those copies are done.

Failures: when Reserve is refused the request runs the export-after-prefill path (`migrate_or_resume`); when
the streamed attempt fails (a chunk refused, e.g. DATA_LOSS for a bad checksum, or a failed copy in place) it is
aborted on the receiver and the held request gets one more, non-streamed attempt in chunks through
`migrate_or_resume` (which resumes it on the prefill engine if that fails too), unless the refusal is one no
retry can fix (then it is resumed at once). A caller with other decode workers to offer passes `fallback`, which
replaces both of those (cluster/pd_worker.py tries them in order). ttl_s must cover the prefill (the reservation
is made before it), and timeout_s the prefill's remaining layers after the first one (SendStream opens when the
first layer is out). Buffering is bounded by one request's KV (what `export_request` holds too); SendStream's
window bounds what is in flight.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

import grpc

from partita.cluster.kv_transfer_client import (DEFAULT_CHUNK_BYTES, NOT_RETRYABLE, AttemptFailed, TransferResult,
                                                abort_transfer, migrate_or_resume, reserve, stream_chunks)
from partita.cluster.kv_wire import ChunkPacker, Piece, encode_chunk
from partita.protos.partita.v1 import inference_pb2, kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers.kv_ipc import InPlaceStream, PeerCache, stream_in_place
from partita.workers.kv_migration import KvLayout, Payload, kv_layout, stream_layers

if TYPE_CHECKING:
    from partita.cluster.async_engine import AsyncEngine
    from partita.workers import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class StreamTimes:
    """perf_counter() instants of one streamed migration, for the overlap measurement."""

    admitted: float = 0.0  # the request was handed to the prefill engine
    first_send: float = 0.0  # the first chunk went to SendStream
    first_token: float = 0.0  # the first token reached the event loop: the prefill compute is over
    last_ack: float = 0.0  # the receiver acknowledged the last chunk

    @property
    def hidden_share(self) -> float:
        """(transfer time overlapped with the prefill) / (transfer time), transfer = first send to last ack."""
        total = self.last_ack - self.first_send
        return max(0.0, min(self.first_token, self.last_ack) - self.first_send) / total if total > 0 else 0.0


@dataclass
class StreamedMigration:
    first: "RequestOutput"  # the first token, sampled on the prefill engine
    result: TransferResult | None  # None: decoded on the prefill engine (its outputs follow in prefill_outputs)
    prefill_outputs: AsyncIterator["RequestOutput"]  # the prefill engine's stream; close it when done
    streamed: bool  # the successful transfer (if any) was the layer-streamed one, not the fallback
    times: StreamTimes


async def pack_chunks(transfer_id: str, layers: asyncio.Queue, num_layers: int, packer: ChunkPacker,
                      times: StreamTimes) -> AsyncIterator[bytes]:
    """Chunks in wire form of at most the packer's chunk_bytes payload bytes from the layers as they arrive
    (each encoded on a worker thread); a partly filled chunk goes out as soon as nothing more is ready, so that
    sending never waits for a later layer it does not need."""
    loop = asyncio.get_running_loop()
    seq, seen = 0, 0

    async def encode(pieces: list[Piece], is_last: bool) -> bytes:
        times.first_send = times.first_send or time.perf_counter()
        return await loop.run_in_executor(None, encode_chunk, transfer_id, seq, pieces, is_last)

    while seen < num_layers:
        payloads: list[Payload] = await layers.get()
        seen += 1
        for layer, index, data in payloads:
            for pieces in packer.add(layer, index, data):
                yield await encode(pieces, False)
                seq += 1
        if packer.pieces and layers.empty() and seen < num_layers:
            yield await encode(packer.take(), False)
            seq += 1
    yield await encode(packer.take(), True)


async def prefill_and_migrate(prefill: "AsyncEngine", channel: grpc.aio.Channel, request_id: str, prompt: list[int],
                              params: "SamplingParams", sampling: inference_pb2.SamplingParams | None = None, *,
                              model: str = "", sender_id: str = "", chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                              window: int = 4, ttl_s: float = 30.0, timeout_s: float = 30.0,
                              peer: PeerCache | None = None,
                              fallback: Callable[[], Awaitable[TransferResult | None]] | None = None
                              ) -> StreamedMigration:
    """Prefills `prompt` on `prefill` as a prefill-only request and migrates its KV to the decode worker behind
    `channel`, streamed layer by layer under the prefill (module docstring). Exceptions of the prefill itself
    (a bad request) propagate, with the reservation aborted. fallback: what moves the held request (or resumes it
    on `prefill`, returning None) when the streamed transfer was refused or failed, e.g. other decode workers
    first; by default `migrate_or_resume` to the same one (module docstring)."""
    if window < 1 or chunk_bytes < 1:
        raise ValueError(f"window={window}, chunk_bytes={chunk_bytes}: each must be >= 1")
    stub = kv_transfer_pb2_grpc.KvTransferStub(channel)
    layout: KvLayout = await asyncio.wrap_future(prefill.submit(kv_layout))
    times = StreamTimes()
    same_worker = dict(model=model, sender_id=sender_id, chunk_bytes=chunk_bytes, window=window, ttl_s=ttl_s,
                       timeout_s=timeout_s)
    try:
        reserved = await reserve(channel, request_id, prompt, layout, model=model, sender_id=sender_id, ttl_s=ttl_s,
                                 timeout_s=timeout_s)
    except AttemptFailed as e:
        log.warning("Reserve for the streamed KV of %s refused (%s: %s); exporting after the prefill instead",
                    request_id, e.code, e.message)
        times.admitted = time.perf_counter()
        outputs = prefill.adopt(request_id, lambda eng: eng.add_request(request_id, prompt, params, prefill_only=True))
        first = await _first(outputs)
        result = None
        if not first.finished:
            result = await (fallback() if fallback else migrate_or_resume(prefill, channel, request_id, sampling,
                                                                          **same_worker))
        return StreamedMigration(first, result, outputs, False, times)

    tid = reserved.transfer_id
    loop = asyncio.get_running_loop()
    if peer is None:
        packer = ChunkPacker(min(chunk_bytes, reserved.max_chunk_bytes or chunk_bytes), layout.bytes_per_block,
                             layout.num_blocks(len(prompt)), reserved.accepts_block_runs)
        layers: asyncio.Queue = asyncio.Queue()  # at most num_layers items: one request's KV

        def start(engine) -> None:
            engine.add_request(request_id, prompt, params, prefill_only=True)
            stream_layers(engine, request_id, lambda payloads: loop.call_soon_threadsafe(layers.put_nowait, payloads))
    else:
        copies: list[InPlaceStream] = []

        def start(engine) -> None:
            engine.add_request(request_id, prompt, params, prefill_only=True)
            copies.append(stream_in_place(engine, request_id, peer, list(reserved.block_ids), reserved.seq_slot))

    times.admitted = time.perf_counter()
    outputs = prefill.adopt(request_id, start)
    # in place, the engine thread queues the copies during the prefill; they are waited for after the first token
    sending = None if peer else asyncio.ensure_future(
        _send(channel, tid, pack_chunks(tid, layers, layout.num_layers, packer, times), window, timeout_s))
    try:
        first = await _first(outputs)
    except BaseException:
        _cancel(sending)
        await abort_transfer(stub, tid, "the prefill failed")
        raise
    times.first_token = time.perf_counter()
    if first.finished:  # nothing to decode: the prefill engine finished the request
        _cancel(sending)
        await abort_transfer(stub, tid, "the request finished with its first token")
        return StreamedMigration(first, None, outputs, False, times)
    try:
        sent = await (sending or _copied(copies[0], times))
        times.last_ack = time.perf_counter()
        await stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=first.new_token_ids[0], sampling=sampling,
                                           written_in_place=peer is not None), timeout=timeout_s)
    except (grpc.aio.AioRpcError, AttemptFailed, ValueError, RuntimeError) as e:
        code = e.code() if isinstance(e, grpc.aio.AioRpcError) else getattr(e, "code", None)
        detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
        await abort_transfer(stub, tid, detail or str(code))
        log.warning("streamed KV transfer %s of %s failed (%s: %s)", tid, request_id, code, detail)
        if fallback is not None:
            return StreamedMigration(first, await fallback(), outputs, False, times)
        if code in NOT_RETRYABLE:
            await asyncio.wrap_future(prefill.submit(lambda eng: eng.resume_prefilled(request_id)))
            return StreamedMigration(first, None, outputs, False, times)
        # chunks, not in place again: what failed in place would likely fail the same way
        result = await migrate_or_resume(prefill, channel, request_id, sampling, **same_worker, attempts=1)
        return StreamedMigration(first, result, outputs, False, times)
    await asyncio.wrap_future(prefill.submit(lambda eng: eng.release_prefilled(request_id)))
    if peer is None:
        result = TransferResult(tid, 1, layout.total_bytes(len(prompt)), sent,
                                time.perf_counter() - times.admitted, times.last_ack - times.admitted)
    else:
        result = TransferResult(tid, 1, sent, 0, time.perf_counter() - times.admitted,
                                times.last_ack - times.admitted, in_place=True)
    return StreamedMigration(first, result, outputs, True, times)


def _cancel(task: asyncio.Future | None) -> None:
    if task is not None:
        task.cancel()


async def _copied(copies: InPlaceStream, times: StreamTimes) -> int:
    """Bytes written in place, once the copies the prefill step queued are done."""
    written = await asyncio.get_running_loop().run_in_executor(None, copies.wait)
    times.first_send = copies.first_layer_at
    return written


async def _send(channel: grpc.aio.Channel, transfer_id: str, chunks: AsyncIterator[bytes], window: int,
                timeout_s: float) -> int:
    """Opens SendStream only once the first layer is out, so that its deadline does not run during the
    prefill's earlier chunks and its first layer."""
    first = await anext(chunks)

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return await stream_chunks(channel, transfer_id, rest(), window, timeout_s)


async def _first(outputs: AsyncIterator["RequestOutput"]) -> "RequestOutput":
    """The first output of a fresh stream; the stream is closed (aborting the request) if that fails."""
    try:
        return await anext(outputs)
    except BaseException:
        with contextlib.suppress(Exception):
            await outputs.aclose()
        raise
