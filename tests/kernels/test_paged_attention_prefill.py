"""Chunked prefill over paged KV: the Triton kernels against the float64 reference.

Each sequence has `cached` tokens written by an earlier call and `new` tokens written now; the new
tokens' queries attend causally (by absolute position) to the cached pages and to each other.
Every format (the kivi2 residual carries over between the two writes), GQA group 4, odd lengths,
shuffled pages, fresh random inputs (seed in the failure message), outputs poisoned with NaN.
Tolerance as for decode: ||out - ref|| / ||ref|| <= 1e-2 (float operands, 16-bit output).
"""
import secrets

import pytest
import torch

from partita.kernels.kv_formats import get_kv_format
from partita.kernels.kv_testing import make_paged_batch, outlier_kv
from partita.kernels.paged_attention import AttentionConfig, paged_prefill_attention
from partita.kernels.paged_attention_ref import paged_attention_reference

from .test_paged_attention_decode import DEVICE, FORMATS, TOL_FLOAT, poisoned  # noqa: F401

CHUNKS = [(0, 37), (45, 20), (64, 1), (100, 33)]  # (cached, new) per sequence


@pytest.mark.parametrize("spec,block_size,head_dim,dtype", FORMATS)
@pytest.mark.parametrize("block_m", [64, 16])
def test_chunked_prefill_matches_float64_reference(poisoned, spec, block_size, head_dim, dtype,
                                                   block_m):
    seed = secrets.randbelow(2**31 - 1)
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for c, n in CHUNKS]
    fmt = get_kv_format(spec)
    batch = make_paged_batch(lens, block_size, max_num_seqs=6, device=DEVICE, generator=g)
    cache = fmt.allocate(int(batch.block_tables.max()) + 1, block_size, 2, head_dim, dtype,
                         DEVICE, max_num_seqs=6)
    old_slots, old_seqs, _ = batch.write_plan([0] * len(lens))
    k, v = outlier_kv(len(old_slots), 2, head_dim, dtype=dtype, device=DEVICE, generator=g)
    if fmt.name == "fp8":
        fmt.calibrate(cache, k, v)
    starts = torch.cumsum(torch.tensor([0] + lens), 0).tolist()
    cached = torch.cat([torch.arange(s, s + c) for s, (c, _) in zip(starts, CHUNKS)])
    new = torch.cat([torch.arange(s + c, s + c + n) for s, (c, n) in zip(starts, CHUNKS)])
    for idx in (cached, new):  # two calls: the earlier chunk, then this one
        fmt.write(cache, k[idx], v[idx], old_slots[idx], old_seqs[idx])
    cu = torch.cumsum(torch.tensor([0] + [n for _, n in CHUNKS]), 0).to(torch.int32).to(DEVICE)
    q = torch.randn(len(new), 8, head_dim, generator=g).to(dtype).to(DEVICE)
    scale = head_dim ** -0.5
    ref = paged_attention_reference(q, cache, batch.block_tables, batch.context_lens, scale,
                                    cu_seqlens_q=cu, seq_slots=batch.seq_slots,
                                    compute_dtype=torch.float64)
    out = paged_prefill_attention(q, cache, cu, batch.context_lens, batch.block_tables, scale,
                                  seq_slots=batch.seq_slots, config=AttentionConfig(
                                      block_n=32, block_m=block_m), impl="triton")
    assert torch.isfinite(out).all(), f"rows not written, seed {seed}"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= TOL_FLOAT, f"relative error {err:.2e}, seed {seed}"
