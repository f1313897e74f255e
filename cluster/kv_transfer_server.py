"""The decode worker's side of KV migration: a `partita.v1.KvTransfer` servicer over an `AsyncEngine`.

Per transfer (protos/partita/v1/kv_transfer.proto):
    Reserve   checks the sender's layout against this engine's (`workers/kv_migration.py`: same format,
              options, shapes and fp8 scales, else INVALID_ARGUMENT) and the announced sizes, then reserves
              blocks and a sequence slot on the engine thread (RESOURCE_EXHAUSTED when there is no room).
    Send /    chunks numbered 0, 1, ...; each payload (one block, a run of consecutive blocks of one layer, or a
    SendStream layer's state) checked (layer, block indexes, none seen before, exact size, crc32 on a worker
              thread, where the write is also staged: `workers/kv_import.py`) and written into the reserved
              blocks from that thread, on the engine's CUDA stream, while the engine steps its other sequences
              (state payloads are kept for Commit). Any failure aborts the transfer and frees its blocks at once:
              a partial or corrupt transfer is never used.
              SendStream acknowledges every chunk, so the sender bounds what is in flight; a SendStream
              that ends before a chunk marked is_last (the sender died or cancelled) frees the transfer.
    Commit    only when every expected payload arrived (else FAILED_PRECONDITION, and the transfer is
              aborted); the request joins the engine's running set after its first token, and its outputs go
              to `on_commit`.
    OpenCache the same-GPU fast path (`workers/kv_ipc.py`): CUDA IPC handles of this engine's cache, only for a
              sender that names this GPU and this layout (FAILED_PRECONDITION otherwise). Such a sender writes
              the reserved blocks itself and commits with `written_in_place`, which is accepted only after an
              OpenCache and only for a transfer that received no chunks.
    Abort     frees the reservation.
A reaper frees reservations not committed within their ttl. The engine is not thread-safe: every engine
mutation goes through `AsyncEngine.submit`/`adopt`, which run it on the engine thread between steps; the
transfer table is touched on the event loop only. Block writes are not engine mutations: until Commit a
reservation's blocks are its own, and nothing reads them. They used to run on the engine thread too, each
waiting for the step in progress to end: with two chunks of a stream in flight, a 1k-token int4 prompt of
Llama-3-8B (nine 4 MiB chunks) waited for five decode steps. A transfer's lock orders them against its end: a
write is queued under the lock only while the transfer is open, and Commit and every free close it under the
lock (on the engine thread, before the engine uses or frees the blocks), so no write starts after the blocks
changed hands; on CUDA the engine's stream then runs whatever it queues after the writes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, NamedTuple

import grpc
import torch

from partita.cluster.auth import GrpcTokenAuthInterceptor
from partita.cluster.grpc_server import sampling_from_proto
from partita.cluster.host_memory import retain_freed_buffers
from partita.cluster.kv_receive import Block, ChunkPipeline, add_kv_transfer_servicer, check_chunk, first_bad_crc
from partita.cluster.kv_wire import WireChunk
from partita.protos.partita.v1 import kv_transfer_pb2 as pb, kv_transfer_pb2_grpc
from partita.workers.engine.sequence import Sequence
from partita.workers.errors import InvalidRequestError, KvCapacityError
from partita.workers.kv_ipc import device_uuid, share_cache
from partita.workers.kv_import import StagedWrite, prepare_writes, stage_payloads, write_states
from partita.workers.kv_migration import CacheTarget, KvLayout, KvLayoutMismatch, cache_target

if TYPE_CHECKING:
    from partita.cluster.async_engine import AsyncEngine
    from partita.workers import Engine, RequestOutput

log = logging.getLogger(__name__)

KV_TRANSFER_SERVICE = "partita.v1.KvTransfer"
DEFAULT_MAX_CHUNK_BYTES = 4 * 2**20
PIPELINE_DEPTH = 2  # chunks of one stream being checksummed and written while the next one is read
OnCommit = Callable[[str, AsyncIterator["RequestOutput"]], None]


class TransferError(Exception):
    """Ends an RPC with `code`; the transfer it names has been aborted already."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Transfer:
    transfer_id: str
    request_id: str
    seq: Sequence  # read and written on the engine thread only
    block_ids: list[int]  # seq's blocks, copied at Reserve, for staging writes off the engine thread
    num_tokens: int
    layout: KvLayout
    deadline: float
    received: set[tuple[int, int]] = field(default_factory=set)  # (layer, block_index); the state: num_blocks
    next_seq: int = 0
    bytes_received: int = 0
    sending: bool = False  # a Send/SendStream is running: a second one is refused
    error: TransferError | None = None  # why a stage of receiving dropped it, if that is how it ended
    lock: threading.Lock = field(default_factory=threading.Lock)  # block writes against closing (module docstring)
    closed: bool = False  # committed or freed: no more writes
    states: list[StagedWrite] = field(default_factory=list)  # state payloads, written at Commit

    def close(self) -> None:
        """Waits for a block write being queued, and lets no other start; on the engine thread, before its
        blocks are used or freed."""
        with self.lock:
            self.closed = True

    @property
    def num_expected(self) -> int:
        per_layer = self.layout.num_blocks(self.num_tokens) + (1 if self.layout.state_bytes(self.num_tokens) else 0)
        return self.layout.num_layers * per_layer

    @property
    def complete(self) -> bool:
        return len(self.received) == self.num_expected


@dataclass
class _Incoming:
    """One Send/SendStream: its transfer (known from the first chunk) and whether the last chunk came."""

    t: _Transfer | None = None
    saw_last: bool = False


class _Admitted(NamedTuple):
    """A chunk past the first stage of receiving (`_admit`), for the second (`_store`) and its ack."""

    t: _Transfer
    seq: int
    blocks: list[Block]
    bytes_received: int  # the transfer's, this chunk included


class KvTransferServicer(kv_transfer_pb2_grpc.KvTransferServicer):
    """Receives migrated KV into `engine` (module docstring). on_commit(request_id, outputs) takes the decode
    outputs of each committed request (default: drained and dropped, so the request still runs to its end)."""

    def __init__(self, engine: "AsyncEngine", *, model_name: str = "", max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                 default_ttl_s: float = 30.0, max_ttl_s: float = 600.0, on_commit: OnCommit | None = None):
        self._engine = engine
        self._model_name = model_name
        self.max_chunk_bytes = max_chunk_bytes
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s
        self._on_commit = on_commit or self._drain
        self._layout: KvLayout | None = None
        self._target: CacheTarget | None = None
        self._stream: torch.cuda.Stream | None = None  # the engine's, on CUDA: block writes are queued on it
        self.transfers: dict[str, _Transfer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._reaper: asyncio.Task | None = None
        self._cache_shared = False  # an OpenCache was answered: written_in_place commits are possible

    async def _run(self, fn: Callable[["Engine"], object]) -> object:
        return await asyncio.wrap_future(self._engine.submit(fn))

    async def cache_layout(self) -> KvLayout:
        """The engine's KV layout and where its cache parts are, read once on the engine thread, which also
        compiles the write's kernels then (`prepare_writes`)."""
        if self._layout is None:
            self._layout, self._target, self._stream = await self._run(_layout_and_target)
        return self._layout

    # --- Reserve --------------------------------------------------------------------------------------
    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReserveResponse:
        try:
            return await self._reserve(request)
        except TransferError as e:
            await context.abort(e.code, e.message)

    async def _reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        layout = await self.cache_layout()
        if self._model_name and request.model and request.model != self._model_name:
            raise TransferError(bad, f"model: this worker serves {self._model_name!r}, not {request.model!r}")
        try:
            layout.check_compatible(request.format)
        except KvLayoutMismatch as e:
            raise TransferError(bad, f"format: {e}") from None
        n = request.num_tokens
        if n == 0 or len(request.prompt_token_ids) != n:
            raise TransferError(bad, f"num_tokens: {n}, with {len(request.prompt_token_ids)} prompt_token_ids")
        for name, got, want in (("num_layers", request.num_layers, layout.num_layers),
                                ("num_blocks", request.num_blocks, layout.num_blocks(n)),
                                ("bytes_per_block", request.bytes_per_block, layout.bytes_per_block),
                                ("expected_total_bytes", request.expected_total_bytes, layout.total_bytes(n))):
            if got != want:
                raise TransferError(bad, f"{name}: {got}, this worker expects {want} for {n} tokens")
        if layout.bytes_per_block > self.max_chunk_bytes:
            raise TransferError(bad, f"bytes_per_block: {layout.bytes_per_block} exceeds the chunk limit "
                                     f"{self.max_chunk_bytes}")
        prompt = list(request.prompt_token_ids)
        ttl = min(request.ttl_s or self._default_ttl_s, self._max_ttl_s)

        def reserve(engine: "Engine") -> tuple[_Transfer, pb.ReserveResponse]:
            seq = engine.reserve_migrated(request.request_id, prompt)
            block_ids = seq.block_table[:layout.num_blocks(n)]
            t = _Transfer(uuid.uuid4().hex, request.request_id, seq, block_ids, n, layout, time.monotonic() + ttl)
            return t, pb.ReserveResponse(transfer_id=t.transfer_id, max_chunk_bytes=self.max_chunk_bytes,
                                         block_ids=block_ids, seq_slot=seq.kv_slot,
                                         accepts_block_runs=True)

        reserving = asyncio.wrap_future(self._engine.submit(reserve))
        try:
            t, response = await asyncio.shield(reserving)
        except asyncio.CancelledError:
            # the caller went away (deadline, cancel) while the engine thread reserved: blocks it got are freed
            # as soon as they exist, instead of leaking with no transfer to reap them
            reserving.add_done_callback(self._free_orphan)
            raise
        except KvCapacityError as e:
            raise TransferError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except InvalidRequestError as e:
            raise TransferError(bad, str(e)) from None
        self.transfers[t.transfer_id] = t
        return response

    def _free_orphan(self, reserving: asyncio.Future) -> None:
        if not reserving.cancelled() and reserving.exception() is None:
            t, _ = reserving.result()
            self._spawn(self._run(lambda e: e.abort_reserved(t.request_id)))

    # --- Send / SendStream ----------------------------------------------------------------------------
    async def Send(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.SendSummary:
        incoming, pipeline = self._receiver(request_iterator)
        try:
            async for _ in pipeline.stored():
                pass
        except (TransferError, ValueError) as e:
            await context.abort(*_status(e))
        finally:
            self._end_stream(incoming, pipeline.close(), free_unfinished=False)
        t = incoming.t
        if t is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunks: the stream was empty")
        return pb.SendSummary(transfer_id=t.transfer_id, num_chunks=t.next_seq, bytes_received=t.bytes_received,
                              num_blocks_written=len(t.received))

    async def SendStream(self, request_iterator, context: grpc.aio.ServicerContext):
        incoming, pipeline = self._receiver(request_iterator)
        try:
            async for chunk in pipeline.stored():
                yield pb.KvAck(transfer_id=chunk.t.transfer_id, seq=chunk.seq, bytes_received=chunk.bytes_received)
        except (TransferError, ValueError) as e:
            await context.abort(*_status(e))
        finally:
            # a stream that broke before its last chunk (the sender crashed or cancelled; a cancel reads here as
            # a plain end of stream) frees its transfer now rather than at the ttl
            self._end_stream(incoming, pipeline.close(), free_unfinished=True)

    def _receiver(self, chunks: AsyncIterator[WireChunk]) -> tuple[_Incoming, ChunkPipeline]:
        incoming = _Incoming()
        return incoming, ChunkPipeline(chunks, lambda chunk: self._admit(incoming, chunk), self._store, PIPELINE_DEPTH)

    def _end_stream(self, incoming: _Incoming, unstored: bool, free_unfinished: bool) -> None:
        """A stream ended: its transfer takes Sends again, or is freed when a chunk it admitted was not stored,
        or (free_unfinished) when the chunk marked is_last never came."""
        t = incoming.t
        if t is None:
            return
        t.sending = False
        if t.transfer_id in self.transfers and (unstored or (free_unfinished and not incoming.saw_last)):
            log.warning("transfer %s of %s: the stream ended before all its chunks were stored; freeing it",
                        t.transfer_id, t.request_id)
            self._spawn(self._fail(t))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _admit(self, incoming: _Incoming, chunk: WireChunk) -> _Admitted:
        """The first stage of receiving a chunk (`kv_receive.py`): finds its transfer and checks everything but
        the checksums (`check_chunk`); its blocks then count as received (the stream's end frees the transfer if
        they are not stored after all). Any failure aborts the transfer (TransferError)."""
        t = incoming.t
        if t is None:
            t = self.transfers.get(chunk.transfer_id)
            if t is None:
                raise TransferError(grpc.StatusCode.NOT_FOUND, f"transfer_id: {chunk.transfer_id!r} is not reserved "
                                                               f"(unknown, aborted, committed or expired)")
            if t.sending:
                raise TransferError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"transfer {t.transfer_id}: another Send is in progress")
            t.sending = True
            incoming.t = t
        elif chunk.transfer_id != t.transfer_id or t.transfer_id not in self.transfers:
            raise await self._fail(t, TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"transfer_id: "
                                                    f"{chunk.transfer_id!r} in a stream of {t.transfer_id!r}, or the "
                                                    f"transfer expired"))
        blocks = [(b.layer, b.block_index, max(b.num_blocks, 1), b.data, b.crc32) for b in chunk.blocks]
        problem = check_chunk(chunk.seq, t.next_seq, blocks, self.max_chunk_bytes, t.layout, t.num_tokens, t.received)
        if problem is not None:
            raise await self._fail(t, TransferError(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {t.transfer_id} chunk "
                                                    f"{chunk.seq}: {problem}; the transfer is aborted"))
        t.received.update((layer, i) for layer, index, count, _, _ in blocks for i in range(index, index + count))
        t.bytes_received += sum(len(data) for _, _, _, data, _ in blocks)
        t.next_seq += 1
        incoming.saw_last = chunk.is_last
        return _Admitted(t, chunk.seq, blocks, t.bytes_received)

    async def _store(self, chunk: _Admitted) -> None:
        """The second stage, on a worker thread: the checksums, the write staged (`stage_payloads`) and the
        block runs written (module docstring); state payloads are kept for Commit. The engine thread, which
        also runs decode steps, does none of it. Any failure aborts the transfer (TransferError)."""
        t, seq = chunk.t, chunk.seq
        payloads = [(layer, index, data) for layer, index, _, data, _ in chunk.blocks]

        def check_stage_and_write() -> tuple[int, int] | None:
            bad = first_bad_crc(chunk.blocks)
            if bad is not None:
                return bad
            staged = stage_payloads(self._target, t.block_ids, t.num_tokens, payloads, t.layout)
            if staged.write_blocks is not None:
                with t.lock:
                    if t.closed:
                        raise RuntimeError(f"transfer {t.transfer_id} was aborted before its chunk {seq} was written")
                    with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
                        staged.write_blocks()
            if staged.states:
                t.states.append(staged)
            return None

        try:
            bad = await asyncio.get_running_loop().run_in_executor(None, check_stage_and_write)
        except Exception as e:  # noqa: BLE001 - the transfer is dropped whatever went wrong
            raise await self._fail(t, TransferError(grpc.StatusCode.INTERNAL,
                                                    f"chunk {seq}: writing the KV failed: {e}")) from None
        if bad is not None:
            raise await self._fail(t, TransferError(grpc.StatusCode.DATA_LOSS, f"transfer {t.transfer_id} chunk {seq}: "
                                                    f"crc32 mismatch in payload (layer {bad[0]}, block {bad[1]}); the "
                                                    f"transfer is aborted"))

    # --- Commit / Abort / expiry ----------------------------------------------------------------------
    async def Commit(self, request: pb.CommitRequest, context: grpc.aio.ServicerContext) -> pb.CommitResponse:
        t = self.transfers.get(request.transfer_id)
        if t is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"transfer_id: {request.transfer_id!r} is not reserved")
        if request.written_in_place and (not self._cache_shared or t.received or t.sending):
            await self._fail(t)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"transfer {t.transfer_id}: written_in_place needs an OpenCache first and no chunks "
                                f"sent ({len(t.received)} received); the transfer is aborted")
        if not request.written_in_place and (t.sending or not t.complete):
            await self._fail(t)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"transfer {t.transfer_id}: {len(t.received)} of {t.num_expected} blocks and states "
                                f"received{' and a Send still running' if t.sending else ''}; the transfer is aborted")
        try:
            params = sampling_from_proto(request.sampling) if request.HasField("sampling") else None
        except (InvalidRequestError, ValueError) as e:
            await self._fail(t)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
        del self.transfers[t.transfer_id]  # from here the request belongs to the engine

        def commit(engine: "Engine") -> None:
            t.close()
            for staged in t.states:
                write_states(engine, t.seq, staged)
            engine.commit_migrated(t.request_id, request.first_token_id, params)

        outputs = self._engine.adopt(t.request_id, commit)
        try:
            first = await anext(outputs)
        except InvalidRequestError as e:
            await self._run(lambda eng: eng.abort_reserved(t.request_id))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._on_commit(t.request_id, _Prepended(first, outputs))
        return pb.CommitResponse(transfer_id=t.transfer_id, request_id=t.request_id)

    async def Abort(self, request: pb.AbortTransferRequest, context) -> pb.AbortTransferResponse:
        t = self.transfers.get(request.transfer_id)
        if t is not None:
            log.info("transfer %s of %s aborted by the sender: %s", t.transfer_id, t.request_id, request.reason)
            await self._fail(t)
        return pb.AbortTransferResponse(transfer_id=request.transfer_id, was_reserved=t is not None)

    # --- OpenCache (same-GPU fast path) -----------------------------------------------------------------
    async def OpenCache(self, request: pb.OpenCacheRequest, context: grpc.aio.ServicerContext) -> pb.OpenCacheResponse:
        try:
            (await self.cache_layout()).check_compatible(request.format)
        except KvLayoutMismatch as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"format: {e}")
        mine = await self._run(device_uuid)
        if not mine or request.device_uuid != mine:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"device_uuid: this worker's cache is on {mine or 'the CPU'}, not on the sender's GPU "
                                f"{request.device_uuid or '(none named)'}; send the KV in chunks instead")
        response = await self._run(share_cache)
        self._cache_shared = True
        log.info("KV cache shared in place with %s (same GPU %s)", request.sender_id or "a sender", mine)
        return response

    async def _fail(self, t: _Transfer, error: TransferError | None = None) -> TransferError | None:
        """Drops the transfer and frees its reservation (idempotent); returns the error of its first failure, or
        `error` when there was none: with a stream's chunks in two stages at once, a later chunk's failure is often
        only a consequence of an earlier one (its write found the blocks freed), and the first one is reported."""
        if self.transfers.pop(t.transfer_id, None) is not None:
            t.error = error

            def free(engine: "Engine") -> None:
                t.close()
                engine.abort_reserved(t.request_id)
            # shielded: a cancelled caller (a stream's store cancelled at its end) must not cancel the free itself
            await asyncio.shield(self._run(free))
        return t.error or error

    async def drop_request(self, request_id: str) -> None:
        """Frees the reservations of `request_id` (an earlier attempt of a request being run again here)."""
        for t in [t for t in self.transfers.values() if t.request_id == request_id]:
            log.warning("transfer %s of %s dropped: the request runs again here", t.transfer_id, request_id)
            await self._fail(t)

    async def reap_expired(self) -> int:
        """Frees every reservation past its ttl; returns how many."""
        now = time.monotonic()
        expired = [t for t in self.transfers.values() if t.deadline <= now]
        for t in expired:
            log.warning("transfer %s of %s expired before its commit; freeing it", t.transfer_id, t.request_id)
            await self._fail(t)
        return len(expired)

    def start_reaper(self, interval_s: float = 1.0) -> None:
        """Runs reap_expired every interval_s on the running event loop until `close`."""
        async def reap() -> None:
            while True:
                await asyncio.sleep(interval_s)
                await self.reap_expired()

        self._reaper = asyncio.get_running_loop().create_task(reap())

    def close(self) -> None:
        """Stops the reaper (call after the server stopped)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    def _drain(self, request_id: str, outputs: AsyncIterator["RequestOutput"]) -> None:
        async def drain() -> None:
            async with contextlib.aclosing(outputs):
                async for _ in outputs:
                    pass

        self._spawn(drain())


def _status(e: TransferError | ValueError) -> tuple[grpc.StatusCode, str]:
    """A failed Send's status: the TransferError's, or INVALID_ARGUMENT for a chunk `decode_chunk` could not read."""
    return (e.code, e.message) if isinstance(e, TransferError) else (grpc.StatusCode.INVALID_ARGUMENT, f"chunk: {e}")


class _Prepended:
    """first, then rest. Closing it closes rest (which aborts an unfinished request) also before the first item
    was taken: an async generator closed before it started never runs its body, so a committed request that
    nobody followed would have run on, its stream held in the engine after its end."""

    def __init__(self, first: "RequestOutput", rest: AsyncIterator["RequestOutput"]):
        self._first: "RequestOutput | None" = first
        self._rest = rest
        self._ended = first.finished

    def __aiter__(self) -> "_Prepended":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._first is not None:
            first, self._first = self._first, None
            return first
        if self._ended:
            await self.aclose()
            raise StopAsyncIteration
        return await anext(self._rest)

    async def aclose(self) -> None:
        await self._rest.aclose()


def _layout_and_target(engine: "Engine") -> tuple[KvLayout, CacheTarget, torch.cuda.Stream | None]:
    target = cache_target(engine)
    prepare_writes(target)
    return target.layout, target, torch.cuda.current_stream(target.device) if target.device.type == "cuda" else None


async def start_kv_transfer_server(engine: "AsyncEngine", *, host: str = "127.0.0.1", port: int = 0,
                                   reaper_interval_s: float = 1.0, api_key: str | None = None,
                                   retain_buffers: bool = True,
                                   **servicer_kwargs) -> tuple[grpc.aio.Server, int, KvTransferServicer]:
    """A started grpc.aio server with the KvTransfer service on host:port (0 picks a free port), its message
    limit just above the servicer's max_chunk_bytes, and the ttl reaper running; returns (server, port,
    servicer). api_key: when set, every call must carry `authorization: Bearer <api_key>` (UNAUTHENTICATED
    otherwise). retain_buffers: this process's malloc keeps freed chunk-sized buffers for the next chunks
    (`host_memory.retain_freed_buffers`, process-wide) rather than faulting fresh pages in for each. Stop with
    `await server.stop(grace)` then `servicer.close()`."""
    servicer = KvTransferServicer(engine, **servicer_kwargs)
    await servicer.cache_layout()  # now, not in the first Reserve, which would wait for the kernel compiles
    limit = servicer.max_chunk_bytes + 2**16  # room for the chunk's framing beside its payload bytes
    if retain_buffers:
        retain_freed_buffers(limit)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)],
                             interceptors=[GrpcTokenAuthInterceptor(api_key)] if api_key else None)
    add_kv_transfer_servicer(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    servicer.start_reaper(reaper_interval_s)
    return server, bound, servicer
