"""The router: the gateway's `EngineClient` over the cluster's worker actors.

It keeps a copy of the controller's routing table (refreshed every `router.refresh_interval_s`) and sends
each request to the ready worker with the lowest load score (cluster/routing.py). Tokens come back through one Ray streaming generator per
request. Measured (deploy/ray/README.md): a Ray stream item costs ~0.4 ms of gateway CPU, 5-8x a gRPC
message; one stream per worker carrying whole engine steps would cost ~10-25 us per token, the next step.

No accepted request is lost silently. When its worker dies (Ray actor errors), drains past its deadline or
refuses it while draining, the request is re-run on another worker, up to `router.max_reruns` times,
waiting up to `router.rerun_wait_s` for one to be ready. A re-run continues where the stream stopped: the
prompt plus the tokens already sent become the new prompt and `max_tokens` shrinks by as many, so the
client sees one unbroken stream (with the original usage counts). Past those bounds the stream raises
`EngineUnavailableError` (UNAVAILABLE / HTTP 503). Limit: text held back by a stop string that spans the
cut is not re-sent.

Prefill/decode disaggregation (cluster/pd_worker.py): when the table has ready prefill and decode workers,
a request goes to a pair, the least loaded prefill worker and the least loaded decode worker among those
whose free KV blocks (last reported) hold the prompt and its max_tokens (any decode worker when none
does). The prefill worker streams the first token, migrates the KV and ends with a `Migrated` marker; the
rest comes from the decode worker's `follow`. A failed transfer decodes on the prefill worker (same
stream); a pair side that fails afterwards is excluded and the request re-runs as above, on another pair,
or on whichever single worker is left (every role also serves colocated `generate`). When both colocated
workers and pairs are ready, a request takes a colocated worker only if its score beats the prefill side's.
Aborts go to the worker holding the request at the time, and again to the decode worker if the request
moved there in between.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import ray

from partita.cluster.gateway_engine import EngineUnavailableError, MigrationTotals, ModelInfo, WorkerLoad
from partita.cluster.pd_worker import Migrated
from partita.cluster.routing import decode_alternates, pick_pair, pick_worker, worker_score
from partita.cluster.spec import ClusterSpec, RouterSpec, SpecError
from partita.cluster.worker_actor import WorkerError
from partita.workers.errors import InvalidRequestError

log = logging.getLogger(__name__)

CONTROLLER_LOST_S = 10.0  # the controller unreachable this long: the router reports itself unhealthy
MAX_DECODE_ALTERNATES = 2  # decode workers a prefill worker tries after the chosen one before decoding itself


@dataclass(frozen=True)
class _Target:
    """Where one attempt runs: one worker (colocated generate) or a prefill worker and a decode worker, with the
    decode workers the prefill worker tries next if that one does not take the KV."""

    worker: Any
    decode: Any = None
    alternates: tuple = ()

    @property
    def decodes(self) -> tuple:
        return () if self.decode is None else (self.decode, *self.alternates)


class _Retry(Exception):
    """The current attempt ended without a result on `worker_id`; the request may be re-run elsewhere."""

    def __init__(self, message: str, worker_id: str):
        super().__init__(message)
        self.worker_id = worker_id


@dataclass
class _Request:
    """One request's progress across attempts."""

    prompt: str | list[int]
    params: Any
    sent_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_sent_before: int = 0
    worker: Any = None
    generator: Any = None
    worker_id: str | None = None
    abort_requested: bool = False

    def continuation(self, tokenizer) -> tuple[str | list[int], Any]:
        """(prompt, params) of the next attempt: carrying on from the tokens already sent, if any."""
        self.num_sent_before = len(self.sent_ids)
        if not self.sent_ids:
            return self.prompt, self.params
        prompt_ids = self.prompt if isinstance(self.prompt, list) else tokenizer.encode(self.prompt)
        params = dataclasses.replace(self.params, max_tokens=self.params.max_tokens - len(self.sent_ids))
        return list(prompt_ids) + self.sent_ids, params

    def adjust(self, out):
        """The output as the client must see it: counts of the original request, not of the continuation."""
        if self.num_prompt_tokens is None:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.sent_ids.extend(out.new_token_ids)
        if not self.num_sent_before:
            return out
        return dataclasses.replace(out, num_prompt_tokens=self.num_prompt_tokens,
                                   num_output_tokens=self.num_sent_before + out.num_output_tokens)


class RayRouter:
    """`EngineClient` (cluster/gateway_engine.py) over a deployment's workers; build with `connect`."""

    def __init__(self, controller, spec: ClusterSpec, model_info: ModelInfo, tokenizer):
        self._controller = controller
        self._config: RouterSpec = spec.router
        self._block_size = spec.scheduler.block_size
        self._model_info = model_info
        self._tokenizer = tokenizer
        self._entries: dict[str, Any] = {}
        self._num_local: dict[str, int] = {}
        self._requests: dict[str, _Request] = {}
        self._tiebreak = itertools.count()
        self._table_changed = asyncio.Event()
        self._last_refresh_s = time.monotonic()
        self._refresh_task: asyncio.Task | None = None
        self._closed = False
        self.num_reruns = 0
        self.num_migrations = 0  # PD requests whose KV moved to their decode worker
        self.num_streamed_migrations = 0  # ... of which layer by layer under the prefill
        self.num_in_place_migrations = 0  # ... of which copied on a GPU shared with the decode worker
        self._migrated: dict[str, MigrationTotals] = {}  # by kv_format: `Migrated`'s, summed

    @classmethod
    async def connect(cls, controller, spec: ClusterSpec, timeout_s: float = 600.0) -> "RayRouter":
        """Waits until a worker reported the model, builds the local tokenizer, starts refreshing."""
        deadline = time.monotonic() + timeout_s
        info = None
        while info is None:
            info = await controller.model_info.remote()
            if info is None:
                if time.monotonic() > deadline:
                    raise EngineUnavailableError(f"no worker became ready within {timeout_s:g} s")
                await asyncio.sleep(0.2)
        model_info = ModelInfo(model_name=info["model_name"], max_model_len=info["max_model_len"],
                               eos_token_ids=tuple(info["eos_token_ids"]), has_chat_template=info["has_chat_template"],
                               bos_token=info["bos_token"], eos_token=info["eos_token"], created_unix_s=int(time.time()))
        router = cls(controller, spec, model_info, load_tokenizer(spec))
        await router.refresh()
        router._refresh_task = asyncio.get_running_loop().create_task(router._refresh_loop())
        return router

    # --- EngineClient -----------------------------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def tokenizer(self):
        return self._tokenizer

    def loads(self) -> list[WorkerLoad]:
        return [e.load for e in self._entries.values()]

    def is_healthy(self) -> bool:
        fresh = time.monotonic() - self._last_refresh_s < CONTROLLER_LOST_S
        return not self._closed and fresh and any(e.state == "ready" for e in self._entries.values())

    @property
    def controller_lost(self) -> bool:
        """True when the controller has not answered for CONTROLLER_LOST_S (e.g. `partita down` removed it)."""
        return time.monotonic() - self._last_refresh_s > CONTROLLER_LOST_S

    async def generate(self, request_id: str, prompt: str | list[int], params, priority: int = 0
                       ) -> AsyncIterator[Any]:
        """Streams the request from the least loaded worker, re-running it elsewhere if that worker fails."""
        if self._closed:
            raise EngineUnavailableError("the router is shut down")
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        req = self._requests[request_id] = _Request(prompt, params)
        failures: list[str] = []
        excluded: set[str] = set()
        finished = False
        try:
            while True:
                prompt, params = req.continuation(self._tokenizer)
                target = await self._choose(excluded, request_id, failures, self._blocks_needed(prompt, params))
                try:
                    async with contextlib.aclosing(self._attempt(request_id, req, target, prompt, params,
                                                                 priority)) as outputs:
                        async for out in outputs:
                            finished = out.finished
                            yield out
                    if finished:
                        return
                    failures.append(f"{req.worker_id}: stream ended without a final output")
                    excluded.add(req.worker_id)
                except _Retry as e:
                    failures.append(f"{e.worker_id}: {e}")
                    excluded.add(e.worker_id)
                if len(failures) > self._config.max_reruns:
                    raise EngineUnavailableError(f"request {request_id} failed on {len(failures)} workers: "
                                                 + "; ".join(failures))
                self.num_reruns += 1
                log.warning("re-running request %s after %s (%d tokens already sent)", request_id, failures[-1],
                            len(req.sent_ids))
                if len(req.sent_ids) >= req.params.max_tokens:  # cannot happen: the last token comes finished
                    raise EngineUnavailableError(f"request {request_id} lost its worker after its last token")
        finally:
            self._requests.pop(request_id, None)
            if not finished and req.generator is not None:
                self._cancel(request_id, req)

    async def _attempt(self, request_id: str, req: _Request, target: _Target, prompt: str | list[int], params,
                       priority: int) -> AsyncIterator[Any]:
        entries = [e for e in (target.worker, target.decode) if e is not None]
        for e in entries:
            self._num_local[e.worker_id] = self._num_local.get(e.worker_id, 0) + 1
        entry = target.worker
        req.worker, req.worker_id = entry.actor, entry.worker_id
        try:
            if target.decode is None:
                req.generator = entry.actor.generate.options(num_returns="streaming").remote(
                    request_id, prompt, params, priority)
            else:
                req.generator = entry.actor.prefill.options(num_returns="streaming").remote(
                    request_id, prompt, params, [d.kv_address for d in target.decodes])
            while True:
                migrated = None  # the decode worker that took the KV
                async with contextlib.aclosing(self._items(req)) as items:
                    async for item in items:
                        if isinstance(item, Migrated):
                            migrated = next((d for d in target.decodes if d.kv_address == item.decode_address),
                                            None)
                            if migrated is None:
                                raise _Retry(f"migrated to {item.decode_address}, not a decode worker offered",
                                             req.worker_id)
                            self._count_migration(item)
                            break
                        out = req.adjust(item)
                        if out.finished:
                            req.generator = None
                            if req.abort_requested and req.worker is entry.actor:
                                # aborted on the prefill worker while its KV was in flight: a transfer that
                                # committed meanwhile must not decode unseen (its stream has ended: no race)
                                for d in target.decodes:
                                    d.actor.abort.remote(request_id)
                        yield out
                        if out.finished:
                            return
                if migrated is None:
                    return
                # the KV lives on the decode worker now: the rest of the stream comes from there
                decode = migrated
                req.worker, req.worker_id = decode.actor, decode.worker_id
                req.generator = decode.actor.follow.options(num_returns="streaming").remote(request_id)
                if req.abort_requested:  # the abort went to the prefill worker while the KV was in flight
                    decode.actor.abort.remote(request_id)
        finally:
            for e in entries:
                self._num_local[e.worker_id] -= 1

    async def _items(self, req: _Request) -> AsyncIterator[Any]:
        """The values of req.generator; a WorkerError or a Ray error raises (InvalidRequestError or _Retry)."""
        try:
            async for ref in req.generator:
                item = await ref
                if isinstance(item, WorkerError):
                    if item.kind == "invalid":
                        raise InvalidRequestError(item.field or "request", item.message)
                    raise _Retry(f"{item.kind}: {item.message}", req.worker_id)
                yield item
        except ray.exceptions.RayError as e:
            text = str(e).strip()
            raise _Retry(f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}", req.worker_id) from None

    def _count_migration(self, m: Migrated) -> None:
        self.num_migrations += 1
        self.num_streamed_migrations += m.streamed
        self.num_in_place_migrations += m.in_place
        totals = self._migrated.get(m.kv_format, MigrationTotals())
        self._migrated[m.kv_format] = totals.add(m.bytes_sent, m.seconds, m.stream_seconds, m.handoff_seconds)

    def migration_totals(self) -> dict[str, MigrationTotals]:
        """{kv_format: its migrations so far} of this router (metrics)."""
        return dict(self._migrated)

    async def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.worker is None:
            return False
        req.abort_requested = True
        try:
            return await req.worker.abort.remote(request_id)
        except ray.exceptions.RayError:
            return False

    # --- cluster admin (the gateway's Admin service) -----------------------------------------------
    async def pool_status(self) -> list[dict]:
        """Each pool: name, role, desired_replicas, ready_replicas (and starting, draining, failures)."""
        return (await self._controller.status.remote())["pools"]

    async def scale(self, pool: str, replicas: int) -> dict:
        """Sets a pool's replica count; returns that pool's status. Bad input: InvalidRequestError."""
        try:
            status = await self._controller.scale.remote(pool, replicas)
        except SpecError as e:  # raised in the controller, re-raised here as RayTaskError(SpecError)
            raise InvalidRequestError(e.path or "pool", e.message) from None
        return next(p for p in status["pools"] if p["name"] == pool)

    async def drain_worker(self, worker_id: str, timeout_s: float | None = None) -> tuple[int, int]:
        """Drains one worker (its pool replaces it): (requests finished, requests handed back for re-run)."""
        try:
            return tuple(await self._controller.drain_worker.remote(worker_id, timeout_s))
        except SpecError as e:
            raise InvalidRequestError("worker_id", e.message) from None

    # --- choosing ---------------------------------------------------------------------------------
    def _blocks_needed(self, prompt: str | list[int], params) -> int:
        """KV blocks the request holds at its longest on a decode worker (the PD choice's room test)."""
        if not any(e.role == "decode" for e in self._entries.values()):
            return 0  # no pair to choose: spare the tokenization
        n = len(prompt) if isinstance(prompt, list) else len(self._tokenizer.encode(prompt))
        return math.ceil((n + params.max_tokens) / self._block_size)

    def _pick(self, excluded: set[str], blocks_needed: int) -> _Target | None:
        ready = [e for e in self._entries.values() if e.state == "ready"]
        by_role: dict[str, list] = {}
        for e in ready:
            by_role.setdefault(e.role, []).append(e)
        tiebreak = next(self._tiebreak)
        colocated = pick_worker([e.load for e in by_role.get("colocated", [])], self._num_local, excluded, tiebreak)
        pair = pick_pair([e.load for e in by_role.get("prefill", [])], [e.load for e in by_role.get("decode", [])],
                         self._num_local, excluded, tiebreak, blocks_needed)
        if pair is not None:
            prefill, decode = self._entries[pair[0]], self._entries[pair[1]]
            if colocated is None or self._score(prefill) <= self._score(self._entries[colocated]):
                others = decode_alternates([e.load for e in by_role["decode"]], self._num_local, decode.worker_id,
                                           excluded, blocks_needed, MAX_DECODE_ALTERNATES)
                return _Target(prefill, decode, tuple(self._entries[w] for w in others))
        if colocated is not None:
            return _Target(self._entries[colocated])
        # half a pair is left (the other side died or is excluded): it decodes alone
        single = pick_worker([e.load for e in ready], self._num_local, excluded, tiebreak)
        return None if single is None else _Target(self._entries[single])

    def _score(self, entry) -> float:
        return worker_score(entry.load, self._num_local.get(entry.worker_id, 0))

    async def _choose(self, excluded: set[str], request_id: str, failures: list[str], blocks_needed: int
                      ) -> _Target:
        """Where to run now, waiting up to rerun_wait_s for a ready worker to appear."""
        deadline = time.monotonic() + self._config.rerun_wait_s
        while True:
            target = self._pick(excluded, blocks_needed)
            if target is not None:
                return target
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                detail = f" after {'; '.join(failures)}" if failures else ""
                raise EngineUnavailableError(f"no ready worker for request {request_id} within "
                                             f"{self._config.rerun_wait_s:g} s{detail}")
            self._table_changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._table_changed.wait(), min(remaining, 1.0))

    def _cancel(self, request_id: str, req: _Request) -> None:
        """Stops a request the consumer left: cancels its Ray stream and aborts it in the engine."""
        with contextlib.suppress(Exception):
            ray.cancel(req.generator)
        with contextlib.suppress(Exception):
            req.worker.abort.remote(request_id)

    # --- the table --------------------------------------------------------------------------------
    async def refresh(self) -> None:
        _, entries = await self._controller.routing_table.remote()
        self._entries = {e.worker_id: e for e in entries}
        self._last_refresh_s = time.monotonic()
        self._table_changed.set()

    async def _refresh_loop(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self.refresh(), CONTROLLER_LOST_S)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the last table; is_healthy turns false if this lasts
                log.warning("routing table refresh failed: %s", type(e).__name__)
            await asyncio.sleep(self._config.refresh_interval_s)

    async def aclose(self) -> None:
        self._closed = True
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh_task


def load_tokenizer(spec: ClusterSpec):
    """The served model's tokenizer, built here the way the engine builds it (the gateway tokenizes)."""
    from partita.workers.engine.engine import resolve_model
    from partita.workers.tokenizer import Tokenizer, byte_tokenizer

    config, checkpoint = resolve_model(spec.model.name)
    if checkpoint:
        return Tokenizer.from_dir(checkpoint, config.eos_token_ids)
    return byte_tokenizer(config.eos_token_ids)
