"""Synthetic serving traffic: prompt and output lengths, seeded random token-id prompts, arrival times.

Everything a run sends is drawn up front from one `random.Random(seed)`, so two deployments benchmarked
with the same flags receive the same requests at the same offsets (A/B comparisons), and a run never
spends benchmark time drawing random numbers.

    lengths: fixed       every request exactly `mean`
             uniform     uniform integers in [mean * (1 - range_ratio), mean * (1 + range_ratio)]
             lognormal   mean `mean`, shape `sigma` (log-space std): most requests short, a long tail,
                         the shape of chat traffic (ShareGPT / LMSYS-Chat prompt and answer lengths)
    prompts: `prefix_len` token ids shared by every request (a system prompt), then `input_len` ids of the
             request's own, uniform in [min_token_id, vocab_size)
    arrivals: gaps of a gamma process with shape `burstiness` and mean 1 / request_rate (burstiness 1 is a
             Poisson process; < 1 burstier, > 1 more regular); request_rate inf sends everything at once
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths.

    kind: fixed, uniform or lognormal.
    mean: the mean length (exact for fixed).
    range_ratio: uniform's half-width as a fraction of mean, in [0, 1).
    sigma: lognormal's log-space standard deviation (0.0 degenerates to fixed).
    """

    kind: str = "fixed"
    mean: int = 128
    range_ratio: float = 0.0
    sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"length distribution {self.kind!r} is not one of {', '.join(LENGTH_DISTRIBUTIONS)}")
        if isinstance(self.mean, bool) or not isinstance(self.mean, int) or self.mean < 1:
            raise ValueError(f"mean length must be an integer >= 1, got {self.mean!r}")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not 0.0 <= self.sigma <= 4.0:
            raise ValueError(f"lognormal sigma must be in [0, 4], got {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            low = max(1, math.floor(self.mean * (1 - self.range_ratio)))
            return rng.randint(low, max(low, math.ceil(self.mean * (1 + self.range_ratio))))
        if self.kind == "lognormal" and self.sigma > 0:
            mu = math.log(self.mean) - self.sigma ** 2 / 2  # so that E[length] = mean
            return max(1, round(rng.lognormvariate(mu, self.sigma)))
        return self.mean


@dataclass(frozen=True)
class TrafficConfig:
    """What to send and when.

    num_requests: requests in the run.
    input_len, output_len: prompt length (excluding the shared prefix) and output length distributions.
    prefix_len: token ids shared by every prompt, before its own (0: none).
    vocab_size: prompt token ids are drawn from [min_token_id, vocab_size).
    min_token_id: the smallest id drawn (ids below are often special tokens).
    max_model_len: prompt + output may not exceed it (None: no limit); longer prompts are cut.
    request_rate: requests per second offered (math.inf: all at t = 0).
    burstiness: shape of the gamma-distributed gaps (1.0: Poisson).
    seed: seeds lengths, token ids and arrival times.
    """

    num_requests: int
    input_len: LengthDist
    output_len: LengthDist
    vocab_size: int
    prefix_len: int = 0
    min_token_id: int = 0
    max_model_len: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.prefix_len < 0:
            raise ValueError(f"prefix_len must be >= 0, got {self.prefix_len}")
        if not 0 <= self.min_token_id < self.vocab_size:
            raise ValueError(f"need 0 <= min_token_id < vocab_size, got {self.min_token_id} and {self.vocab_size}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_model_len is not None and self.prefix_len + 2 > self.max_model_len:
            raise ValueError(f"prefix_len {self.prefix_len} leaves no room in max_model_len {self.max_model_len}")


@dataclass(frozen=True)
class RequestSpec:
    """One request of the run.

    index: position in the run (0-based); arrival_s: offset from the run's start at which it is due.
    prompt: token ids (prefix + own); output_len: max_tokens (with ignore_eos, the exact output length).
    """

    index: int
    arrival_s: float
    prompt: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Offsets in seconds from the start, first at 0: cumulative gamma(shape=burstiness, mean=1/rate) gaps."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    theta = 1.0 / (request_rate * burstiness)
    offsets, t = [0.0], 0.0
    for _ in range(num_requests - 1):
        t += rng.gammavariate(burstiness, theta)
        offsets.append(t)
    return offsets


def build_requests(config: TrafficConfig) -> tuple[list[RequestSpec], int]:
    """The run's requests in arrival order, and how many prompts were cut to fit max_model_len.

    Lengths and token ids come from one stream of `seed` and arrival gaps from another, so the same
    requests arrive at any request rate: a rate sweep varies only the timing.
    """
    rng = random.Random(config.seed)
    ids = range(config.min_token_id, config.vocab_size)
    prefix = rng.choices(ids, k=config.prefix_len)
    requests, num_cut = [], 0
    offsets = arrival_offsets(config.num_requests, config.request_rate, config.burstiness,
                              random.Random(f"{config.seed}-arrivals"))
    for index, arrival_s in enumerate(offsets):
        input_len, output_len = config.input_len.sample(rng), config.output_len.sample(rng)
        if config.max_model_len is not None:
            output_len = min(output_len, config.max_model_len - config.prefix_len - 1)
            room = config.max_model_len - config.prefix_len - output_len
            if input_len > room:
                input_len, num_cut = room, num_cut + 1
        prompt = prefix + rng.choices(ids, k=input_len)
        requests.append(RequestSpec(index, arrival_s, prompt, output_len))
    return requests, num_cut
