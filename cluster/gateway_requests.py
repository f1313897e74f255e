"""Admission, deadlines, abort-on-exit and serving metrics for every request, gRPC and HTTP alike.

    async with contextlib.aclosing(tracker.open(request_id, prompt, params)) as tracked:  # may refuse
        async for out in tracked: ...                       # engine outputs; timeouts raise here

A request counts as *queued* from admission to its first token and *active* until it ends. When the
queue holds `max_queued_requests`, `open` raises OverloadedError. `request_timeout_s` and
`queue_timeout_s` arm one timer each; when one fires the request is aborted in the engine (freeing its
KV blocks) and the stream raises RequestTimeoutError. Leaving the stream early (client cancel, gRPC
deadline, HTTP disconnect) aborts the request through the engine client's contract.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, AsyncIterator

from partita.cluster.gateway_config import GatewayConfig
from partita.cluster.gateway_engine import EngineClient
from partita.cluster.gateway_errors import (InvalidArgumentError, OverloadedError, RequestTimeoutError,
                                            UnavailableError)
from partita.cluster.metrics import ServingMetrics

if TYPE_CHECKING:
    from partita.workers import RequestOutput, SamplingParams


class RequestTracker:
    """The gateway's view of its requests (one per gateway; touched on its event loop only)."""

    def __init__(self, engine: EngineClient, config: GatewayConfig, metrics: ServingMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.num_queued = 0
        self.active: dict[str, "TrackedRequest"] = {}
        self.is_draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def num_active(self) -> int:
        return len(self.active)

    def counts(self) -> tuple[int, int]:
        return self.num_queued, len(self.active)

    def open(self, request_id: str, prompt: str | list[int], params: "SamplingParams", priority: int = 0,
             timeout_s: float | None = None) -> "TrackedRequest":
        """Admits a request or raises (UnavailableError: draining or dead; OverloadedError: queue full)."""
        retry_after_s = self.config.retry_after_s
        if self.is_draining:
            self.metrics.reject("draining")
            raise UnavailableError("the server is draining; retry on another replica", retry_after_s=retry_after_s)
        if not self.engine.is_healthy():
            self.metrics.reject("engine_unavailable")
            raise UnavailableError("the engine is not running", retry_after_s=retry_after_s)
        limit = self.config.max_queued_requests
        if limit is not None and self.num_queued >= limit:
            self.metrics.reject("queue_full")
            raise OverloadedError(f"{self.num_queued} requests are already queued (max_queued_requests={limit}); "
                                  "retry later", retry_after_s=retry_after_s)
        if request_id in self.active:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already running")
        if self.config.request_timeout_s is not None:
            timeout_s = min(timeout_s or self.config.request_timeout_s, self.config.request_timeout_s)
        tracked = TrackedRequest(self, request_id, prompt, params, priority, timeout_s)
        self.active[request_id] = tracked
        self.num_queued += 1
        self._idle.clear()
        return tracked

    def _forget(self, tracked: "TrackedRequest") -> None:
        if self.active.pop(tracked.request_id, None) is not None and tracked.first_token_time is None:
            self.num_queued -= 1
        if not self.active:
            self._idle.set()

    async def drain(self, timeout_s: float) -> tuple[int, int]:
        """Stops admitting; waits up to timeout_s for active requests, then aborts the rest.

        Returns (requests that finished while draining, requests aborted)."""
        self.is_draining = True
        before = len(self.active)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        remaining = list(self.active)
        for request_id in remaining:
            await self.engine.abort(request_id)
        return before - len(remaining), len(remaining)


class TrackedRequest:
    """One admitted request: its timers, its timings (perf_counter seconds) and its output stream."""

    def __init__(self, tracker: RequestTracker, request_id: str, prompt: str | list[int], params: "SamplingParams",
                 priority: int, timeout_s: float | None):
        self.tracker, self.request_id = tracker, request_id
        self.prompt, self.params, self.priority, self.timeout_s = prompt, params, priority, timeout_s
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self._expired: str | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._outputs: AsyncIterator["RequestOutput"] | None = None
        self._is_closed = False

    def __aiter__(self) -> "TrackedRequest":
        return self

    async def __anext__(self) -> "RequestOutput":
        if self._outputs is None:
            self._outputs = self._stream()
        return await self._outputs.__anext__()

    async def aclose(self) -> None:
        """Ends the request (aborting it in the engine if it still runs); safe to call more than once."""
        if self._outputs is not None:
            await self._outputs.aclose()
        self._close()

    def _close(self) -> None:
        if not self._is_closed:
            self._is_closed = True
            for timer in self._timers:
                timer.cancel()
            self.tracker._forget(self)

    @property
    def ttft_s(self) -> float:
        return 0.0 if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> float:
        return 0.0 if self.finish_time is None else self.finish_time - self.arrival_time

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        config = self.tracker.config
        if self.timeout_s is not None:
            self._timers.append(loop.call_later(self.timeout_s, self._expire, "request",
                                                f"the request did not finish within {self.timeout_s:g} s"))
        if config.queue_timeout_s is not None:
            self._timers.append(loop.call_later(config.queue_timeout_s, self._expire, "queue",
                                                f"no token within queue_timeout_s={config.queue_timeout_s:g} s"))

    def _expire(self, kind: str, message: str) -> None:
        if kind == "queue" and self.first_token_time is not None:
            return
        self._expired = message
        self.tracker.metrics.reject(f"{kind}_timeout")
        self._abort_task = asyncio.ensure_future(self.tracker.engine.abort(self.request_id))

    async def _stream(self) -> AsyncIterator["RequestOutput"]:
        """The engine's outputs for this request, with metrics recorded as they pass."""
        tracker, metrics = self.tracker, self.tracker.metrics
        self._arm(asyncio.get_running_loop())
        last_time, last_out, is_counted = self.arrival_time, None, False
        outputs = tracker.engine.generate(self.request_id, self.prompt, self.params, self.priority)
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    now, last_out = time.perf_counter(), out
                    num_new = len(out.new_token_ids)
                    if num_new:
                        if self.first_token_time is None:
                            self.first_token_time = now
                            tracker.num_queued -= 1
                            metrics.ttft.observe(now - self.arrival_time)
                            queue_time_s = getattr(out, "queue_time_s", None)
                            if queue_time_s is not None:
                                metrics.queue_time.observe(queue_time_s)
                        else:
                            gap_s = (now - last_time) / num_new
                            for _ in range(num_new):
                                metrics.itl.observe(gap_s)
                        last_time = now
                    if out.finished:
                        self.finish_time = now
                        metrics.e2e.observe(now - self.arrival_time)
                        metrics.finished(out.finish_reason, out.num_prompt_tokens, out.num_output_tokens)
                        is_counted = True
                        if self._expired is not None and out.finish_reason == "abort":
                            raise RequestTimeoutError(self._expired)
                    yield out
        finally:
            if last_out is not None and not is_counted:  # the client left: the request ends as aborted
                self.finish_time = time.perf_counter()
                metrics.e2e.observe(self.finish_time - self.arrival_time)
                metrics.finished("abort", last_out.num_prompt_tokens, last_out.num_output_tokens)
            self._close()
