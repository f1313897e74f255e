"""A request's state inside the engine: its tokens, how many are in the KV cache, and its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from partita.workers.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # holds blocks outside the running set: a prefilled request awaiting migration, or a
    #                reservation awaiting migrated KV (prefill/decode disaggregation)
    FINISHED = "finished"


@dataclass
class Sequence:
    """token_ids holds prompt then output; num_computed_tokens of them are in the KV cache.

    A step processes token_ids[num_computed_tokens : num_computed_tokens + n]; when that reaches the end,
    the step samples the next token. Preemption frees the blocks and sets num_computed_tokens to 0, so the
    prompt and the output so far are recomputed later.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    kv_slot: int = -1  # index of per-sequence KV state while the sequence holds blocks (BlockManager)
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
