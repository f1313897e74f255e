"""The prefill worker's side of KV migration: send one prefilled request's KV to a decode worker over gRPC.

    result = await migrate(prefill, channel, request_id, sampling)   # export, Reserve, SendStream, Commit, release
    or migrate_or_resume(...), which on KvTransferFailed decodes the request on the prefill engine instead
    (the caller may first try `migrate` to other decode workers: the request stays held until one succeeds)

One attempt is Reserve (the receiver checks the layout and reserves blocks), SendStream of chunks of at most
min(chunk_bytes, the receiver's max_chunk_bytes) payload bytes, at most `window` chunks unacknowledged (the
receiver's acks are the backpressure: nothing is buffered beyond the window and the one chunk built ahead),
then Commit. Chunks go out in wire form (`kv_wire.py`: each payload a run of consecutive blocks when the
receiver accepts runs, with its crc32), each built on a worker thread while the one before is sent. A failed
attempt is aborted on the receiver (best effort: the receiver aborts on its own errors and its ttl frees the
rest) and retried once; a second failure, or a refusal no retry can fix (INVALID_ARGUMENT: formats differ),
raises KvTransferFailed so the caller can try another decode worker or decode on the prefill engine.

Same-GPU fast path: `open_peer_cache` maps a decode worker's cache when it shares this worker's GPU (OpenCache,
`workers/kv_ipc.py`); `migrate(..., peer=...)` then reserves, copies the blocks device to device into
the reservation and commits with `written_in_place`, with no chunks at all. If that attempt fails it is aborted
and the chunked path runs as usual.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterator

import grpc

from partita.cluster.export_permits import ExportPermits
from partita.cluster.kv_wire import ChunkPacker, encode_chunk, send_stream
from partita.protos.partita.v1 import inference_pb2, kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers.kv_ipc import PeerCache, copy_in_place, device_uuid, open_cache
from partita.workers.kv_migration import CacheTarget, KvExport, KvLayout, begin_export, kv_layout

if TYPE_CHECKING:
    from concurrent.futures import Future

    from partita.cluster.async_engine import AsyncEngine

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 * 2**20  # the receiver's default max_chunk_bytes: fewer, larger messages
NOT_RETRYABLE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED)


class KvTransferFailed(RuntimeError):
    """Every attempt failed; `code` is the last attempt's status (None when it failed on this side)."""

    def __init__(self, message: str, code: grpc.StatusCode | None):
        super().__init__(message)
        self.code = code


@dataclass
class TransferResult:
    transfer_id: str
    attempts: int
    bytes_sent: int  # payload bytes of the successful attempt
    num_chunks: int
    # the successful attempt, Reserve (or its start, when reserved beforehand) to Commit (which waits for the
    # first decode step there)
    seconds: float
    stream_seconds: float = 0.0  # the successful attempt, Reserve to the last chunk's ack: the bytes alone
    in_place: bool = False  # written straight into the receiver's cache (same GPU), no chunks


def build_chunks(transfer_id: str, export: KvExport, chunk_bytes: int, runs: bool) -> Iterator[bytes]:
    """The export's payloads, in order, in chunks of at most chunk_bytes payload bytes each, in wire form;
    runs: payloads may carry several blocks (the receiver's ReserveResponse.accepts_block_runs)."""
    layout = export.layout
    packer = ChunkPacker(chunk_bytes, layout.bytes_per_block, layout.num_blocks(export.num_tokens), runs)
    seq = 0
    for layer, index, data in export.payloads:
        for pieces in packer.add(layer, index, data):
            yield encode_chunk(transfer_id, seq, pieces, False)
            seq += 1
    yield encode_chunk(transfer_id, seq, packer.take(), True)


def reserve_request(request_id: str, prompt_token_ids: list[int], layout: KvLayout, *, model: str, sender_id: str,
                    ttl_s: float) -> pb.ReserveRequest:
    n = len(prompt_token_ids)
    return pb.ReserveRequest(
        request_id=request_id, model=model, format=layout.to_proto(), num_layers=layout.num_layers,
        num_blocks=layout.num_blocks(n), num_tokens=n, bytes_per_block=layout.bytes_per_block,
        expected_total_bytes=layout.total_bytes(n), prompt_token_ids=prompt_token_ids, ttl_s=ttl_s,
        sender_id=sender_id)


class AttemptFailed(Exception):
    def __init__(self, code: grpc.StatusCode | None, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


async def reserve(channel: grpc.aio.Channel, request_id: str, prompt_token_ids: list[int], layout: KvLayout, *,
                  model: str = "", sender_id: str = "", ttl_s: float = 30.0, timeout_s: float = 30.0
                  ) -> pb.ReserveResponse:
    """Reserves blocks for the request's prompt on the decode worker behind `channel`; AttemptFailed if refused."""
    stub = kv_transfer_pb2_grpc.KvTransferStub(channel)
    try:
        return await stub.Reserve(reserve_request(request_id, prompt_token_ids, layout, model=model,
                                                  sender_id=sender_id, ttl_s=ttl_s), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        raise AttemptFailed(e.code(), f"Reserve: {e.details()}") from None


async def _attempt(channel: grpc.aio.Channel, export: KvExport, sampling, *, model: str, sender_id: str,
                   chunk_bytes: int, window: int, ttl_s: float, timeout_s: float,
                   reserved: pb.ReserveResponse | None = None) -> TransferResult:
    stub = kv_transfer_pb2_grpc.KvTransferStub(channel)
    start = time.perf_counter()
    if reserved is None:
        reserved = await reserve(channel, export.request_id, export.prompt_token_ids, export.layout, model=model,
                                 sender_id=sender_id, ttl_s=ttl_s, timeout_s=timeout_s)
    tid = reserved.transfer_id
    try:
        limit = min(chunk_bytes, reserved.max_chunk_bytes or chunk_bytes)
        chunks = build_chunks(tid, export, limit, reserved.accepts_block_runs)
        num_chunks = await stream_chunks(channel, tid, chunks, window, timeout_s)
        streamed = time.perf_counter() - start
        await stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=export.first_token_id,
                                           sampling=sampling), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        await abort_transfer(stub, tid, e.details() or str(e.code()))
        raise AttemptFailed(e.code(), f"transfer {tid}: {e.details()}") from None
    except (AttemptFailed, ValueError) as e:
        await abort_transfer(stub, tid, str(e))
        raise AttemptFailed(getattr(e, "code", None), f"transfer {tid}: {e}") from None
    return TransferResult(tid, 1, export.total_bytes, num_chunks, time.perf_counter() - start, streamed)


async def stream_chunks(channel: grpc.aio.Channel, transfer_id: str, chunks: Iterator[bytes] | AsyncIterator[bytes],
                        window: int, timeout_s: float) -> int:
    """Sends chunks in wire form over SendStream with at most `window` unacknowledged; returns the chunk count.
    The next chunk is made while one is sent: a sync iterator is advanced on a worker thread, an async one in a
    task of its own."""
    call = send_stream(channel)(timeout=timeout_s)
    sent = acked = 0

    async def read_ack() -> None:
        nonlocal acked
        ack = await call.read()
        if ack is grpc.aio.EOF:
            raise AttemptFailed(await call.code(), f"SendStream ended early: {await call.details()}")
        if ack.seq != acked:
            raise AttemptFailed(None, f"ack for chunk {ack.seq}, expected {acked}")
        acked += 1

    async def write(chunk: bytes | None) -> None:
        try:
            await (call.write(chunk) if chunk is not None else call.done_writing())
        except asyncio.InvalidStateError:
            # the receiver ended the stream (a refused chunk) while this one was on its way: its status says why
            raise AttemptFailed(await call.code(), f"SendStream ended early: {await call.details()}") from None

    source = _one_ahead(chunks) if hasattr(chunks, "__anext__") else _built_ahead(chunks)
    async with contextlib.aclosing(source):
        async for chunk in source:
            if sent - acked >= window:
                await read_ack()
            await write(chunk)
            sent += 1
    await write(None)
    while acked < sent:
        await read_ack()
    return sent


async def _built_ahead(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """chunks, each taken from the iterator on a worker thread while the one before is sent (building one is
    crc32 and a bytes join, which release the GIL)."""
    loop = asyncio.get_running_loop()
    pending = loop.run_in_executor(None, next, chunks, None)
    try:
        while (chunk := await asyncio.shield(pending)) is not None:
            pending = loop.run_in_executor(None, next, chunks, None)
            yield chunk
    finally:
        await asyncio.wait([pending])  # the iterator is not closed while a thread still advances it
        pending.exception()  # retrieved: the error being raised, if any, is the consumer's


async def _one_ahead(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """chunks, each next one already being made in a task of its own while the one before is sent."""
    pending = asyncio.ensure_future(_next(chunks))
    try:
        while (chunk := await pending) is not None:
            pending = asyncio.ensure_future(_next(chunks))
            yield chunk
    finally:
        pending.cancel()
        await asyncio.wait([pending])  # chunks is not closed while that task still advances it
        if not pending.cancelled():
            pending.exception()  # retrieved: the error being raised, if any, is the consumer's


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)


async def abort_transfer(stub, transfer_id: str, reason: str) -> None:
    try:
        await stub.Abort(pb.AbortTransferRequest(transfer_id=transfer_id, reason=reason[:500]), timeout=5.0)
    except grpc.aio.AioRpcError as e:  # the receiver's ttl frees the reservation if this does not arrive
        log.warning("Abort of transfer %s failed: %s", transfer_id, e.details())


async def send_kv(channel: grpc.aio.Channel, export: KvExport, sampling: inference_pb2.SamplingParams | None = None,
                  *, model: str = "", sender_id: str = "", chunk_bytes: int = DEFAULT_CHUNK_BYTES, window: int = 4,
                  ttl_s: float = 30.0, timeout_s: float = 30.0, attempts: int = 2,
                  reserved: pb.ReserveResponse | None = None) -> TransferResult:
    """Migrates `export` to the decode worker behind `channel` (module docstring); KvTransferFailed if every
    attempt failed. The caller keeps the prefilled request until this returns (release or resume it then).
    reserved: that worker's reservation for this request, made beforehand (`reserve`), for the first attempt;
    a retry reserves anew."""
    if window < 1 or chunk_bytes < 1 or attempts < 1:
        raise ValueError(f"window={window}, chunk_bytes={chunk_bytes}, attempts={attempts}: each must be >= 1")
    last: AttemptFailed | None = None
    for attempt in range(1, attempts + 1):
        given, reserved = reserved, None
        try:
            result = await _attempt(channel, export, sampling, model=model, sender_id=sender_id,
                                    chunk_bytes=chunk_bytes, window=window, ttl_s=ttl_s, timeout_s=timeout_s,
                                    reserved=given)
        except AttemptFailed as e:
            last = e
            log.warning("KV transfer of %s, attempt %d of %d failed: %s", export.request_id, attempt, attempts,
                        e.message)
            if e.code in NOT_RETRYABLE:
                break
            continue
        result.attempts = attempt
        return result
    raise KvTransferFailed(f"KV transfer of {export.request_id!r} failed: {last.message}", last.code)


async def open_peer_cache(prefill: "AsyncEngine", channel: grpc.aio.Channel, *, sender_id: str = "",
                          timeout_s: float = 30.0) -> PeerCache | None:
    """The cache of the decode worker behind `channel` mapped into this process, when it is on this worker's GPU;
    None when it is not (or this worker is not on a GPU, or the receiver or CUDA refuses)."""
    uuid = await asyncio.wrap_future(prefill.submit(device_uuid))
    if not uuid:
        return None
    layout = await asyncio.wrap_future(prefill.submit(kv_layout))
    stub = kv_transfer_pb2_grpc.KvTransferStub(channel)
    try:
        response = await stub.OpenCache(pb.OpenCacheRequest(format=layout.to_proto(), device_uuid=uuid,
                                                             sender_id=sender_id), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        log.info("no same-GPU KV path to this decode worker (%s: %s); sending chunks", e.code(), e.details())
        return None
    try:
        return await asyncio.wrap_future(prefill.submit(lambda e: open_cache(e, response)))
    except Exception as e:  # noqa: BLE001 - e.g. CUDA IPC not permitted here: the chunked path still works
        log.warning("mapping the decode worker's KV cache failed (%s); sending chunks", e)
        return None


async def _attempt_in_place(prefill: "AsyncEngine", channel: grpc.aio.Channel, request_id: str, peer: PeerCache,
                            sampling, *, model: str = "", sender_id: str = "", ttl_s: float = 30.0,
                            timeout_s: float = 30.0, reserved: pb.ReserveResponse | None = None,
                            **_chunking) -> TransferResult:
    """One same-GPU attempt (module docstring); send_kv's defaults, and its chunking options do not apply."""
    start = time.perf_counter()

    def describe(engine):
        seq = engine.prefilled_sequence(request_id)
        return list(seq.token_ids[:seq.num_prompt_tokens]), kv_layout(engine)

    def copy(engine):  # the first token is read in the same visit to the engine thread as the copy
        seq = engine.prefilled_sequence(request_id)
        first_token = seq.token_ids[seq.num_prompt_tokens]
        return first_token, copy_in_place(engine, request_id, peer, list(reserved.block_ids), reserved.seq_slot)

    if reserved is None:
        prompt, layout = await asyncio.wrap_future(prefill.submit(describe))
        reserved = await reserve(channel, request_id, prompt, layout, model=model, sender_id=sender_id, ttl_s=ttl_s,
                                 timeout_s=timeout_s)
    stub = kv_transfer_pb2_grpc.KvTransferStub(channel)
    tid = reserved.transfer_id
    try:
        first_token, written = await asyncio.wrap_future(prefill.submit(copy))
        copied = time.perf_counter() - start
        await stub.Commit(pb.CommitRequest(transfer_id=tid, first_token_id=first_token, sampling=sampling,
                                           written_in_place=True), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        await abort_transfer(stub, tid, e.details() or str(e.code()))
        raise AttemptFailed(e.code(), f"transfer {tid} in place: {e.details()}") from None
    except Exception as e:  # noqa: BLE001 - a failed device copy: the chunked path still works
        await abort_transfer(stub, tid, str(e))
        raise AttemptFailed(None, f"transfer {tid} in place: {e}") from None
    return TransferResult(tid, 1, written, 0, time.perf_counter() - start, copied, in_place=True)


async def migrate(prefill: "AsyncEngine", channel: grpc.aio.Channel, request_id: str,
                  sampling: inference_pb2.SamplingParams | None = None, *, peer: PeerCache | None = None,
                  exports: ExportPermits | None = None, source: CacheTarget | None = None,
                  begun: Future[KvExport] | None = None, reserved: pb.ReserveResponse | None = None,
                  **send_kwargs) -> TransferResult:
    """For a prefill-only request held on `prefill` after its first token: moves its KV to the decode worker behind
    `channel` (in place when `peer` maps its cache, else exported and sent in chunks) and releases it here. Raises
    KvTransferFailed when that failed; the request is then still held, for another decode worker or for
    `resume_prefilled`. exports: a permit held from the export to the end of the send (host memory), when given.
    source: `cache_target` of the prefill engine, read once (else per export). begun: the request's export,
    begun already (`begin_export`) with a permit of `exports` taken for it; this call gives that permit back.
    reserved: the decode worker's reservation for the request, made beforehand (`reserve`), for the first
    attempt; it is used or aborted."""
    if begun is not None and peer is not None:
        exports.release()  # the KV goes device to device: the early export is not needed
        begun = None
    try:
        if peer is not None:
            given, reserved = reserved, None  # the attempt uses it or aborts it
            try:
                result = await _attempt_in_place(prefill, channel, request_id, peer, sampling, reserved=given,
                                                 **send_kwargs)
            except AttemptFailed as e:
                log.warning("same-GPU KV transfer of %s failed (%s); sending chunks instead", request_id, e.message)
            else:
                await asyncio.wrap_future(prefill.submit(lambda eng: eng.release_prefilled(request_id)))
                return result
        if begun is None and exports is not None:
            await exports.take()
        try:
            if begun is None:
                begun = await asyncio.wrap_future(prefill.submit(lambda e: begin_export(e, request_id, source)))
            export = await asyncio.wrap_future(begun)  # the copies to the host end off the engine thread
            given, reserved = reserved, None
            result = await send_kv(channel, export, sampling, reserved=given, **send_kwargs)
            del export, begun  # the host copies go with the permit, not when this frame ends
        finally:
            if exports is not None:
                exports.release()
    except BaseException:
        if reserved is not None:  # never handed to an attempt: freed now rather than at its ttl
            await asyncio.shield(abort_transfer(kv_transfer_pb2_grpc.KvTransferStub(channel), reserved.transfer_id,
                                                "the transfer did not start"))
        raise
    await asyncio.wrap_future(prefill.submit(lambda eng: eng.release_prefilled(request_id)))
    return result


async def migrate_or_resume(prefill: "AsyncEngine", channel: grpc.aio.Channel, request_id: str,
                            sampling: inference_pb2.SamplingParams | None = None, *, peer: PeerCache | None = None,
                            **send_kwargs) -> TransferResult | None:
    """`migrate`; if the transfer fails, resumes the request on `prefill` (colocated decode) and returns None."""
    try:
        return await migrate(prefill, channel, request_id, sampling, peer=peer, **send_kwargs)
    except KvTransferFailed as e:
        log.warning("%s; decoding %s on the prefill worker instead", e, request_id)
        await asyncio.wrap_future(prefill.submit(lambda eng: eng.resume_prefilled(request_id)))
        return None
