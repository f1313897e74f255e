"""Paged attention kernel for the one-code-per-element formats: none, fp8, int8.

Operation, per program (see `paged_attention_common` for the work split and the softmax):
    S = (Q K^T) * scale over one tile of BLOCK_N cached tokens, P = exp2(S - m), O += P V
with K, V read from pages `[num_blocks, block_size, H, D]` through the block table, one gather of
block ids per tile (a tile may span pages). Formats, dequantized in registers:
    none  K, V in the model dtype: dots in that dtype, float32 accumulation
    fp8   e4m3 codes -> float16 (hardware convert); the per-head key scale is folded into the
          softmax scale and the value scale into the output, so tiles need no per-element multiply
    int8  uint8 codes -> float16 (exact), per-token scale and zero applied to the *scores*
          (S = sk * (q . c) + zk * sum(q)) and to P (O += (P * sv) C + P zv), so the codes enter
          the dot unscaled
Queries are cast to float16 for fp8/int8 (dot operands must match); bf16 queries beyond the
float16 range are not supported there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from partita.kernels.paged_attention_common import (NEG_BIG, TAU, causal_mask, program_rows,
                                                    store_output, store_split_stats)


@triton.jit
def _dense_tile(q, qsum, m, l, acc, corr, start, hi, pos, bt_row, h_kv, sm_scale_log2,
                k_ptr, v_ptr, kmeta_ptr, vmeta_ptr,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, FORMAT: tl.constexpr, DOT_F32: tl.constexpr,
                MASKED: tl.constexpr):
    n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    n_ok = n < hi
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    off = n % BLOCK_SIZE
    kx = tl.load(k_ptr + (blk * stride_kb + off * stride_kt + h_kv * stride_kh)[:, None]
                 + d[None, :], mask=n_ok[:, None], other=0.0)
    vx = tl.load(v_ptr + (blk * stride_vb + off * stride_vt + h_kv * stride_vh)[:, None]
                 + d[None, :], mask=n_ok[:, None], other=0.0)
    if FORMAT == 0 and DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(kx.to(tl.float32)))
    elif FORMAT == 0:
        s = tl.dot(q, tl.trans(kx))
    elif FORMAT == 1:
        s = tl.dot(q, tl.trans(kx.to(tl.float8e4nv, bitcast=True).to(tl.float16)))
    else:
        meta = (blk * BLOCK_SIZE + off) * (NUM_KV_HEADS * 2) + h_kv * 2
        ks = tl.load(kmeta_ptr + meta, mask=n_ok, other=0.0).to(tl.float32)
        kz = tl.load(kmeta_ptr + meta + 1, mask=n_ok, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kx.to(tl.float16))) * ks[None, :] + qsum[:, None] * kz[None, :]
    s = s * sm_scale_log2
    if MASKED:
        s = causal_mask(s, n, pos, hi)
    tile_max = tl.max(s, 1)
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        acc = acc * alpha[:, None]
        corr = corr * alpha
        l = l * alpha
        m = m_new
    p = tl.exp2(s - m[:, None])
    l = l + tl.sum(p, 1)
    if FORMAT == 0 and DOT_F32:
        acc = tl.dot(p, vx.to(tl.float32), acc)
    elif FORMAT == 0:
        acc = tl.dot(p.to(vx.dtype), vx, acc)
    elif FORMAT == 1:
        acc = tl.dot(p.to(tl.float16), vx.to(tl.float8e4nv, bitcast=True).to(tl.float16), acc)
    else:
        meta = (blk * BLOCK_SIZE + off) * (NUM_KV_HEADS * 2) + h_kv * 2
        vs = tl.load(vmeta_ptr + meta, mask=n_ok, other=0.0).to(tl.float32)
        vz = tl.load(vmeta_ptr + meta + 1, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.dot((p * vs[None, :]).to(tl.float16), vx.to(tl.float16), acc)
        corr = corr + tl.sum(p * vz[None, :], 1)
    return m, l, acc, corr


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def dense_attention_kernel(
    # common: output, queries, paging, split scratch
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, seq_slots_ptr,
    part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_splits,
    # cache: data [num_blocks, B, H, D]; int8 meta [num_blocks, B, H, 2]; fp8 scales [2, H]
    k_ptr, v_ptr, kmeta_ptr, vmeta_ptr, scales_ptr,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    # shapes and tiling
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IS_DECODE: tl.constexpr,
    # format: 0 none, 1 fp8, 2 int8; DOT_F32: bf16 dots in float32 (Triton's CPU interpreter
    # multiplies bf16 as raw integers)
    FORMAT: tl.constexpr, DOT_F32: tl.constexpr,
):
    b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi = program_rows(
        context_lens_ptr, cu_seqlens_q_ptr, GQ, GQ_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, num_splits,
        IS_DECODE)
    if is_done:
        return
    h_kv = tl.program_id(2)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + d[None, :],
                mask=row_valid[:, None], other=0.0)
    qsum = tl.sum(q.to(tl.float32), 1)
    if FORMAT == 1:
        sm_scale_log2 = sm_scale_log2 * tl.load(scales_ptr + h_kv)  # key scale of this head
    if FORMAT != 0:
        q = q.to(tl.float16)
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    corr = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, full_hi, BLOCK_N):
        m, l, acc, corr = _dense_tile(
            q, qsum, m, l, acc, corr, start, hi, pos, bt_row, h_kv, sm_scale_log2,
            k_ptr, v_ptr, kmeta_ptr, vmeta_ptr,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FORMAT, DOT_F32, False)
    for start in range(full_hi, hi, BLOCK_N):
        m, l, acc, corr = _dense_tile(
            q, qsum, m, l, acc, corr, start, hi, pos, bt_row, h_kv, sm_scale_log2,
            k_ptr, v_ptr, kmeta_ptr, vmeta_ptr,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FORMAT, DOT_F32, True)
    acc = acc + corr[:, None]
    if FORMAT == 1:
        acc = acc * tl.load(scales_ptr + NUM_KV_HEADS + h_kv)  # value scale of this head
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_rows = (tok * stride_ot + head * stride_oh)[:, None]
    part_rows = (((b * NUM_Q_HEADS + head) * num_splits + split) * HEAD_DIM)[:, None]
    store_output(acc, l[:, None], d[None, :], out_rows, part_rows, row_valid[:, None], out_ptr,
                 part_acc_ptr, SPLIT)
    store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr, NUM_Q_HEADS, num_splits, SPLIT)


def dense_cache_args(cache) -> tuple[list, dict]:
    """Pointer/stride arguments and constexprs of `dense_attention_kernel` for a cache."""
    p = cache.parts
    kc, vc = p["k"], p["v"]
    args = [kc, vc, p.get("k_meta", kc), p.get("v_meta", vc), cache.state.get("scales", kc),
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2)]
    dot_f32 = not kc.is_cuda and cache.dtype == torch.bfloat16
    return args, {"FORMAT": {"none": 0, "fp8": 1, "int8": 2}[cache.fmt.name], "DOT_F32": dot_f32}
