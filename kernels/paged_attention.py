"""Paged attention over any KV format: decode (split-KV) and chunked prefill. The engine's API.

    out = paged_decode_attention(q, cache, block_tables, context_lens, scale,
                                 max_context_len=..., seq_slots=None)
        q [num_seqs, Hq, D] (one new token per sequence, already written to the cache)
    out = paged_prefill_attention(q, cache, cu_seqlens_q, context_lens, block_tables, scale,
                                  max_query_len=None, seq_slots=None)
        q [num_tokens, Hq, D]; sequence b's new tokens are rows cu_seqlens_q[b]:cu_seqlens_q[b+1]
        (int32 [num_seqs + 1]) and sit at the last positions of its context_lens[b] tokens; they
        attend causally to everything cached before them (chunked prefill) and to each other.
    out: like q. cache: a `PagedKVCache` (kv_formats); seq_slots [num_seqs] int32 for kivi2.

Both write the new tokens first (`fmt.write`) and then read every key/value from pages, so a
prefill sees its own tokens exactly as decode will later (quantized where the format says so).
Tensors on CUDA run the Triton kernels (`paged_attention_dense`, `_int4`, `_kivi`), others the
torch reference (`paged_attention_ref`); `impl` forces one.

Prefill runs on the same Triton kernels (BLOCK_M query rows per program) rather than torch SDPA:
SDPA cannot read pages or quantized codes, so it would need the whole context dequantized into a
contiguous copy for every chunk (an extra write and read of the cache) and one call per sequence
for variable lengths; `benchmarks/attention.py` measures both.

Decode is CUDA-graph capturable: the grid and the split count depend only on shapes, the SM
count and the caller's `max_context_len` bound (pass it; without it the launcher reads
context_lens.max() on the host). Split count: `decode_num_splits`. The split count and the
block tables' row stride are runtime arguments that Triton does not specialize on, so the
kernels compiled for one batch serve the next; `compile_decode` compiles every variant a
decode can pick before the first request (the engine does, when it starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from partita.kernels.kv_base import PagedKVCache, use_triton
from partita.kernels.paged_attention_common import combine_splits, combine_tiling
from partita.kernels.paged_attention_dense import dense_attention_kernel, dense_cache_args
from partita.kernels.paged_attention_int4 import (int4_attention_kernel, int4_cache_args,
                                                  int4_decode_args, int4_decode_kernel)
from partita.kernels.paged_attention_kivi import (kivi_attention_kernel, kivi_cache_args,
                                                  kivi_decode_args, kivi_decode_kernel)
from partita.kernels.paged_attention_ref import paged_attention_reference


@dataclass(frozen=True)
class AttentionConfig:
    """Tiling of one launch (kivi2 tiles are always one key group)."""

    block_n: int = 64  # cached tokens per tile
    block_m: int = 64  # prefill query rows (tokens x GQA heads) per program
    decode_block_m: int = 16  # decode rows at least (the GQA group, padded with idle rows)
    num_warps: int = 4
    num_stages: int = 2
    k_int8: bool = False  # int4/kivi2: int8 tensor-core dots for the scores where shapes allow
    v_int8: bool = False  # int4/kivi2: int8 dots for P V (P quantized per row and group)
    # decode: the kernel with tokens as its dots' rows where the format has one (int4 with one
    # group per head, kivi2 with one value group per head, float operands); False takes the
    # query-rows kernel that prefill uses
    token_rows: bool = True
    # kivi2 decode (token rows): two key groups per loop step, sharing one max, one rescale check
    # and one reduction per softmax sum
    key_group_pairs: bool = False
    # int4 decode (token rows): a tile's two halves unpacked and dotted one after the other under
    # one max and one rescale check, so that half a tile of unpacked codes is live at a time (fewer
    # registers than the 255 of whole tiles: more programs per SM)
    tile_halves: bool = False
    maxnreg: int | None = None  # decode with token rows: registers per thread at most


def attention_config(fmt_name: str, head_dim: int, is_decode: bool, num_splits: int = 1,
                     split_len: int | None = None) -> AttentionConfig:
    """Default tiling per format, from the H200 sweeps (`benchmarks/attention.py --sweep-only`,
    benchmarks/results/2026-11-24-attention-h200.md and, for int4/kivi2 since their codes are
    unpacked in PTX, 2026-11-24-attention-packed-h200.md): the fastest config at batch 64 x context
    8k (and, for bf16, also at 32 x 4k, 32 x 8k and 128 x 4k). Split launches (small batches) take
    128-token tiles with 3 stages when they split the context >= 8 ways, the fastest at batch 1 x
    32k (at batch 32 x 4k, 2 splits, the unsplit config stays faster). Float operands throughout:
    int8 tensor-core dots (`k_int8`, `v_int8`) were slower for int4 and kivi2 once unpacking was
    cheap, and add the 8-bit rounding of the query or P to every product. int4 decode takes
    one-warp programs over 64-token tiles at every shape (benchmarks/results/2026-11-25-attention-
    int4-h200.md; 2026-12-06-attention-token-rows.md for the token-rows kernel). Four warps over
    128-token tiles, which splits of <= 256 tokens used to take, were 1.3 to 1.6 times slower at
    small batches once batch 1 took shorter splits (`_SPLITS`): on an H100, 8 x 4k 34.3 us against
    20.9, 4 x 4k 19.9 against 14.6, 1 x 8k 14.0 against 10.7; only int4 with channel groups
    (query-rows kernel) at 1 x 4k was faster with them, 12.9 against 14.4
    (benchmarks/results/2026-12-06-attention-int4-splits.md). Splits longer than 1024 tokens take
    their tiles in two halves (`tile_halves`): on two H100s, 64 x 8k 229.7 and 231.3 us against
    234.0 and 236.1, 128 x 4k 225.6 and 225.7 against 228.4 and 228.1; at 32 x 4k (1024-token
    splits) 61.7 against 61.5 and at 1 x 32k 21.0 against 20.7, so those keep whole tiles
    (benchmarks/results/2026-12-06-attention-halves-h100.md). kivi2 decode takes
    one-warp programs over one key group (32 tokens) and 3 stages, the fastest there, except
    splits longer than 512 tokens, which take two key groups per loop step (`key_group_pairs`)
    over 2 stages: on one H100, 64 x 8k 145.9 us against 151.2, 128 x 4k 145.5 against 150.6; at
    32 x 4k (512-token splits) 45.9 against 44.4 and at 1 x 32k (128-token splits) 17.9 against
    16.4, so those keep single groups. Both are held to 128 registers (`maxnreg`; 16 programs per
    SM): unheld, ptxas gives them about 166, 12 programs per SM, and 64 x 8k takes 186 to 196 us
    (benchmarks/results/2026-12-06-attention-combine.md)."""
    if not is_decode:
        return AttentionConfig(block_n=64, block_m=64, num_warps=4,
                               num_stages=3 if fmt_name in ("none", "int4", "kivi2") else 2)
    if fmt_name == "kivi2":  # held to 128 registers: 16 programs per SM
        if split_len is None or split_len > 512:
            return AttentionConfig(num_warps=1, num_stages=2, key_group_pairs=True, maxnreg=128)
        return AttentionConfig(num_warps=1, num_stages=3, maxnreg=128)
    if fmt_name == "none":
        if num_splits >= 8:
            return AttentionConfig(block_n=128, num_warps=4, num_stages=3)
        return AttentionConfig(block_n=64, num_warps=4, num_stages=2)
    if fmt_name == "int4":  # one warp per program: no cross-warp reductions or exchanges
        return AttentionConfig(block_n=64, num_warps=1, num_stages=3,
                               tile_halves=split_len is None or split_len > 1024)
    return AttentionConfig(block_n=128, num_warps=4, num_stages=3)



def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                      min_tokens_per_split: int = 256, waves: int = 2, pow2: bool = False,
                      max_splits: int = 64) -> int:
    """FlashDecoding split count: enough programs for `waves` per SM, splits >= min tokens, at
    most `max_splits`; `pow2` rounds the count for the SMs up to a power of two (even tile counts
    per split)."""
    programs = num_seqs * num_kv_heads
    if programs >= waves * num_sms:
        return 1
    by_len = max(1, max_context_len // min_tokens_per_split)
    wanted = triton.cdiv(waves * num_sms, programs)
    if pow2:
        wanted = triton.next_power_of_2(wanted)
    return max(1, min(wanted, by_len, max_splits))


# (waves, min tokens per split, max splits) of `choose_num_splits` per format. One-warp programs
# of the token-rows kernels: int4's take 255 registers (8 resident per SM) and aim at 4 per SM
# (batch 64 x 8k: 2 splits); kivi2's take 128 (16 per SM) and aim at 8. Small batches cut their
# contexts into short splits to fill the SMs: int4's down to 128 tokens (two tiles), kivi2's down
# to 64 (two key groups), at most 128 and 256 splits. On an H100 against the counts before (256
# and 128 tokens at least, at most 64 and 256 splits), whole calls with the split merge
# (benchmarks/results/2026-12-06-attention-int4-splits.md): int4 1 x 32k 20.4 us against 22.5,
# 1 x 16k 13.3 against 19.7 (four warps before), 2 x 8k 14.3 against 20.5; kivi2 1 x 4k 8.4
# against 10.1, 1 x 8k 8.9 against 11.1, 4 x 4k 12.0 against 13.0. Halving int4's splits further
# was slower (1 x 32k 24.0 us with 256). kivi2 at 1 x 32k takes 256, since the split merge reads
# its partials in a few hundred programs (`combine_splits`): 16.5 us against 18.0 with 128
# (2026-12-06-attention-combine.md). Large batches keep the counts of
# benchmarks/results/2026-12-06-attention-token-rows.md (kivi2 64 x 8k 150 us with 4 splits
# against 333 with 1). Counts are powers of two (int4 at 32 x 4k on an H200: 4 splits 60 us,
# 3 splits 77).
_SPLITS = {"int4": (4, 128, 128), "kivi2": (8, 64, 256)}


def decode_num_splits(cache: PagedKVCache, num_seqs: int, max_context_len: int) -> int:
    """The split count `paged_decode_attention` takes by default (see `_SPLITS`)."""
    device = cache.device
    num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
    waves, min_tokens, max_splits = _SPLITS.get(cache.fmt.name, (2, 256, 64))
    return choose_num_splits(num_seqs, cache.num_kv_heads, max_context_len, num_sms,
                             min_tokens_per_split=min_tokens, waves=waves, pow2=waves > 2,
                             max_splits=max_splits)


def _check(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
           context_lens: torch.Tensor, seq_slots: torch.Tensor | None, num_seqs: int) -> None:
    if q.dim() != 3 or q.shape[2] != cache.head_dim or q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q.shape={tuple(q.shape)}: expected [*, k * {cache.num_kv_heads}, "
                         f"{cache.head_dim}]")
    if q.dtype != cache.dtype or q.stride(-1) != 1:
        raise ValueError(f"q: expected {cache.dtype} with a contiguous last dim")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or \
            block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables: expected int32 [{num_seqs}, max_blocks_per_seq]")
    if tuple(context_lens.shape) != (num_seqs,) or context_lens.dtype != torch.int32:
        raise ValueError(f"context_lens: expected int32 [{num_seqs}]")
    if cache.fmt.needs_seq_slots and (seq_slots is None or tuple(seq_slots.shape) != (num_seqs,)):
        raise ValueError(f"seq_slots: kv_format {cache.fmt.name!r} needs int32 [{num_seqs}]")


def _split_scratch(q: torch.Tensor, num_splits: int, out: torch.Tensor):
    """float32 partials (acc [B, Hq, S, D], (m, l) [B, Hq, S, 2]) of a split launch."""
    if num_splits == 1:
        return out, out  # unused
    b, hq, d = q.shape
    return (torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=q.device),
            torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=q.device))


def _token_rows_kernel(cache: PagedKVCache, cfg: "AttentionConfig"):
    """The decode kernel with tokens as its dots' rows for this cache, and its cache arguments, if
    there is one: int4 and kivi2 with one (scale, zero) group per head (int4) or per token (kivi2
    values), and float operands."""
    fmt, d = cache.fmt, cache.head_dim
    if cfg.k_int8 or cfg.v_int8 or not cfg.token_rows:
        return None
    if fmt.name == "int4" and fmt.group_size == d:
        return int4_decode_kernel, int4_decode_args(cache, cfg.block_n, cfg.tile_halves)
    if fmt.name == "kivi2" and fmt.value_group(d) == d:
        return kivi_decode_kernel, kivi_decode_args(cache, cfg.key_group_pairs)
    return None


def _launch_token_rows(kernel, cache_args, meta, q, cache, block_tables, context_lens, seq_slots,
                       scale, out, *, num_splits: int, cfg: AttentionConfig) -> None:
    num_seqs, hkv = block_tables.shape[0], cache.num_kv_heads
    gq = q.shape[1] // hkv
    part_acc, part_ml = _split_scratch(q, num_splits, out)
    kernel[(num_seqs, num_splits, hkv)](
        out, q, block_tables, context_lens, context_lens if seq_slots is None else seq_slots,
        part_acc, part_ml, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), num_splits,
        *cache_args,
        NUM_KV_HEADS=hkv, HEAD_DIM=cache.head_dim, BLOCK_SIZE=cache.block_size, GQ=gq,
        GQ_PAD=triton.next_power_of_2(gq), SPLIT=num_splits > 1, **meta,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}))
    if num_splits > 1:
        combine_splits(out, part_acc, part_ml)


def _launch(q, cache, block_tables, context_lens, cu_seqlens_q, seq_slots, scale, out, *,
            is_decode: bool, num_splits: int, grid_q: int, cfg: AttentionConfig) -> None:
    num_seqs, hkv, d = block_tables.shape[0], cache.num_kv_heads, cache.head_dim
    gq = q.shape[1] // hkv
    gq_pad = triton.next_power_of_2(gq)
    block_m = max(cfg.decode_block_m, gq_pad) if is_decode else max(cfg.block_m, gq_pad)
    block_n = cfg.block_n
    name = cache.fmt.name
    if name == "int4":
        kernel = int4_attention_kernel
        cache_args, meta = int4_cache_args(cache, cfg.k_int8, cfg.v_int8)
    elif name == "kivi2":
        kernel = kivi_attention_kernel
        cache_args, meta = kivi_cache_args(cache, cfg.k_int8, cfg.v_int8)
        block_n = cache.fmt.group_size
    else:
        kernel = dense_attention_kernel
        cache_args, meta = dense_cache_args(cache)
    part_acc, part_ml = _split_scratch(q, num_splits, out)
    kernel[(num_seqs, grid_q * num_splits, hkv)](
        out, q, block_tables, context_lens,
        context_lens if cu_seqlens_q is None else cu_seqlens_q,
        context_lens if seq_slots is None else seq_slots,
        part_acc, part_ml, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), num_splits,
        *cache_args,
        NUM_KV_HEADS=hkv, HEAD_DIM=d, BLOCK_SIZE=cache.block_size, GQ=gq, GQ_PAD=gq_pad,
        BLOCK_Q=1 if is_decode else block_m // gq_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        SPLIT=num_splits > 1, IS_DECODE=is_decode, **meta,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits > 1:
        combine_splits(out, part_acc, part_ml)


def paged_decode_attention(q: torch.Tensor, cache: PagedKVCache, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *,
                           max_context_len: int | None = None,
                           seq_slots: torch.Tensor | None = None,
                           num_splits: int | None = None, config: AttentionConfig | None = None,
                           out: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """One query per sequence over its paged context; see the module docstring."""
    num_seqs = q.shape[0]
    _check(q, cache, block_tables, context_lens, seq_slots, num_seqs)
    if not use_triton(impl, q):
        ref = paged_attention_reference(q, cache, block_tables, context_lens, scale,
                                        seq_slots=seq_slots)
        return ref.to(q.dtype) if out is None else out.copy_(ref)
    out = torch.empty_like(q) if out is None else out
    if num_splits is None:
        if max_context_len is None:
            max_context_len = int(context_lens.max())  # host sync: pass it under CUDA graphs
        num_splits = decode_num_splits(cache, num_seqs, max_context_len)
    split_len = None if max_context_len is None else triton.cdiv(max_context_len, num_splits)
    cfg = config or attention_config(cache.fmt.name, cache.head_dim, True, num_splits, split_len)
    token_rows = _token_rows_kernel(cache, cfg)
    if token_rows is not None:
        kernel, (cache_args, meta) = token_rows
        _launch_token_rows(kernel, cache_args, meta, q, cache, block_tables, context_lens,
                           seq_slots, scale, out, num_splits=num_splits, cfg=cfg)
        return out
    _launch(q, cache, block_tables, context_lens, None, seq_slots, scale, out, is_decode=True,
            num_splits=num_splits, grid_q=1, cfg=cfg)
    return out


def decode_launches(cache: PagedKVCache, num_q_heads: int, max_num_seqs: int,
                    max_context_len: int) -> list[tuple[int, int, int]]:
    """(num_seqs, max_context_len, num_splits): one `paged_decode_attention` launch for each kernel
    variant its defaults can pick for up to max_num_seqs sequences of up to max_context_len tokens.
    A variant is what Triton compiles anew: the config (`attention_config`, from the split count
    and the split length), split or not, and the combine's tiling (`combine_tiling`). The split
    count and length are runtime arguments, so batch sizes 1..max_num_seqs at contexts of 2^k and
    2^k + 1 tokens reach every variant (the configs' thresholds are powers of two)."""
    lens = sorted({min(c, max_context_len) for k in range(max_context_len.bit_length())
                   for c in (1 << k, (1 << k) + 1)} | {max_context_len})
    variants: dict[tuple, tuple[int, int, int]] = {}
    for b in range(1, max_num_seqs + 1):
        for n in lens:
            key = decode_variant(cache, num_q_heads, b, n)
            if key not in variants:
                variants[key] = (b, n, decode_num_splits(cache, b, n))
    return list(variants.values())


def decode_variant(cache: PagedKVCache, num_q_heads: int, num_seqs: int, max_context_len: int) -> tuple:
    """What `paged_decode_attention` compiles for this batch with its default split count: equal
    values, one compiled variant (see `decode_launches`)."""
    d = cache.head_dim
    s = decode_num_splits(cache, num_seqs, max_context_len)
    return (attention_config(cache.fmt.name, d, True, s, triton.cdiv(max_context_len, s)), s > 1,
            combine_tiling(num_seqs * num_q_heads, s, d) if s > 1 else None)


def compile_decode(cache: PagedKVCache, num_q_heads: int, max_num_seqs: int, max_context_len: int) -> int:
    """Launches every variant of `decode_launches` once over one-token contexts (block 0, output
    discarded), so that Triton compiles them now rather than at their first use; returns how many.
    Reads the cache, writes nothing to it."""
    launches = decode_launches(cache, num_q_heads, max_num_seqs, max_context_len)
    dev = cache.device
    for b, n, s in launches:
        q = torch.zeros(b, num_q_heads, cache.head_dim, dtype=cache.dtype, device=dev)
        ones = torch.ones(b, dtype=torch.int32, device=dev)
        paged_decode_attention(q, cache, torch.zeros(b, 1, dtype=torch.int32, device=dev), ones, 1.0,
                               max_context_len=n, seq_slots=ones - 1, num_splits=s)
    return len(launches)


def paged_prefill_attention(q: torch.Tensor, cache: PagedKVCache, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                            *, max_query_len: int | None = None,
                            seq_slots: torch.Tensor | None = None,
                            config: AttentionConfig | None = None,
                            out: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Causal attention of new tokens over their paged contexts; see the module docstring."""
    num_seqs = context_lens.shape[0]
    _check(q, cache, block_tables, context_lens, seq_slots, num_seqs)
    if tuple(cu_seqlens_q.shape) != (num_seqs + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q: expected int32 [{num_seqs + 1}]")
    if not use_triton(impl, q):
        ref = paged_attention_reference(q, cache, block_tables, context_lens, scale,
                                        cu_seqlens_q=cu_seqlens_q, seq_slots=seq_slots)
        return ref.to(q.dtype) if out is None else out.copy_(ref)
    out = torch.empty_like(q) if out is None else out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # host sync
    cfg = config or attention_config(cache.fmt.name, cache.head_dim, False)
    gq_pad = triton.next_power_of_2(q.shape[1] // cache.num_kv_heads)
    block_q = max(cfg.block_m, gq_pad) // gq_pad
    _launch(q, cache, block_tables, context_lens, cu_seqlens_q, seq_slots, scale, out,
            is_decode=False, num_splits=1, grid_q=triton.cdiv(max_query_len, block_q), cfg=cfg)
    return out
