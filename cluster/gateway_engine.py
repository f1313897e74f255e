"""The one narrow protocol between the gateway and whatever generates tokens behind it.

`AsyncEngine` (cluster/async_engine.py) implements it over an in-process `partita.workers.Engine`; the
control plane's router implements it over Ray actors. The gateway knows nothing else about engines.

Streaming and error contract of `EngineClient.generate`:
- it yields `RequestOutput`s (partita.workers) in order; the last one has `finished=True` and a
  `finish_reason` of "stop", "length" or "abort"; an output may carry several tokens when the consumer
  fell behind (outputs are merged, never dropped);
- bad input raises `partita.workers.InvalidRequestError` (with `.field`) from the first iteration;
- an engine that died or was shut down raises `EngineUnavailableError`;
- a consumer that stops iterating (breaks, is cancelled, closes the iterator) aborts the request, which
  frees its KV blocks; use `contextlib.aclosing` so that this happens at once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from partita.workers import RequestOutput, SamplingParams


class EngineUnavailableError(RuntimeError):
    """The engine is dead, stopping or unreachable: UNAVAILABLE / HTTP 503."""


@dataclass(frozen=True)
class ModelInfo:
    """What clients may know about the served model."""

    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...] = ()
    has_chat_template: bool = False
    bos_token: str | None = None
    eos_token: str | None = None
    created_unix_s: int = 0


@dataclass(frozen=True)
class WorkerLoad:
    """One engine's load, as the scheduler last reported it (kv_cache_usage in 0..1)."""

    worker_id: str
    role: str = "colocated"
    pool: str = "default"
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0


@dataclass(frozen=True)
class MigrationTotals:
    """KV migrations of one KV format so far (prefill/decode disaggregation), summed over requests: their count,
    wire payload bytes and seconds: the transfer (Reserve, or the first chunk when reserved during the prefill, to
    Commit), the stream within it (to the last chunk's ack, or the end of a copy in place: the bytes alone; Commit
    then waits for the decode worker's first step) and the handoff (the prefill's first token to Commit)."""

    migrations: int = 0
    num_bytes: int = 0
    transfer_seconds: float = 0.0
    stream_seconds: float = 0.0
    handoff_seconds: float = 0.0

    def add(self, num_bytes: int, transfer_s: float, stream_s: float, handoff_s: float) -> "MigrationTotals":
        """These totals with one more migration."""
        return MigrationTotals(self.migrations + 1, self.num_bytes + num_bytes, self.transfer_seconds + transfer_s,
                               self.stream_seconds + stream_s, self.handoff_seconds + handoff_s)


class Tokenizer(Protocol):
    """The slice of a tokenizer the gateway uses (chat templates, prompt lengths, logprob tokens)."""

    chat_template: str | None
    eos_token_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


@runtime_checkable
class EngineClient(Protocol):
    """Generates tokens for requests; see the module docstring for the streaming and error contract."""

    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def generate(self, request_id: str, prompt: str | list[int], params: "SamplingParams",
                 priority: int = 0) -> AsyncIterator["RequestOutput"]: ...

    async def abort(self, request_id: str) -> bool:
        """Aborts a running request (its stream ends with finish_reason "abort"); False if unknown."""
        ...

    def loads(self) -> Sequence[WorkerLoad]:
        """The latest load of each engine behind this client (cheap: no round trip)."""
        ...

    def is_healthy(self) -> bool:
        """False once the engine died or shut down."""
        ...


def merge_outputs(outputs: list["RequestOutput"]) -> "RequestOutput":
    """One output standing for consecutive outputs of one request; the last one's status and counts."""
    last = outputs[-1]
    token_ids = [t for out in outputs for t in out.new_token_ids]
    text = "".join(out.text_delta for out in outputs)
    logprobs = None
    if any(out.logprobs for out in outputs):
        logprobs = [lp for out in outputs for lp in (out.logprobs or ())]
    return replace(last, new_token_ids=token_ids, text_delta=text, logprobs=logprobs)
