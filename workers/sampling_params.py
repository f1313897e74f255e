"""Per-request sampling parameters, validated on construction (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from partita.workers.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    max_tokens: tokens to generate at most.
    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_p: keep the smallest set of tokens whose probability mass reaches top_p (1 disables).
    top_k: keep the k most likely tokens (-1 or 0 disables).
    min_p: drop tokens whose probability is below min_p times the top token's (0 disables).
    seed: makes this request's sampling reproducible, independent of the batch it runs in.
    stop: strings that end generation; the matched string is not part of the returned text.
    stop_token_ids: token ids that end generation (in addition to the model's eos ids).
    ignore_eos: keep generating past eos (benchmarks).
    logprobs: if set, return the sampled token's logprob and this many top alternatives (0..20).
    repetition_penalty: >1 discourages tokens already in the prompt or output (CTRL's rule).
    skip_special_tokens: leave special tokens out of the returned text.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_number("temperature", self.temperature, low=0.0)
        _check_number("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p <= 0.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=-1)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop[{i}]", f"must be a non-empty string, got {s!r}")
        for i, t in enumerate(self.stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, low=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    _check_range(name, value, low, high)


def _check_number(name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    _check_range(name, value, low, high)


def _check_range(name: str, value: float, low: float | None, high: float | None) -> None:
    if low is not None and value < low:
        raise InvalidRequestError(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidRequestError(name, f"must be <= {high}, got {value}")
