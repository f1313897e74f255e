"""Paged attention through partita's KV formats and Triton kernels (`partita.kernels`).

One `PagedKVCache` per layer in the engine's KV format (`none`, `fp8`, `int8`, `int4`, `kivi2`): new keys
and values are quantized as they are written (`fmt.write`), and attention dequantizes in registers
(`paged_prefill_attention`, `paged_decode_attention`). Tensors on CUDA run the Triton kernels, others the
torch references of the same modules, so every format also works on CPU.

The formats store fp16/bf16; a float32 model (the CPU default) hands them bf16 keys, values and queries
and gets float32 outputs back. Padding tokens (slot -1) are skipped by the writes, so unlike the torch
backend no scratch block is needed.
"""
from __future__ import annotations

import torch

from partita.kernels.kv_base import KVFormat, PagedKVCache
from partita.kernels.paged_attention import compile_decode, paged_decode_attention, paged_prefill_attention
from partita.workers.attention.backend import AttentionMetadata


def cache_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """What the KV formats store for a model of `model_dtype` (they hold fp16 or bf16 only)."""
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


class KernelPagedAttention:
    name = "kernel"

    def __init__(self, fmt: KVFormat, max_num_seqs: int):
        self.fmt = fmt
        self.max_num_seqs = max_num_seqs
        self.caches: list[PagedKVCache] = []

    def allocate(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.caches = []  # drop the old cache before the new one takes its memory
        self.caches = [self.fmt.allocate(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype(dtype),
                                         device, max_num_seqs=self.max_num_seqs) for _ in range(num_layers)]

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        specs = self.fmt.part_specs(block_size, num_kv_heads, head_dim, cache_dtype(dtype))
        return sum(torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
                   for shape, dt in specs.values())

    def fixed_bytes(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Per-layer memory that does not scale with blocks (kivi2's full-precision residuals)."""
        probe = self.fmt.allocate(0, block_size, num_kv_heads, head_dim, cache_dtype(dtype), "meta",
                                  max_num_seqs=self.max_num_seqs)
        return sum(t.numel() * t.element_size() for t in probe.state.values())

    def compile_decode(self, num_q_heads: int, max_num_seqs: int, max_context_len: int) -> int:
        cache = self.caches[0]
        if cache.device.type != "cuda":
            return 0  # torch references: nothing to compile
        return compile_decode(cache, num_q_heads, max_num_seqs, max_context_len)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None) -> torch.Tensor:
        cache = self.caches[layer]
        out_dtype = q.dtype
        if q.dtype != cache.dtype:
            q, k, v = q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype)
        self.fmt.write(cache, k, v, meta.slot_mapping, meta.token_seq_slots)
        out = torch.empty_like(q)
        p = meta.num_prefill_tokens
        if p:
            paged_prefill_attention(q[:p], cache, meta.prefill_cu_seqlens, meta.prefill_context_lens,
                                    meta.prefill_block_tables, scale, max_query_len=meta.max_prefill_query_len,
                                    seq_slots=meta.prefill_seq_slots, out=out[:p])
        if meta.num_decodes:
            d = slice(p, p + meta.num_decodes)
            paged_decode_attention(q[d], cache, meta.decode_block_tables, meta.decode_context_lens, scale,
                                   max_context_len=meta.max_decode_context_len, seq_slots=meta.decode_seq_slots,
                                   out=out[d])
        return out if out.dtype == out_dtype else out.to(out_dtype)
