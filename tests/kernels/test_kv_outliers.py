"""Proof: relative attention-output error of every KV format on keys with outlier channels.

One sequence of 512 tokens (2 kv heads, 8 query heads, head_dim 128) with keys from `outlier_kv`
(4 channels per head with offsets of 5..10 and twice the spread; values N(0, 1)), fresh random
each run. Error = ||o - o64|| / ||o64|| against float64 attention over the unquantized K/V, for
the decode kernel ("kernel") and with only keys or only values dequantized. Values are plain
N(0, 1) noise, so an output (a weighted mean of ~hundreds of tokens) is small and every format's
per-element value error shows up in full: these are harsh upper-end figures, not model quality.

Bounds (kernel error; median and worst of 40 seeds on CPU in brackets, two runs of 40 for the
quantized formats where they differed):
    none 0.01 (0.002, 0.002)   fp8 0.15 (0.055, 0.072-0.099)   int8 0.04 (0.020, 0.025)
    int4 g32 0.35 (0.20, 0.234-0.253)   int4 g64 0.65 (0.267, 0.336-0.476)
    int4 g128 0.80 (0.353, 0.512-0.578)   kivi2 1.10 (0.655, 0.802-0.812; 2 bits: values carry most)
The tails are the data's, not the kernels': on the worst seeds the Triton kernel's error is within
1% of the torch reference's over the same cache. int4 g128 has the heaviest tail: one outlier key
channel in a 128-wide group stretches the whole group's scale.
KIVI's point is checked on keys alone: with outliers, per-channel 2-bit keys (kivi2) beat 2-bit
per-token keys (simulated here) by far, and kivi2's key error does not grow with the outliers
while per-token int4's does.
"""
import secrets

import pytest
import torch

from partita.kernels.kv_quant import asym_quantize
from partita.kernels.kv_testing import output_errors, outlier_kv
from partita.kernels.paged_attention_ref import attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUNDS = {"none": 0.01, "fp8": 0.15, "int8": 0.04, "int4:group_size=32": 0.35,
          "int4:group_size=64": 0.65, "int4": 0.80, "kivi2": 1.10}


def _data(outlier_scale: float, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    k, v = outlier_kv(512, 2, 128, outlier_scale=outlier_scale, device=DEVICE, generator=g)
    q = torch.randn(1, 8, 128, generator=g, device=DEVICE).to(torch.bfloat16)
    return k, v, q


def test_output_error_per_format():
    seed = secrets.randbelow(2**31 - 1)
    k, v, q = _data(10.0, seed)
    rows = []
    for spec, bound in BOUNDS.items():
        e = output_errors(spec, k, v, q, impl="triton", write_impl="torch")  # writes: tested apart
        rows.append(f"{spec:22s} kernel {e['kernel']:.3f}  keys only {e['keys']:.3f}  "
                    f"values only {e['values']:.3f}")
        assert e["kernel"] <= bound, f"{spec}: {e}, seed {seed}"
    print("\nrelative attention-output error, outlier keys (seed %d)\n" % seed + "\n".join(rows))


def _per_token_2bit_keys_error(k, v, q) -> float:
    codes, s, z = asym_quantize(k, -1, 3)  # 2 bits per token and head, as int4 does with 4
    kq = codes.float() * s.float() + z.float()
    truth = attention_reference(q.double(), k.double().repeat_interleave(4, 1),
                                v.double().repeat_interleave(4, 1), 128 ** -0.5)
    o = attention_reference(q.double(), kq.double().repeat_interleave(4, 1),
                            v.double().repeat_interleave(4, 1), 128 ** -0.5)
    return ((o - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("trial", range(2))
def test_per_channel_keys_absorb_outliers(trial):
    seed = secrets.randbelow(2**31 - 1)
    plain, outliers = _data(0.0, seed), _data(10.0, seed)
    kivi = [output_errors("kivi2", *d, impl="torch")["keys"] for d in (plain, outliers)]
    per_token_2bit = _per_token_2bit_keys_error(*outliers)
    assert kivi[1] < 0.5 * per_token_2bit, (kivi, per_token_2bit, seed)
    assert kivi[1] < 1.3 * kivi[0], (kivi, seed)  # outliers barely matter per channel
    # ... but do per token. One sequence's error is noisy (outliers/plain over 120 seeds: 1.25 once, else 2.0-5.2),
    # so 4 sequences' errors are summed (40 such sums over 160 seeds: at least 2.30, median 2.85)
    seeds = [seed] + [secrets.randbelow(2**31 - 1) for _ in range(3)]
    data = [[plain, *(_data(0.0, s) for s in seeds[1:])], [outliers, *(_data(10.0, s) for s in seeds[1:])]]
    int4 = [sum(output_errors("int4", *d, impl="torch")["keys"] for d in sets) for sets in data]
    assert int4[1] > 1.5 * int4[0], (int4, seeds)
