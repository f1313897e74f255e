"""What the engine hands back to its callers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    """One request's progress in one step: the tokens and text added since the last output.

    finish_reason: "stop" (eos, stop token or stop string), "length" (max_tokens or max_model_len) or
    "abort"; None while running. logprobs: per new token {"token_id", "logprob", "top": {id: logprob}}.
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[dict] | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float
    num_preemptions: int
