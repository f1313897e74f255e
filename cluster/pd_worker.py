"""The prefill and decode roles of a worker actor (prefill/decode disaggregation, issue 9).

A PD request crosses two workers:

    prefill worker   PrefillSide.run: the request runs prefill_only, the decode worker the router chose
                     reserving its blocks meanwhile (`EarlyReservation`); its first token is yielded at once; its
                     KV then migrates over gRPC to that decode worker (`migrate`,
                     cluster/kv_transfer_client.py), or, when that worker shares this worker's GPU and
                     `kv_transfer.same_gpu` allows, is copied device to device into its reserved blocks
                     (CUDA IPC, workers/kv_ipc.py; gRPC then carries only Reserve and Commit). When the
                     transfer fails (decode worker dead, full, or of another format) the next decode worker
                     the router offered is tried. On success the stream ends with a `Migrated` marker naming
                     the KV address of the decode worker that took it; when none did, the request decodes
                     here instead and the stream carries its outputs to the end, so the caller sees one
                     complete stream either way.
    decode worker    DecodeSide: serves KvTransfer (cluster/kv_transfer_server.py) on its node; a committed
                     request's outputs wait, buffered by the engine's own per-request stream, until the
                     router calls `follow(request_id)` after the marker. A committed request nobody follows
                     within `follow_timeout_s` is aborted, so that its KV blocks come back.

Everything between the actors travels as Ray stream values (RequestOutput, Migrated, WorkerError) and the KV
as protobuf over gRPC; nothing is pickled on a user-reachable boundary.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

import grpc

from partita.cluster.auth import bearer_token_interceptors
from partita.cluster.early_reservation import EarlyReservation
from partita.cluster.export_permits import ExportPermits
from partita.cluster.grpc_server import sampling_to_proto
from partita.cluster.kv_stream_client import prefill_and_migrate
from partita.cluster.host_memory import retain_freed_buffers
from partita.cluster.kv_transfer_client import (DEFAULT_CHUNK_BYTES, KvTransferFailed, TransferResult, migrate,
                                                open_peer_cache)
from partita.cluster.kv_transfer_server import start_kv_transfer_server
from partita.workers.errors import InvalidRequestError
from partita.workers.kv_migration import CacheTarget, KvExport, begin_export, cache_target, prepare_exports

if TYPE_CHECKING:
    from concurrent.futures import Future

    from partita.cluster.async_engine import AsyncEngine
    from partita.protos.partita.v1 import kv_transfer_pb2 as pb
    from partita.workers.kv_ipc import PeerCache
    from partita.workers import Engine, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

FOLLOW_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Migrated:
    """The last value of a prefill stream whose KV now lives on the decode worker at `decode_address`."""

    request_id: str
    decode_address: str
    kv_format: str
    bytes_sent: int
    seconds: float  # the transfer: Reserve (or the first chunk, when reserved during the prefill) to Commit
    streamed: bool = False  # sent layer by layer under the prefill (kv_transfer.stream_layers)
    in_place: bool = False  # copied into the decode worker's cache on the shared GPU (kv_transfer.same_gpu)
    # the first token's output here to the Commit's answer: what the client waits for between its first and
    # second token on this side (the export's permit and queueing, the export, the transfer); 0 when streamed,
    # where the first token follows the commit
    handoff_seconds: float = 0.0
    # the transfer's start to the last chunk's ack (or the end of the copy in place): the bytes alone; the rest of
    # `seconds` is Commit, which answers after the decode worker's first step of the request
    stream_seconds: float = 0.0


class NotCommittedError(RuntimeError):
    """follow() waited in vain: the request was never committed to this decode worker."""


class PrefillSide:
    """Runs requests prefill-only on `engine` and migrates them (module docstring); kv_format: the engine's
    KV format's name, for the router's migration metrics."""

    def __init__(self, engine: "AsyncEngine", worker_id: str, model_name: str, kv_format: str, *,
                 auth_token: str | None = None, stream_layers: bool = False, same_gpu: bool = True,
                 max_exports: int = 4):
        self._engine = engine
        self._stream_layers = stream_layers
        self._same_gpu = same_gpu
        self._exports = ExportPermits(max_exports)  # KvTransferSpec.max_exports
        self._peers: dict[str, "PeerCache | None"] = {}  # decode address -> its cache mapped here (same GPU)
        self._worker_id = worker_id
        self._model_name = model_name
        self._kv_format = kv_format
        self._interceptors = bearer_token_interceptors(auth_token) if auth_token else []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._source: CacheTarget | None = None  # where the engine's cache is, read once by `start`
        self._tasks: set[asyncio.Future] = set()  # unclaimed early reservations being aborted
        retain_freed_buffers(DEFAULT_CHUNK_BYTES)  # each chunk sent is a new joined buffer of that size

    async def start(self) -> None:
        """Reads where the engine's cache is and compiles the exports' gather, on the engine thread, before the
        first request (otherwise the first export compiles it, and every export reads the cache's layout)."""
        def prepare(engine: "Engine") -> CacheTarget:
            target = cache_target(engine)
            prepare_exports(target)
            return target
        self._source = await asyncio.wrap_future(self._engine.submit(prepare))

    async def run(self, request_id: str, prompt: str | list[int], params: "SamplingParams",
                  decode_addresses: list[str]) -> AsyncIterator["RequestOutput | Migrated"]:
        """First token, then Migrated, or the local decode's outputs when the migration failed. decode_addresses:
        the decode workers to try, in order (the router's choice first); the first that takes the KV is named in
        Migrated. Raises InvalidRequestError (bad input) and EngineUnavailableError like AsyncEngine.generate."""
        if not decode_addresses:
            raise InvalidRequestError("decode_addresses", "a PD request needs at least one decode worker")
        landed = list(decode_addresses[:1])  # where the KV went: set by _migrate when it tried others
        fallback = functools.partial(self._migrate, request_id, params, decode_addresses, landed)
        if self._stream_layers:
            async for item in self._run_streamed(request_id, prompt, params, decode_addresses[0], fallback, landed):
                yield item
            return
        early: list = []  # the export begun in the step that holds the request, or why it could not begin
        export_early = self._may_export_early(decode_addresses[0])
        reservation = EarlyReservation(self._channel(decode_addresses[0]), request_id, self._source.layout,
                                       model=self._model_name, sender_id=self._worker_id, spawn=self._keep) \
            if self._source is not None else None

        def start(engine: "Engine") -> None:
            engine.add_request(request_id, prompt, params, prefill_only=True)
            if export_early:
                engine.on_held(request_id, lambda seq: self._export_early(engine, request_id, early))
            if reservation is not None:
                engine.on_scheduled(request_id,
                                    lambda seq: reservation.begin(seq.token_ids[:seq.num_prompt_tokens]))

        stream = self._engine.adopt(request_id, start)
        async with contextlib.aclosing(stream):
            try:
                first = await anext(stream)
                first_at = time.perf_counter()
                yield first
                if first.finished:
                    return
                try:
                    reserved = await reservation.claim() if reservation is not None else None
                    result = await fallback(self._claim_early(early), reserved)
                except InvalidRequestError:
                    # aborted while held: the engine no longer has it; its stream ends with the abort output
                    result = None
                if result is not None:
                    yield Migrated(request_id, landed[0], self._kv_format, result.bytes_sent, result.seconds,
                                   in_place=result.in_place, handoff_seconds=time.perf_counter() - first_at,
                                   stream_seconds=result.stream_seconds)
                    return
                async for out in stream:
                    yield out
            finally:
                if self._claim_early(early) is not None:  # never migrated (the caller left): its permit back
                    self._exports.release()
                if reservation is not None:
                    reservation.drop()

    def _keep(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _may_export_early(self, address: str) -> bool:
        """Whether a request for the decode worker at `address` may begin its export in the step that holds it:
        not when that worker shares this GPU (its KV is copied device to device), nor while that is not known."""
        return not self._same_gpu or (address in self._peers and self._peers[address] is None)

    def _export_early(self, engine: "Engine", request_id: str, early: list) -> None:
        """`Engine.on_held`'s observer, on the engine thread: begins the export if a permit is free now (else the
        migration waits for one and exports then)."""
        if not self._exports.try_take():
            return
        try:
            early.append(begin_export(engine, request_id, self._source))
        except Exception as e:  # noqa: BLE001 - an observer must not raise; the migration exports it instead
            early.append(e)

    def _claim_early(self, early: list) -> "Future[KvExport] | None":
        """The export `_export_early` began, whose permit the caller now holds; None when there is none (a
        failed one gives its permit back here)."""
        if not early:
            return None
        begun = early.pop()
        if isinstance(begun, Exception):
            log.warning("%s: exporting in the step that held the request failed (%r); exporting it again",
                        self._worker_id, begun)
            self._exports.release()
            return None
        return begun

    async def _migrate(self, request_id: str, params: "SamplingParams", addresses: list[str], landed: list[str],
                       begun: "Future[KvExport] | None" = None, reserved: "pb.ReserveResponse | None" = None
                       ) -> TransferResult | None:
        """Moves the held request's KV to the first of `addresses` that takes it (its address into landed[0]); when
        none does, resumes the request here and returns None. begun: its export, begun with a permit taken, for
        the first attempt (`migrate` gives the permit back; the first address's `_peer` is known then, so
        nothing before that call waits or fails). reserved: the first address's reservation (`EarlyReservation`),
        which `migrate` uses or aborts."""
        for address in addresses:
            try:
                result = await migrate(self._engine, self._channel(address), request_id, sampling_to_proto(params),
                                       peer=await self._peer(address), exports=self._exports, source=self._source,
                                       begun=begun, reserved=reserved, model=self._model_name,
                                       sender_id=self._worker_id)
            except KvTransferFailed as e:
                log.warning("%s: %s", self._worker_id, e)
                continue
            finally:
                begun = reserved = None
            landed[0] = address
            return result
        log.warning("%s: no decode worker took the KV of %s (%d tried); decoding it here", self._worker_id,
                    request_id, len(addresses))
        await asyncio.wrap_future(self._engine.submit(lambda eng: eng.resume_prefilled(request_id)))
        return None

    async def _run_streamed(self, request_id: str, prompt: str | list[int], params: "SamplingParams",
                            decode_address: str, fallback, landed: list[str]
                            ) -> AsyncIterator["RequestOutput | Migrated"]:
        """run() with the KV sent (or, to a decode worker on this GPU, copied in place) layer by layer under the
        prefill; the first token comes after the commit. fallback: what moves the held request when that failed."""
        if isinstance(prompt, str):
            prompt = await asyncio.wrap_future(self._engine.submit(lambda e: e.tokenizer.encode(prompt)))
        m = await prefill_and_migrate(self._engine, self._channel(decode_address), request_id, prompt, params,
                                      sampling_to_proto(params), model=self._model_name, sender_id=self._worker_id,
                                      peer=await self._peer(decode_address), fallback=fallback)
        async with contextlib.aclosing(m.prefill_outputs):
            yield m.first
            if m.first.finished:
                return
            if m.result is not None:
                yield Migrated(request_id, landed[0], self._kv_format, m.result.bytes_sent, m.result.seconds,
                               m.streamed, m.result.in_place, stream_seconds=m.result.stream_seconds)
                return
            async for out in m.prefill_outputs:
                yield out

    async def _peer(self, address: str) -> "PeerCache | None":
        """The decode worker's cache mapped here if it shares this GPU (asked once per decode worker)."""
        if not self._same_gpu:
            return None
        if address not in self._peers:
            self._peers[address] = await open_peer_cache(self._engine, self._channel(address),
                                                         sender_id=self._worker_id)
        return self._peers[address]

    def _channel(self, address: str) -> grpc.aio.Channel:
        # one channel per decode worker, reused: a connection per request would cost a handshake each
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, interceptors=self._interceptors)
        return channel

    async def close(self) -> None:
        if self._tasks:  # reservations being aborted: before their channels close
            await asyncio.wait(list(self._tasks), timeout=5.0)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._peers.clear()


class DecodeSide:
    """Receives migrated requests into `engine` and hands their outputs to `follow` (module docstring)."""

    def __init__(self, engine: "AsyncEngine", worker_id: str, model_name: str,
                 follow_timeout_s: float = FOLLOW_TIMEOUT_S, *, auth_token: str | None = None):
        self._engine = engine
        self._auth_token = auth_token
        self._worker_id = worker_id
        self._model_name = model_name
        self._follow_timeout_s = follow_timeout_s
        self._committed: dict[str, AsyncIterator["RequestOutput"]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._waiting: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._server: grpc.aio.Server | None = None
        self._servicer: Any = None
        self.address: str | None = None

    async def start(self, host: str) -> str:
        """Starts the KvTransfer server on host (a free port); returns its address host:port."""
        if self.address is None:
            self._server, port, self._servicer = await start_kv_transfer_server(
                self._engine, host=host, port=0, model_name=self._model_name, on_commit=self._on_commit,
                api_key=self._auth_token)
            self.address = f"{host}:{port}"
        return self.address

    @property
    def num_transfers(self) -> int:
        """Reservations not yet committed or freed (a test checks they all end)."""
        return len(self._servicer.transfers) if self._servicer is not None else 0

    async def drop_stale(self, request_id: str) -> None:
        """Frees what an earlier attempt of `request_id` left here before this worker runs it again: a
        reservation whose prefill worker died mid-transfer, or a committed request nobody followed. The router
        runs a request again only once its earlier attempt failed, so both are stale; left in place, the engine
        would refuse the new attempt as already running."""
        if self._servicer is not None:
            await self._servicer.drop_request(request_id)
        outputs = self._committed.pop(request_id, None)
        if outputs is not None:
            self._expiry.pop(request_id).cancel()
            await outputs.aclose()  # closing aborts it in the engine

    def _on_commit(self, request_id: str, outputs: AsyncIterator["RequestOutput"]) -> None:
        waiter = self._waiting.pop(request_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(outputs)
            return
        self._committed[request_id] = outputs
        self._expiry[request_id] = asyncio.get_running_loop().call_later(
            self._follow_timeout_s, self._expire, request_id)

    def _expire(self, request_id: str) -> None:
        self._expiry.pop(request_id, None)
        outputs = self._committed.pop(request_id, None)
        if outputs is not None:
            log.warning("%s: committed request %s was not followed within %g s; aborting it", self._worker_id,
                        request_id, self._follow_timeout_s)
            task = asyncio.get_running_loop().create_task(outputs.aclose())  # closing aborts it in the engine
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def follow(self, request_id: str, timeout_s: float | None = None) -> AsyncIterator["RequestOutput"]:
        """The outputs of a committed request, from its first decoded token; leaving early aborts it.
        Raises NotCommittedError when it is not committed here within timeout_s (default follow_timeout_s)."""
        outputs = self._committed.pop(request_id, None)
        if outputs is None:
            if request_id in self._waiting:
                raise InvalidRequestError("request_id", f"{request_id!r} is already followed")
            waiter = self._waiting[request_id] = asyncio.get_running_loop().create_future()
            timeout_s = self._follow_timeout_s if timeout_s is None else timeout_s
            try:
                outputs = await asyncio.wait_for(waiter, timeout_s)
            except asyncio.TimeoutError:
                raise NotCommittedError(f"request {request_id!r} was not committed to decode worker "
                                        f"{self._worker_id} within {timeout_s:g} s") from None
            finally:
                self._waiting.pop(request_id, None)
        else:
            self._expiry.pop(request_id).cancel()
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                yield out

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        for outputs in list(self._committed.values()):
            await outputs.aclose()
        self._committed.clear()
        if self._server is not None:
            await self._server.stop(None)
            self._servicer.close()
            self._server = None
