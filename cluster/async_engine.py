"""`AsyncEngine`: the in-process `EngineClient`, an asyncio face on the synchronous `partita.workers.Engine`.

The engine is not thread-safe, so one dedicated thread owns it: it applies queued commands (add, abort,
stop, and `submit`/`adopt` calls of other components such as KV migration) between steps, calls `step()` while there is work and blocks on the command queue when idle. Each
step's outputs cross to the event loop in one `call_soon_threadsafe` call, which appends them to
per-request streams; a consumer that fell behind takes everything queued at once, merged into one output,
so the loop's work per step is one wake-up plus one append per running request.

    engine = AsyncEngine.from_model("tiny-llama", device="cpu")
    async for out in engine.generate("r1", "Hello", SamplingParams(max_tokens=8)):
        print(out.text_delta, end="")
    engine.shutdown()
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from partita.cluster.gateway_engine import EngineUnavailableError, ModelInfo, WorkerLoad, merge_outputs
from partita.workers.errors import InvalidRequestError

if TYPE_CHECKING:
    from partita.workers import Engine, EngineConfig, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

_ADD, _ABORT, _STOP, _START, _CALL = "add", "abort", "stop", "start", "call"


class _RequestStream:
    """Outputs (or one exception) waiting for one request's consumer; touched on the event loop only."""

    __slots__ = ("_loop", "_items", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: list[Any] = []
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Any]:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items


class _Coalescer:
    """Engine-thread side of `stream_interval_s`: holds the outputs of running requests for up to that long,
    so that the event loop handles one merged output per request per interval instead of one per step.
    A request's first output and its last pass at once: time to first token and end-to-end latency are
    unaffected; only the gaps between tokens in between become bursts of several tokens."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._held: dict[str, list["RequestOutput"]] = {}
        self._started: set[str] = set()
        self._last_flush = time.monotonic()

    def push(self, outputs: list["RequestOutput"]) -> list["RequestOutput"]:
        """The outputs to deliver now (in order per request); the others are held."""
        if self.interval_s <= 0:
            return outputs
        ready: list["RequestOutput"] = []
        held = self._held
        for out in outputs:
            request_id = out.request_id
            if out.finished or request_id not in self._started:
                ready.extend(held.pop(request_id, ()))
                ready.append(out)
                if out.finished:
                    self._started.discard(request_id)
                else:
                    self._started.add(request_id)
            else:
                held.setdefault(request_id, []).append(out)
        now = time.monotonic()
        if held and now - self._last_flush >= self.interval_s:
            ready.extend(self.drain())
            self._last_flush = now
        return ready

    def drain(self) -> list["RequestOutput"]:
        ready = [out for outs in self._held.values() for out in outs]
        self._held.clear()
        return ready


class AsyncEngine:
    """Serves one `Engine` to asyncio callers; implements `EngineClient` (cluster/gateway_engine.py).

    worker_id, pool, role: how this engine appears in loads, metrics and cluster status.
    stream_interval_s: hand tokens to the event loop at most this often per request (0: every step).
        Each hand-over costs the loop a task wake-up and the wire a message, per request; on a CPU-bound
        host with many streams that work competes with the engine for the GIL, and an interval of tens
        of milliseconds trades smooth token gaps for throughput. First and last tokens are never held.
    """

    def __init__(self, engine: "Engine", *, worker_id: str = "engine-0", pool: str = "default",
                 role: str = "colocated", stream_interval_s: float = 0.0):
        if isinstance(stream_interval_s, bool) or not isinstance(stream_interval_s, (int, float)) \
                or not 0.0 <= stream_interval_s <= 10.0:
            raise ValueError(f"stream_interval_s must be a number of seconds in [0, 10], got {stream_interval_s!r}")
        self._engine = engine
        self._coalescer = _Coalescer(float(stream_interval_s))
        self._worker_id, self._pool, self._role = worker_id, pool, role
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._load = self._snapshot()
        self._accepts_priority = "priority" in inspect.signature(engine.add_request).parameters
        tok = engine.tokenizer
        self._model_info = ModelInfo(
            model_name=engine.model_name, max_model_len=engine.max_model_len,
            eos_token_ids=tuple(getattr(tok, "eos_token_ids", ()) or ()),
            has_chat_template=bool(getattr(tok, "chat_template", None)),
            bos_token=getattr(tok, "bos_token", None), eos_token=getattr(tok, "eos_token", None),
            created_unix_s=int(time.time()))

    @classmethod
    def from_model(cls, model: Any = "tiny-llama", *, device: str = "auto", dtype: str = "auto",
                   kv_format: str = "auto", config: "EngineConfig | None" = None, **kwargs: Any) -> "AsyncEngine":
        """Builds the engine (loads the model) and wraps it; kwargs go to `AsyncEngine`."""
        from partita.workers import Engine

        return cls(Engine(model, device=device, dtype=dtype, kv_format=kv_format, config=config), **kwargs)

    # --- EngineClient ---------------------------------------------------------------------------------
    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    def loads(self) -> list[WorkerLoad]:
        return [self._load]

    @property
    def native_thread_id(self) -> int | None:
        """The OS id of the engine thread (profilers, per-thread CPU accounting); None before start."""
        return None if self._thread is None else self._thread.native_id

    def is_healthy(self) -> bool:
        if self._error is not None or self._stopping:
            return False
        return self._thread is None or self._thread.is_alive()

    def generate(self, request_id: str, prompt: str | list[int], params: "SamplingParams",
                 priority: int = 0) -> AsyncIterator["RequestOutput"]:
        """Streams the request's outputs; leaving the loop early aborts it (module docstring of
        cluster/gateway_engine.py states the whole contract)."""
        return self._follow(request_id, (_ADD, request_id, prompt, params, priority))

    def adopt(self, request_id: str, start: Callable[["Engine"], None]) -> AsyncIterator["RequestOutput"]:
        """Streams the outputs of a request that `start(engine)` puts into the engine on the engine thread
        (a migrated request's commit); an exception from `start` ends the stream. Same contract as generate."""
        return self._follow(request_id, (_START, request_id, start))

    def submit(self, fn: Callable[["Engine"], Any]) -> concurrent.futures.Future:
        """Runs fn(engine) on the engine thread between steps; the future holds its result or exception.
        The way for other components (KV migration) to touch the engine, which is not thread-safe."""
        self._ensure_running()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((_CALL, fn, done))
        return done

    async def _follow(self, request_id: str, command: tuple) -> AsyncIterator["RequestOutput"]:
        self._ensure_running()
        if request_id in self._streams:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        stream = _RequestStream(self._loop)
        self._streams[request_id] = stream
        self._commands.put(command)
        finished = False
        try:
            while not finished:
                items = await stream.take()
                error = items.pop() if isinstance(items[-1], BaseException) else None
                if items:
                    out = items[0] if len(items) == 1 else merge_outputs(items)
                    finished = out.finished
                    yield out
                if error is not None:
                    finished = True
                    raise error
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                self._commands.put((_ABORT, request_id, None))

    async def abort(self, request_id: str) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return False
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((_ABORT, request_id, done))
        return await asyncio.wrap_future(done)

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Starts the engine thread, delivering to `loop` (default: the running loop). Idempotent."""
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"partita-engine-{self._worker_id}", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the thread after its current step; running requests end with EngineUnavailableError."""
        self._stopping = True
        if self._thread is not None and self._thread.is_alive():
            self._commands.put((_STOP,))
            self._thread.join(timeout_s)

    async def aclose(self, timeout_s: float = 30.0) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown, timeout_s)

    def _ensure_running(self) -> None:
        if self._error is not None:
            raise EngineUnavailableError(f"the engine died: {self._error!r}")
        if self._stopping:
            raise EngineUnavailableError("the engine is shutting down")
        if self._thread is None:
            self.start()
        elif self._loop is not asyncio.get_running_loop():
            raise RuntimeError("AsyncEngine serves the event loop it was started on; call it from that loop")

    # --- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        engine, commands = self._engine, self._commands
        try:
            while True:
                batch = [] if engine.has_unfinished() else [commands.get()]
                while True:
                    try:
                        batch.append(commands.get_nowait())
                    except queue.Empty:
                        break
                if batch and not self._apply(batch):
                    break
                if engine.has_unfinished():
                    outputs = self._coalescer.push(engine.step())
                    self._load = self._snapshot()
                    if outputs:
                        self._post(self._deliver, outputs)
        except BaseException as exc:  # noqa: BLE001 - whatever killed the engine is reported to every caller
            log.exception("engine thread %s died", self._worker_id)
            self._error = exc
            self._post(self._deliver, self._coalescer.drain())
            self._post(self._fail_all, EngineUnavailableError(f"the engine died: {exc!r}"))
        else:
            self._post(self._deliver, self._coalescer.drain())
            self._post(self._fail_all, EngineUnavailableError("the engine shut down"))
        finally:
            self._stopping = True
            self._resolve_pending_aborts()

    def _apply(self, batch: list[tuple]) -> bool:
        """Applies add/abort commands in arrival order; False when a stop command came."""
        engine = self._engine
        for command in batch:
            kind = command[0]
            if kind == _ADD:
                _, request_id, prompt, params, priority = command
                try:
                    if self._accepts_priority:
                        engine.add_request(request_id, prompt, params, priority=priority)
                    else:
                        engine.add_request(request_id, prompt, params)
                except Exception as exc:  # noqa: BLE001 - refused input goes back to its caller only
                    self._post(self._deliver_error, request_id, exc)
            elif kind == _START:
                _, request_id, start = command
                try:
                    start(engine)
                except Exception as exc:  # noqa: BLE001 - a refused start goes back to its caller only
                    self._post(self._deliver_error, request_id, exc)
            elif kind == _CALL:
                _, fn, done = command
                # a call its caller cancelled before it ran is skipped (concurrent.futures' contract); one that
                # runs can no longer be cancelled, so setting its result cannot fail and kill this thread
                if not done.set_running_or_notify_cancel():
                    continue
                try:
                    done.set_result(fn(engine))
                except Exception as exc:  # noqa: BLE001 - the caller owns the failure
                    done.set_exception(exc)
            elif kind == _ABORT:
                _, request_id, done = command
                answer = done is not None and done.set_running_or_notify_cancel()  # the abort runs either way
                existed = engine.abort(request_id)
                if answer:
                    done.set_result(existed)
            else:
                return False
        self._load = self._snapshot()
        return True

    def _resolve_pending_aborts(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == _ABORT and command[2] is not None and not command[2].done():
                command[2].set_result(False)
            elif command[0] == _CALL and not command[2].done():
                command[2].set_exception(EngineUnavailableError("the engine stopped before running the call"))

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed: nobody is left to tell
            pass

    def _snapshot(self) -> WorkerLoad:
        s = self._engine.stats()
        return WorkerLoad(self._worker_id, self._role, self._pool, s.num_running, s.num_waiting,
                          s.num_free_blocks, s.num_total_blocks, float(s.kv_cache_usage), s.num_preemptions)

    # --- on the event loop ----------------------------------------------------------------------------
    def _deliver(self, outputs: list["RequestOutput"]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(exc)
        self._streams.clear()
