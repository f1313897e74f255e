"""Paged attention in plain PyTorch: the reference backend, and the one used on CPU.

Cache per layer: k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] in the model dtype.
Prefill chunks attend through torch SDPA over the sequence's gathered pages; decodes gather the pages of the
whole batch into [B, max_blocks * block_size, Hkv, D] and run one masked SDPA (GQA handled by SDPA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from partita.workers.attention.backend import AttentionMetadata


class TorchPagedAttention:
    name = "torch"

    def __init__(self) -> None:
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    def allocate(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)  # + the scratch block of write_kv
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def fixed_bytes(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()  # scratch

    def compile_decode(self, num_q_heads: int, max_num_seqs: int, max_context_len: int) -> int:
        return 0  # torch operators: nothing to compile

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None) -> torch.Tensor:
        k_cache, v_cache = self.k_caches[layer], self.v_caches[layer]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        for p in meta.prefills:
            sl = slice(p.query_start, p.query_start + p.query_len)
            if p.context_len == p.query_len:
                keys, values = k[sl], v[sl]
            else:
                keys = gather_pages(k_cache, p.block_table, p.context_len)
                values = gather_pages(v_cache, p.block_table, p.context_len)
            out[sl] = prefill_attention(q[sl], keys, values, scale, sliding_window)
        if meta.num_decodes:
            d = slice(meta.num_prefill_tokens, meta.num_prefill_tokens + meta.num_decodes)
            out[d] = decode_attention(q[d], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                      scale, sliding_window)
        return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Stores k, v [T, Hkv, D] at their slots. Slot -1 (padding) goes to the cache's last block, a scratch
    block the block manager never hands out, which keeps shapes static for CUDA graphs."""
    num_blocks, block_size = k_cache.shape[:2]
    scratch_slot = (num_blocks - 1) * block_size
    slots = torch.where(slot_mapping >= 0, slot_mapping, torch.full_like(slot_mapping, scratch_slot))
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence: [length, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:length]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions of a sequence over its k, v [L, Hkv, D]."""
    q_len, ctx_len = q.shape[0], k.shape[0]
    q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
    k_pos = torch.arange(ctx_len, device=q.device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                         v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """One query per sequence. q: [B, Hq, D]; block_tables: [B, W]; context_lens: [B] -> [B, Hq, D]."""
    batch, width = block_tables.shape
    block_size = k_cache.shape[1]
    keys = k_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)  # [B, Hkv, W * block_size, D]
    values = v_cache[block_tables.long()].flatten(1, 2).transpose(1, 2)
    pos = torch.arange(width * block_size, device=q.device)[None, :]
    lens = context_lens.long()[:, None]
    mask = pos < lens
    if sliding_window is not None:
        mask &= pos >= lens - sliding_window
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=q.shape[1] != keys.shape[1])
    return out.squeeze(2)
