"""Fused MoE expert compute: grouped SwiGLU experts over routed (token, expert) pairs.

Operation, for every token t and each of its K routed experts e = topk_ids[t, k]:

    out[t] = sum_k topk_weights[t, k] * w2[e] @ (silu(w13[e, :I] @ x_t) * (w13[e, I:] @ x_t))

Shapes and layout (all row-major, last dimension contiguous for speed; any strides are accepted):
    hidden:       [T, H]      bf16, fp16 or fp32
    w13:          [E, 2I, H]  same dtype; rows [0, I) gate projection, rows [I, 2I) up projection
    w2:           [E, H, I]   same dtype; down projection
    topk_weights: [T, K]      fp32 routing weights
    topk_ids:     [T, K]      int32 or int64 *physical* expert slots in [0, E) (the caller has
                              already applied the logical-to-physical expert map)
    returns:      [T, H]      hidden's dtype

This file is a little over 400 lines because the routing, both grouped GEMMs and the reference
share one contract and one set of tests.

How it runs (no host synchronisation; grids sized from T, K, E and shapes only, so the whole call
can be captured in a CUDA graph):
 1. Routing: pair ids (p = t*K + k) grouped by expert, groups end to end (no padding), plus the
    pair count per expert. Decode-sized inputs: `_route_one_program_kernel`, one launch (one-hot
    matrix, prefix sums). Larger: memset + `_count_kernel` (an atomic per pair gives its count
    and its rank in its group; order inside a group is free, rows are independent) +
    `_scatter_kernel`.
 2. `_gate_up_kernel`: grouped GEMM over m-blocks of one expert each, hidden rows gathered by
    token, SiLU(gate) * up fused in the epilogue -> act [T*K, I] (hidden's dtype).
 3. `_down_kernel`: grouped GEMM act @ w2[e]^T with the routing weight applied -> y [T, K, H].
 4. torch sum over K (fp32 accumulation) -> out [T, H]; no atomic adds of results anywhere.
Each GEMM program finds its expert and rows itself from the per-expert counts (a prefix sum over
E), so BLOCK_M is free for the autotuner. The grid covers the worst case,
floor((T*K + min(E, T*K) * (BLOCK_M - 1)) / BLOCK_M) m-blocks; blocks past the last group exit at
once. Expert weights are read in place by expert id, never gathered; with a few tokens per expert
each used expert's weights are streamed about once.

Accuracy: fp32 accumulation everywhere; fp32 inputs use IEEE dot products (no TF32); act and y
are rounded to hidden's dtype before the final sum, like the caller's own activations would be.

Limits: ids outside [0, E) are skipped (no out-of-bounds access) but the rows of those tokens are
undefined. fp64 and quantized weights are not supported by the kernel (the reference takes fp64).
On CPU call `fused_moe_reference`; `fused_moe` runs on CPU only under TRITON_INTERPRET=1 (tests).
Autotuning happens on the first call per (pairs bucket, E, shape): warm up before graph capture. Its
choices are kept in Triton's cache directory (`TRITON_CACHE_DIR`), keyed by kernel source, GPU
architecture and shapes, so a later process (a restart, a healed or added worker) skips the timing:
a tiny-moe engine started on an H100 in 22.2 s with a warm cache without this, 1.4 s with it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Pairs handled by one program of the routing kernels (count, scatter), and experts compared at
# once when the scatter kernel sums the group sizes in front of each pair's expert.
_ROUTE_BLOCK = 128
_ROUTE_EXPERT_CHUNK = 64
# Decode-sized routings (pairs x experts, both rounded up to powers of two, at most this) are
# routed by one program in one launch: its [pairs, experts] one-hot matrix stays in registers.
_ONE_PROGRAM_ROUTE_ELEMENTS = 16384


def _interpreting() -> bool:
    """Triton's own switch (read by Triton when kernels are decorated); not a partita setting."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _gemm_configs(gated: bool) -> list[triton.Config]:
    """Autotune space of a grouped GEMM; one pinned config under the interpreter (tests).
    gated: the gate/up kernel, whose two accumulators make a BLOCK_N tile cost 2 * BLOCK_N."""
    def cfg(bm: int, bn: int, bk: int, group_m: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                             num_warps=warps, num_stages=stages)

    if _interpreting():
        return [cfg(16, 16, 32, 1, 4, 1)]
    configs = [
        # Decode: one m-block per expert, weights streamed once; narrow N tiles give enough
        # programs to cover every SM, deep K and many stages keep enough bytes in flight.
        cfg(16, 32, 128, 1, 4, 4), cfg(16, 32, 128, 1, 4, 6), cfg(16, 32, 256, 1, 4, 3),
        cfg(16, 32, 256, 1, 4, 5), cfg(16, 64, 128, 1, 4, 4), cfg(16, 64, 128, 1, 4, 6),
        cfg(16, 64, 256, 1, 4, 3), cfg(16, 32, 128, 1, 2, 6), cfg(16, 16, 256, 1, 2, 6),
        # A few to a few tens of rows per expert.
        cfg(32, 64, 128, 1, 4, 4), cfg(32, 128, 64, 4, 4, 4), cfg(64, 64, 64, 8, 4, 4),
        cfg(64, 64, 128, 8, 4, 4), cfg(64, 128, 64, 8, 4, 4), cfg(64, 128, 64, 8, 4, 3),
        cfg(64, 128, 64, 8, 8, 4),
        # Prefill: compute-bound tiles; GROUP_M shares weight tiles between m-blocks in L2.
        cfg(128, 128, 64, 8, 8, 3), cfg(128, 128, 64, 8, 8, 4), cfg(128, 64, 64, 8, 4, 4),
    ]
    if not gated:
        configs.append(cfg(128, 256, 64, 8, 8, 3))
    return configs


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep BLOCK_M near the expected rows per used expert: smaller wastes weight reads, larger
    wastes MMA work on padding rows. Drop BLOCK_N and BLOCK_K past the matrix's N and K (next
    power of two): such tiles only add masked work, and each config costs a compile at the first
    start (tiny-moe's first start on an H100 took 105 s, most of it compiling configs). When no
    tile fits, the smallest one."""
    num_pairs, num_experts = named_args["num_pairs"], named_args["num_experts"]
    rows = triton.cdiv(num_pairs, max(1, min(num_experts, num_pairs)))
    cap = min(128, max(16, triton.next_power_of_2(rows)))
    inter, hidden = named_args["inter_size"], named_args["hidden_size"]
    n, k = (inter, hidden) if "w13_ptr" in named_args else (hidden, inter)  # gate/up, or down
    n_cap, k_cap = triton.next_power_of_2(n), triton.next_power_of_2(k)
    by_rows = [c for c in configs if cap // 4 <= c.kwargs["BLOCK_M"] <= cap] or configs[:1]
    fitting = [c for c in by_rows if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    return fitting or [min(by_rows, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _num_blocks_m(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Worst-case m-block count over all routings: sum_e cdiv(count_e, BLOCK_M) is at most this."""
    return (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m


@triton.jit
def _route_one_program_kernel(
    ids_ptr,           # [P] int32/int64 expert of each (token, k) pair, P = T*K
    counts_ptr,        # [E] int32 pairs per expert (out)
    sorted_pairs_ptr,  # [P] int32 pair ids grouped by expert, groups end to end (out)
    num_pairs, num_experts,
    BLOCK_P: tl.constexpr, E_POW2: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    expert = tl.load(ids_ptr + p, mask=p < num_pairs, other=-1).to(tl.int32)
    valid = (p < num_pairs) & (expert >= 0) & (expert < num_experts)
    e = tl.arange(0, E_POW2)
    onehot = ((expert[:, None] == e[None, :]) & valid[:, None]).to(tl.int32)  # [BLOCK_P, E_POW2]
    counts = tl.sum(onehot, axis=0)
    tl.store(counts_ptr + e, counts, mask=e < num_experts)
    group_start = tl.cumsum(counts, axis=0) - counts
    # A pair's rank in its group is the number of earlier pairs with the same expert.
    rank = tl.cumsum(onehot, axis=0) - onehot
    slot = tl.sum(onehot * (rank + group_start[None, :]), axis=1)
    tl.store(sorted_pairs_ptr + slot, p, mask=valid)


@triton.jit
def _count_kernel(
    ids_ptr,     # [P] int32/int64 expert of each (token, k) pair, P = T*K
    counts_ptr,  # [E] int32, zeroed: pairs per expert (out)
    ranks_ptr,   # [P] int32: rank of each pair inside its expert's group (out)
    num_pairs, num_experts,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    expert = tl.load(ids_ptr + offs, mask=in_range, other=0).to(tl.int32)
    valid = in_range & (expert >= 0) & (expert < num_experts)
    # The old value of the counter is the pair's slot in its group.
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=valid, sem="relaxed")
    tl.store(ranks_ptr + offs, rank, mask=valid)


@triton.jit
def _scatter_kernel(
    ids_ptr,           # [P] expert of each pair
    counts_ptr,        # [E] int32 pairs per expert (complete)
    ranks_ptr,         # [P] int32 rank inside the group
    sorted_pairs_ptr,  # [P] int32 pair ids grouped by expert (out)
    num_pairs, num_experts,
    BLOCK: tl.constexpr, EXPERT_CHUNK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < num_pairs
    expert = tl.load(ids_ptr + offs, mask=in_range, other=0).to(tl.int32)
    valid = in_range & (expert >= 0) & (expert < num_experts)
    rank = tl.load(ranks_ptr + offs, mask=valid, other=0)
    # A group starts after the groups of all lower experts: sum their counts, a chunk at a time.
    start = tl.zeros((BLOCK,), dtype=tl.int32)
    for e0 in range(0, num_experts, EXPERT_CHUNK):
        e = e0 + tl.arange(0, EXPERT_CHUNK)
        counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
        start += tl.sum(tl.where(e[None, :] < expert[:, None], counts[None, :], 0), axis=1)
    tl.store(sorted_pairs_ptr + start + rank, offs, mask=valid)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b. UPCAST (interpreter only): Triton's interpreter mis-multiplies bf16 operands
    (it reads their raw bits), so tests multiply them as fp32, which is exact for bf16."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _block_work(counts_ptr, num_experts, num_pairs, pid, num_blocks_n,
                BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, E_POW2: tl.constexpr):
    """Program id -> (expert, first row, end row in the sorted pair list, n-tile).

    Each expert owns cdiv(count, BLOCK_M) consecutive m-blocks; expert >= num_experts means the
    block lies past the last group (no work). m-blocks are visited GROUP_M at a time per n-tile
    so that neighbouring programs share weight and activation tiles in L2."""
    num_blocks_m = (num_pairs + tl.minimum(num_experts, num_pairs) * (BLOCK_M - 1)) // BLOCK_M
    group_width = GROUP_M * num_blocks_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    e = tl.arange(0, E_POW2)
    counts = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.cumsum(blocks, axis=0)
    rows_end = tl.cumsum(counts, axis=0)
    expert = tl.sum((blocks_end <= pid_m).to(tl.int32), axis=0)
    mine = e == expert
    first_block = tl.sum(tl.where(mine, blocks_end - blocks, 0), axis=0)
    row_end = tl.sum(tl.where(mine, rows_end, 0), axis=0)
    row_start = row_end - tl.sum(tl.where(mine, counts, 0), axis=0) + (pid_m - first_block) * BLOCK_M
    return expert, row_start, row_end, pid_n


@triton.autotune(configs=_gemm_configs(gated=True),
                 key=["pairs_bucket", "num_experts", "inter_size", "hidden_size"],
                 prune_configs_by={"early_config_prune": _prune_configs}, cache_results=True)
@triton.jit(do_not_specialize=["num_pairs", "pairs_bucket"])
def _gate_up_kernel(
    # Pointers
    hidden_ptr,        # [T, H] activations
    w13_ptr,           # [E, 2I, H] gate rows, then up rows
    act_ptr,           # [P, I] silu(gate) * up per pair (out)
    sorted_pairs_ptr,  # [P] int32 pair ids grouped by expert
    counts_ptr,        # [E] int32 pairs per expert
    # Sizes
    num_pairs, num_experts, top_k, inter_size, hidden_size,
    # Strides, in elements
    stride_ht, stride_hh, stride_we, stride_wn, stride_wh, stride_ap, stride_ai,
    pairs_bucket,      # next power of two of num_pairs: autotune key only
    # Meta-parameters
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert, row_start, row_end, pid_n = _block_work(
        counts_ptr, num_experts, num_pairs, tl.program_id(0), tl.cdiv(inter_size, BLOCK_N),
        BLOCK_M, GROUP_M, E_POW2)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)
    tokens = pairs // top_k

    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped column indices keep weight loads in bounds without a mask; the store masks them.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % inter_size
    a_ptrs = hidden_ptr + tokens.to(tl.int64)[:, None] * stride_ht + offs_k[None, :] * stride_hh
    g_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we
              + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh)
    u_ptrs = g_ptrs + inter_size * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden_size, BLOCK_K)):
        k_mask = offs_k < hidden_size - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_mask[:, None], other=0.0)
        u = tl.load(u_ptrs, mask=k_mask[:, None], other=0.0)
        acc_g = _dot(a, g, acc_g, DOT_PRECISION, UPCAST)
        acc_u = _dot(a, u, acc_u, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_hh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh

    act = acc_g * tl.sigmoid(acc_g) * acc_u
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    act_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_ap + cols[None, :] * stride_ai
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < inter_size))


@triton.autotune(configs=_gemm_configs(gated=False),
                 key=["pairs_bucket", "num_experts", "inter_size", "hidden_size"],
                 prune_configs_by={"early_config_prune": _prune_configs}, cache_results=True)
@triton.jit(do_not_specialize=["num_pairs", "pairs_bucket"])
def _down_kernel(
    # Pointers
    act_ptr,           # [P, I] silu(gate) * up per pair
    w2_ptr,            # [E, H, I] down projection
    y_ptr,             # [P, H] weighted expert output per pair (out)
    topk_weights_ptr,  # [P] fp32 routing weight per pair
    sorted_pairs_ptr,  # [P] int32 pair ids grouped by expert
    counts_ptr,        # [E] int32 pairs per expert
    # Sizes
    num_pairs, num_experts, inter_size, hidden_size,
    # Strides, in elements
    stride_ap, stride_ai, stride_we, stride_wh, stride_wi, stride_yp, stride_yh,
    pairs_bucket,      # next power of two of num_pairs: autotune key only
    # Meta-parameters
    E_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert, row_start, row_end, pid_n = _block_work(
        counts_ptr, num_experts, num_pairs, tl.program_id(0), tl.cdiv(hidden_size, BLOCK_N),
        BLOCK_M, GROUP_M, E_POW2)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    pairs = tl.load(sorted_pairs_ptr + rows, mask=row_mask, other=0)

    offs_k = tl.arange(0, BLOCK_K)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % hidden_size
    a_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_ap + offs_k[None, :] * stride_ai
    w_ptrs = (w2_ptr + expert.to(tl.int64) * stride_we
              + offs_n[None, :] * stride_wh + offs_k[:, None] * stride_wi)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(inter_size, BLOCK_K)):
        k_mask = offs_k < inter_size - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(a, w, acc, DOT_PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_ai
        w_ptrs += BLOCK_K * stride_wi

    # Routing weight in fp32 before the rounding to the output dtype.
    acc *= tl.load(topk_weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_yp + cols[None, :] * stride_yh
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols[None, :] < hidden_size))


def _check_inputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  dtypes: tuple[torch.dtype, ...], weight_dtypes: tuple[torch.dtype, ...],
                  ) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; return (T, H, E, I, K)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    num_tokens, hidden_size = hidden.shape
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[2] != hidden_size:
        raise ValueError(f"w13 must be [E, 2*I, H={hidden_size}] (gate rows then up rows), "
                         f"got shape {tuple(w13.shape)}")
    num_experts, inter_size = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (num_experts, hidden_size, inter_size):
        raise ValueError(f"w2 must be [E, H, I] = {(num_experts, hidden_size, inter_size)} to match "
                         f"hidden and w13, got shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights and topk_ids must both be [T={num_tokens}, K], got shapes "
                         f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.dtype not in weight_dtypes:
        raise ValueError(f"topk_weights must be one of {weight_dtypes}, got {topk_weights.dtype}")
    if hidden.dtype not in dtypes:
        raise ValueError(f"hidden dtype must be one of {dtypes}, got {hidden.dtype}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"w13 and w2 must have hidden's dtype {hidden.dtype}, "
                         f"got {w13.dtype} and {w2.dtype}")
    devices = {t.device for t in (hidden, w13, w2, topk_weights, topk_ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return num_tokens, hidden_size, num_experts, inter_size, topk_ids.shape[1]


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Routed SwiGLU experts, summed with routing weights: [T, H] -> [T, H] (module docstring)."""
    num_tokens, hidden_size, num_experts, inter_size, top_k = _check_inputs(
        hidden, w13, w2, topk_weights, topk_ids, _KERNEL_DTYPES, (torch.float32,))
    device = hidden.device
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"fused_moe needs CUDA tensors (got {device}); "
                         "use fused_moe_reference on CPU, or TRITON_INTERPRET=1 in tests")
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros((num_tokens, hidden_size), dtype=hidden.dtype, device=device)

    ids = topk_ids.reshape(num_pairs)
    weights = topk_weights.reshape(num_pairs)
    e_pow2 = max(16, triton.next_power_of_2(num_experts))
    sorted_pairs = torch.empty(num_pairs, dtype=torch.int32, device=device)
    block_p = max(16, triton.next_power_of_2(num_pairs))
    if block_p * e_pow2 <= _ONE_PROGRAM_ROUTE_ELEMENTS:
        counts = torch.empty(num_experts, dtype=torch.int32, device=device)
        _route_one_program_kernel[(1,)](ids, counts, sorted_pairs, num_pairs, num_experts,
                                        BLOCK_P=block_p, E_POW2=e_pow2, num_warps=8)
    else:
        counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
        ranks = torch.empty(num_pairs, dtype=torch.int32, device=device)
        route_grid = (triton.cdiv(num_pairs, _ROUTE_BLOCK),)
        _count_kernel[route_grid](ids, counts, ranks, num_pairs, num_experts, BLOCK=_ROUTE_BLOCK)
        _scatter_kernel[route_grid](ids, counts, ranks, sorted_pairs, num_pairs, num_experts,
                                    BLOCK=_ROUTE_BLOCK, EXPERT_CHUNK=_ROUTE_EXPERT_CHUNK)

    pairs_bucket = triton.next_power_of_2(num_pairs)
    # fp32 callers asked for fp32 accuracy: no TF32 rounding of the inputs.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    upcast = _interpreting() and hidden.dtype == torch.bfloat16
    act = torch.empty((num_pairs, inter_size), dtype=hidden.dtype, device=device)
    _gate_up_kernel[lambda meta: (
        _num_blocks_m(num_pairs, num_experts, meta["BLOCK_M"]) * triton.cdiv(inter_size, meta["BLOCK_N"]),)](
        hidden, w13, act, sorted_pairs, counts,
        num_pairs, num_experts, top_k, inter_size, hidden_size,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1), pairs_bucket,
        E_POW2=e_pow2, DOT_PRECISION=precision, UPCAST=upcast)

    y = torch.empty((num_tokens, top_k, hidden_size), dtype=hidden.dtype, device=device)
    _down_kernel[lambda meta: (
        _num_blocks_m(num_pairs, num_experts, meta["BLOCK_M"]) * triton.cdiv(hidden_size, meta["BLOCK_N"]),)](
        act, w2, y, weights, sorted_pairs, counts,
        num_pairs, num_experts, inter_size, hidden_size,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        y.stride(1), y.stride(2), pairs_bucket,
        E_POW2=e_pow2, DOT_PRECISION=precision, UPCAST=upcast)
    # torch accumulates half-precision sums in fp32.
    return y.sum(dim=1)


def fused_moe_reference(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Plain-torch fused_moe: a loop over experts with index_add. Computes in fp32 (fp64 for
    fp64 inputs) and returns hidden's dtype. Syncs with the host: the CPU path and tests only."""
    _check_inputs(hidden, w13, w2, topk_weights, topk_ids,
                  _KERNEL_DTYPES + (torch.float64,), (torch.float32, torch.float64))
    num_tokens, top_k = topk_ids.shape
    inter_size = w2.shape[2]
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(hidden.shape, dtype=compute, device=hidden.device)
    pair_token = torch.arange(num_tokens, device=hidden.device).repeat_interleave(top_k)
    pair_expert = topk_ids.reshape(-1)
    pair_weight = topk_weights.reshape(-1).to(compute)
    for expert in pair_expert.unique().tolist():
        pairs = (pair_expert == expert).nonzero().squeeze(1)
        tokens = pair_token[pairs]
        gate_up = hidden[tokens].to(compute) @ w13[expert].to(compute).t()
        act = torch.nn.functional.silu(gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        expert_out = act @ w2[expert].to(compute).t()
        out.index_add_(0, tokens, expert_out * pair_weight[pairs, None])
    return out.to(hidden.dtype)
