"""What the SDK returns: plain frozen dataclasses, independent of protobuf."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class HealthStatus(str, enum.Enum):
    UNKNOWN = "UNKNOWN"
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a generation: new token ids and their text; the last chunk has finish_reason and usage.

    finish_reason: "stop", "length" or "abort" on the last chunk, else None.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerateResult:
    """A whole generation; time_to_first_token_s and e2e_latency_s are measured by the server."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    time_to_first_token_s: float = 0.0
    e2e_latency_s: float = 0.0


@dataclass(frozen=True)
class ModelCard:
    id: str
    owned_by: str
    created_unix_s: int
    max_model_len: int
