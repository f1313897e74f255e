"""The worker actor: one engine in one Ray actor, streaming tokens back through Ray streaming generators.

The actor is an async actor. Its engine (synchronous, not thread-safe) runs in one dedicated thread owned
by `AsyncEngine`; the actor's event loop only moves outputs from that thread into Ray streams, answers
heartbeats and applies aborts. A caller streams one request with

    gen = worker.generate.options(num_returns="streaming").remote(request_id, prompt, params)
    async for ref in gen:
        item = await ref          # a RequestOutput, or a WorkerError as the last item

Failures travel as typed stream values (`WorkerError`), never as pickled exceptions: `invalid` (bad input,
names the field), `draining` (refused before it started: route it elsewhere) and `unavailable` (the engine
stopped under the request: re-run it elsewhere). Cancelling the Ray generator, or `abort`, aborts the
request in the engine and frees its KV blocks.

Roles: `colocated` serves `generate`. `prefill` and `decode` (cluster/pd_worker.py) serve a request between
them: the router calls `prefill(request_id, prompt, params, decode_addresses)` on a prefill worker, which
yields the first token and then a `Migrated` marker naming the decode worker that took the KV (the first of
those addresses that did; when none did, the rest of the outputs instead), and then `follow(request_id)` on
that decode worker, whose `ready()` and routing-table entry carry its KvTransfer address. Every role also
serves `generate` (colocated), the router's fallback when one side of the pair is missing. `check_runnable`
refuses the roles not implemented yet.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

import ray

from partita.cluster.async_engine import AsyncEngine
from partita.cluster.gateway_engine import EngineUnavailableError, WorkerLoad
from partita.cluster.gc_freeze import freeze_startup_objects
from partita.cluster.gil_switch import shorten_gil_switch_interval
from partita.cluster.pd_worker import DecodeSide, NotCommittedError, PrefillSide
from partita.cluster.spec import ClusterSpec, KvTransferSpec, ModelSpec, SchedulerSpec, SpecError
from partita.workers.errors import InvalidRequestError

log = logging.getLogger(__name__)

IMPLEMENTED_ROLES = ("colocated", "prefill", "decode")
MAX_CONCURRENT_CALLS = 10_000


@dataclass(frozen=True)
class WorkerError:
    """A request's failure as the last value of its stream. kind: invalid | draining | unavailable."""

    kind: str
    message: str
    field: str | None = None


@dataclass(frozen=True)
class Heartbeat:
    """A worker's answer to the controller: its load, whether its engine lives, whether it drains."""

    worker_id: str
    load: WorkerLoad
    is_healthy: bool
    is_draining: bool
    num_active: int
    sent_unix_s: float


def check_runnable(spec: ClusterSpec) -> None:
    """Raises SpecError (naming the path) for what the spec asks but this build cannot run yet."""
    for i, pool in enumerate(spec.pools):
        if pool.role not in IMPLEMENTED_ROLES:
            raise SpecError(f"pools[{i}].role", f"role {pool.role!r} is not implemented yet; implemented: "
                                                f"{', '.join(IMPLEMENTED_ROLES)}")
        if pool.tensor_parallel_size > 1:
            raise SpecError(f"pools[{i}].tensor_parallel_size",
                            f"{pool.tensor_parallel_size}: the engine has no tensor parallelism yet; use 1")
    roles = [pool.role for pool in spec.pools]
    for role, other in (("prefill", "decode"), ("decode", "prefill")):
        if role in roles and other not in roles:
            raise SpecError(f"pools[{roles.index(role)}].role",
                            f"a {role} pool needs a {other} pool beside it (prefill/decode disaggregation); "
                            f"add one, or use role colocated")


def engine_config(scheduler: SchedulerSpec, model: ModelSpec):
    """The engine's config from the spec's scheduler section and the model's seed."""
    from partita.workers import EngineConfig

    return EngineConfig(
        block_size=scheduler.block_size, max_num_seqs=scheduler.max_num_seqs,
        max_num_batched_tokens=scheduler.max_num_batched_tokens, max_model_len=scheduler.max_model_len,
        enable_chunked_prefill=scheduler.enable_chunked_prefill,
        gpu_memory_utilization=scheduler.gpu_memory_utilization,
        kv_cache_memory_bytes=scheduler.kv_cache_memory_bytes, num_kv_blocks=scheduler.num_kv_blocks,
        enforce_eager=scheduler.enforce_eager, seed=model.seed)


class WorkerActor:
    """Hosts one engine. Created by the controller inside the worker's placement group (cluster/placement.py).

    worker_id, pool, role: how the worker appears in loads and status.
    device: "cuda" when Ray gave the actor GPUs, "cpu" otherwise. num_threads: torch CPU threads.
    """

    def __init__(self, worker_id: str, pool: str, role: str, model: dict, scheduler: dict, device: str,
                 num_threads: int = 1, kv_transfer: dict | None = None):
        import torch

        from partita.workers import Engine

        shorten_gil_switch_interval()  # the engine thread gets the GIL back sooner from the event loop (gil_switch.py)
        if device == "cpu":
            torch.set_num_threads(max(1, num_threads))
        model_spec = ModelSpec.parse(model)
        engine = Engine(model_spec.name, device=device, dtype=model_spec.dtype, kv_format=model_spec.kv_format,
                        config=engine_config(SchedulerSpec(**scheduler), model_spec))
        self._worker_id = worker_id
        self._engine = AsyncEngine(engine, worker_id=worker_id, pool=pool, role=role)
        model_name = self._engine.model_info.model_name
        kv = KvTransferSpec(**(kv_transfer or {}))
        self._kv_host = ray.util.get_node_ip_address() if kv.host == "node" else kv.host
        self._prefill = PrefillSide(self._engine, worker_id, model_name, engine.kv_format.name,
                                    auth_token=kv.auth_token, stream_layers=kv.stream_layers,
                                    same_gpu=kv.same_gpu, max_exports=kv.max_exports) \
            if role == "prefill" else None
        self._decode = DecodeSide(self._engine, worker_id, model_name, auth_token=kv.auth_token) \
            if role == "decode" else None
        self._active: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._is_draining = False

    async def ready(self) -> dict:
        """The served model's description (the router's ModelInfo); answering means the model is loaded."""
        info = self._engine.model_info
        context = ray.get_runtime_context()
        kv_address = await self._decode.start(self._kv_host) if self._decode else None
        if self._prefill is not None:
            await self._prefill.start()
        freeze_startup_objects()  # the loaded model and servers stay out of full collections (gc_freeze.py)
        return {"node_id": context.get_node_id(), "placement_group_id": context.get_placement_group_id(),
                "kv_address": kv_address,
                "model_name": info.model_name, "max_model_len": info.max_model_len,
                "eos_token_ids": list(info.eos_token_ids), "has_chat_template": info.has_chat_template,
                "bos_token": info.bos_token, "eos_token": info.eos_token}

    async def generate(self, request_id: str, prompt: str | list[int], params, priority: int = 0):
        """Streams the request's outputs (call with num_returns="streaming"); module docstring has the contract."""
        if self._decode is not None:  # a re-run on a decode worker: what its failed attempt left here goes first
            await self._decode.drop_stale(request_id)
        async for item in self._serve(request_id, lambda: self._engine.generate(request_id, prompt, params, priority)):
            yield item

    async def prefill(self, request_id: str, prompt: str | list[int], params, decode_addresses: list[str]):
        """A prefill worker's stream of a PD request: first token, then `Migrated` (naming which of the decode
        workers, tried in order, took the KV) or the local decode's outputs."""
        if self._prefill is None:
            yield WorkerError("invalid", f"worker {self._worker_id} is not a prefill worker", "role")
            return
        async for item in self._serve(request_id,
                                      lambda: self._prefill.run(request_id, prompt, params, decode_addresses)):
            yield item

    async def follow(self, request_id: str, timeout_s: float | None = None):
        """A decode worker's stream of a request committed to it by KV migration (after the first token)."""
        if self._decode is None:
            yield WorkerError("invalid", f"worker {self._worker_id} is not a decode worker", "role")
            return
        # a follow is never refused for draining: the request already lives here
        async for item in self._serve(request_id, lambda: self._decode.follow(request_id, timeout_s), refuse=False):
            yield item

    async def _serve(self, request_id: str, start, refuse: bool = True) -> AsyncIterator:
        """Runs start()'s stream as an active request, its failures turned into a last WorkerError."""
        if refuse and self._is_draining:
            yield WorkerError("draining", f"worker {self._worker_id} is draining")
            return
        if not self._engine.is_healthy():
            yield WorkerError("unavailable", f"worker {self._worker_id}'s engine is not running")
            return
        self._active.add(request_id)
        self._idle.clear()
        try:
            async for out in start():
                yield out
        except InvalidRequestError as e:
            yield WorkerError("invalid", e.message, e.field)
        except (EngineUnavailableError, NotCommittedError) as e:
            yield WorkerError("unavailable", f"worker {self._worker_id}: {e}")
        finally:
            self._active.discard(request_id)
            if not self._active:
                self._idle.set()

    async def abort(self, request_id: str) -> bool:
        return await self._engine.abort(request_id)

    async def num_transfers(self) -> int:
        """KV transfers reserved here and not yet committed or freed (0 on other roles)."""
        return self._decode.num_transfers if self._decode else 0

    async def heartbeat(self) -> Heartbeat:
        return Heartbeat(self._worker_id, self._engine.loads()[0], self._engine.is_healthy(), self._is_draining,
                         len(self._active), time.time())

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Refuses new requests, lets running ones finish for up to timeout_s, then stops the engine: requests
        still running end with an `unavailable` error, which the router re-runs elsewhere.
        Returns (requests that finished while draining, requests cut off)."""
        self._is_draining = True
        before = len(self._active)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        cut = len(self._active)
        if cut:
            await self._close()
        return before - cut, cut

    async def shutdown(self) -> None:
        self._is_draining = True
        await self._close()

    async def _close(self) -> None:
        for side in (self._prefill, self._decode):
            if side is not None:
                await side.close()
        await self._engine.aclose()


def remote_worker_class():
    """The Ray actor class of `WorkerActor` (options are set per worker by the controller)."""
    return ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=MAX_CONCURRENT_CALLS)(WorkerActor)
