"""Synthetic traffic: reproducible from the seed, lengths as the distributions say, token ids in range, the
shared prefix shared, prompts cut to fit the model, arrival gaps with the asked rate and burstiness."""
from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest

from tests.benchmarks.harness import traffic

LengthDist, TrafficConfig = traffic.LengthDist, traffic.TrafficConfig


def config(**kw) -> TrafficConfig:
    base = dict(num_requests=50, input_len=LengthDist("uniform", 64, 0.5), output_len=LengthDist("lognormal", 32),
                vocab_size=1000, prefix_len=16, min_token_id=10, request_rate=4.0, seed=7)
    return TrafficConfig(**{**base, **kw})


def test_the_same_seed_sends_the_same_requests_at_any_rate():
    requests, _ = traffic.build_requests(config())
    again, _ = traffic.build_requests(config())
    faster, _ = traffic.build_requests(config(request_rate=math.inf))
    other, _ = traffic.build_requests(config(seed=8))
    assert requests == again
    assert [(r.prompt, r.output_len) for r in faster] == [(r.prompt, r.output_len) for r in requests]
    assert [r.arrival_s for r in faster] == [0.0] * 50
    assert [r.prompt for r in other] != [r.prompt for r in requests]


def test_prompts_share_the_prefix_and_stay_in_the_vocabulary():
    requests, num_cut = traffic.build_requests(config())
    prefix = requests[0].prompt[:16]
    assert num_cut == 0 and all(r.prompt[:16] == prefix for r in requests)
    assert all(10 <= t < 1000 for r in requests for t in r.prompt)
    assert all(16 + 32 <= r.prompt_len <= 16 + 96 for r in requests)  # uniform 64 +- 50%
    assert [r.index for r in requests] == list(range(50))
    assert len({tuple(r.prompt[16:]) for r in requests}) == 50


def test_length_distributions():
    rng = random.Random(0)
    assert {LengthDist("fixed", 100).sample(rng) for _ in range(20)} == {100}
    uniform = [LengthDist("uniform", 100, 0.2).sample(rng) for _ in range(2000)]
    assert min(uniform) == 80 and max(uniform) == 120
    lognormal = [LengthDist("lognormal", 200, sigma=1.0).sample(rng) for _ in range(20000)]
    assert 180 < statistics.mean(lognormal) < 220  # the mean is the asked length
    assert statistics.median(lognormal) < 0.7 * statistics.mean(lognormal)  # skewed: a long tail
    assert min(lognormal) >= 1
    for bad in (dict(kind="zipf"), dict(mean=0), dict(range_ratio=1.0), dict(sigma=-1.0)):
        with pytest.raises(ValueError):
            LengthDist(**{"kind": "uniform", "mean": 10, **bad})


def test_prompts_are_cut_to_fit_max_model_len():
    requests, num_cut = traffic.build_requests(config(input_len=LengthDist("fixed", 100),
                                                      output_len=LengthDist("fixed", 30), max_model_len=120))
    assert num_cut == 50
    assert all(r.prompt_len + r.output_len <= 120 and r.output_len == 30 for r in requests)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness(burstiness):
    offsets = traffic.arrival_offsets(4000, 10.0, burstiness, random.Random(1))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and min(gaps) >= 0.0
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.08)
    # gamma(k, theta): squared coefficient of variation 1 / k (Poisson: 1)
    assert statistics.pvariance(gaps) / statistics.mean(gaps) ** 2 == pytest.approx(1 / burstiness, rel=0.15)


def test_bad_traffic_is_refused():
    for bad in (dict(num_requests=0), dict(min_token_id=1000), dict(request_rate=0.0), dict(burstiness=0.0),
                dict(prefix_len=200, max_model_len=100)):
        with pytest.raises(ValueError):
            config(**bad)
    assert dataclasses.replace(config(), request_rate=math.inf).request_rate == math.inf
