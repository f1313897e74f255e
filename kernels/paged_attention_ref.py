"""Torch reference of paged attention over any KV format (what the engine runs on CPU).

    decode:  q [num_seqs, Hq, D], one query per sequence at position context_len - 1
    prefill: q [num_tokens, Hq, D], sequence b's queries are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
             at the last positions of its context (causal w.r.t. absolute positions)

K/V come from `fmt.gather` (dequantized pages plus, for kivi2, the residual), query head h uses
kv head h // (Hq // Hkv). One sequence at a time, in `compute_dtype` (float64 in tests).
"""
from __future__ import annotations

import torch

from partita.kernels.kv_base import PagedKVCache


def paged_attention_reference(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                              context_lens: torch.Tensor, scale: float, *,
                              cu_seqlens_q: torch.Tensor | None = None,
                              seq_slots: torch.Tensor | None = None,
                              compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention output [rows of q, Hq, D] in `compute_dtype` (see the module docstring)."""
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    group = q.shape[1] // cache.num_kv_heads
    lens = context_lens.tolist()
    starts = list(range(len(lens) + 1)) if cu_seqlens_q is None else cu_seqlens_q.tolist()
    for b, ctx_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        if q1 == q0 or ctx_len == 0:
            continue
        num_blocks = -(-ctx_len // cache.block_size)
        slot = None if seq_slots is None else int(seq_slots[b])
        k, v = cache.fmt.gather(cache, block_tables[b, :num_blocks].long(), ctx_len, slot)
        k = k.to(compute_dtype).repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v.to(compute_dtype).repeat_interleave(group, dim=1)
        out[q0:q1] = attention_reference(q[q0:q1].to(compute_dtype), k, v, scale)
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """q [n, Hq, D] at the last n positions of k, v [L, Hq, D]; causal; returns [n, Hq, D]."""
    n, ctx_len = q.shape[0], k.shape[0]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    pos = torch.arange(ctx_len - n, ctx_len, device=q.device)
    visible = torch.arange(ctx_len, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v)
