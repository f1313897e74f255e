"""Paged attention kernel for the `int4` format (layout in `kv_int4`).

Per tile of BLOCK_N tokens the codes are loaded as [NG, BLOCK_N, G/2] bytes (NG channel groups of
G; the low nibbles are the first half of each group, the high nibbles the second), and the
scales never touch the codes:
    S[m, n]   = sum_g sk[n, g] * (q_g . c_g[n]) + zk[n, g] * sum(q_g)
    O_g[m, :] += (P * sv[:, g]) C_g  +  (P zv[:, g])           (per group g of channels)
so each nibble half is a dot operand as loaded (batched over the NG groups) and dequantization
costs one mask or shift plus a cheap int-to-operand step per code. With `K_INT8` the query is
quantized per row to int8 and the score dots run on int8 tensor cores (needs G >= 64); with
`V_INT8` so are the P-weights per row and group. Otherwise the operands are float16, exact for
the codes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from partita.kernels.paged_attention_common import (NEG_BIG, TAU, causal_mask, codes_operand,
                                                    program_rows, quantize_rows, store_output,
                                                    store_split_stats)


@triton.jit
def _int4_tile(q_lo, q_hi, q_scale, q_gsum, m, l, acc_lo, acc_hi, corr, start, hi, pos, bt_row,
               h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, G: tl.constexpr, K_INT8: tl.constexpr,
               V_INT8: tl.constexpr, MASKED: tl.constexpr):
    NG: tl.constexpr = HEAD_DIM // G
    W: tl.constexpr = G // 2
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < hi
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    row = (blk * BLOCK_SIZE + n % BLOCK_SIZE) * NUM_KV_HEADS + h_kv  # (token, head) row [N]
    g2 = tl.arange(0, NG)[:, None]
    g3 = tl.arange(0, NG)[:, None, None]
    w3 = tl.arange(0, W)[None, None, :]
    codes = row[None, :, None] * (HEAD_DIM // 2) + g3 * W + w3  # [NG, N, W]
    meta = (row[None, :] * NG + g2) * 2  # [NG, N]
    ok3 = n_ok[None, :, None]
    ok2 = n_ok[None, :]
    # scores
    kb = tl.load(k_ptr + codes, mask=ok3, other=0)
    ks = tl.load(kmeta_ptr + meta, mask=ok2, other=0.0).to(tl.float32)
    kz = tl.load(kmeta_ptr + meta + 1, mask=ok2, other=0.0).to(tl.float32)
    if K_INT8:
        dots = (tl.dot(q_lo, tl.trans(codes_operand(kb & 15, True), 0, 2, 1))
                + tl.dot(q_hi, tl.trans(codes_operand(kb >> 4, True), 0, 2, 1)))
        dots = dots.to(tl.float32) * q_scale[None, :, None]
    else:
        dots = tl.dot(q_lo, tl.trans(codes_operand(kb & 15, False), 0, 2, 1))
        dots = tl.dot(q_hi, tl.trans(codes_operand(kb >> 4, False), 0, 2, 1), dots)
    s = tl.sum(dots * ks[:, None, :] + q_gsum[:, :, None] * kz[:, None, :], 0) * sm_scale_log2
    if MASKED:
        s = causal_mask(s, n, pos, hi)
    tile_max = tl.max(s, 1)
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        acc_lo = acc_lo * alpha[None, :, None]
        acc_hi = acc_hi * alpha[None, :, None]
        corr = corr * alpha[None, :]
        l = l * alpha
        m = m_new
    p = tl.exp2(s - m[:, None])
    l = l + tl.sum(p, 1)
    # values
    vb = tl.load(v_ptr + codes, mask=ok3, other=0)
    vs = tl.load(vmeta_ptr + meta, mask=ok2, other=0.0).to(tl.float32)
    vz = tl.load(vmeta_ptr + meta + 1, mask=ok2, other=0.0).to(tl.float32)
    pw = p[None, :, :] * vs[:, None, :]  # [NG, M, N]
    if V_INT8:
        p_scale = tl.maximum(tl.max(pw, 2), 1e-30) / 127.0  # [NG, M]
        pq = quantize_rows(pw, p_scale[:, :, None], True)
        acc_lo += tl.dot(pq, codes_operand(vb & 15, True)).to(tl.float32) * p_scale[:, :, None]
        acc_hi += tl.dot(pq, codes_operand(vb >> 4, True)).to(tl.float32) * p_scale[:, :, None]
    else:
        pq = pw.to(tl.float16)
        acc_lo = tl.dot(pq, codes_operand(vb & 15, False), acc_lo)
        acc_hi = tl.dot(pq, codes_operand(vb >> 4, False), acc_hi)
    corr = corr + tl.sum(p[None, :, :] * vz[:, None, :], 2)
    return m, l, acc_lo, acc_hi, corr


@triton.jit
def int4_attention_kernel(
    # common: output, queries, paging, split scratch
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, seq_slots_ptr,
    part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    # cache (contiguous): codes [num_blocks, B, H, D/2], meta [num_blocks, B, H, D/G, 2]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
    # shapes and tiling
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_DECODE: tl.constexpr,
    # format
    G: tl.constexpr, K_INT8: tl.constexpr, V_INT8: tl.constexpr,
):
    b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi = program_rows(
        context_lens_ptr, cu_seqlens_q_ptr, GQ, GQ_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, NUM_SPLITS,
        IS_DECODE)
    if is_done:
        return
    h_kv = tl.program_id(2)
    NG: tl.constexpr = HEAD_DIM // G
    W: tl.constexpr = G // 2
    # query halves [NG, M, W] matching the nibble halves of each channel group
    ch_lo = tl.arange(0, NG)[:, None, None] * G + tl.arange(0, W)[None, None, :]
    q_rows = (tok * stride_qt + head * stride_qh)[None, :, None]
    q_ok = row_valid[None, :, None]
    q_lo = tl.load(q_ptr + q_rows + ch_lo, mask=q_ok, other=0.0).to(tl.float32)
    q_hi = tl.load(q_ptr + q_rows + ch_lo + W, mask=q_ok, other=0.0).to(tl.float32)
    q_gsum = tl.sum(q_lo, 2) + tl.sum(q_hi, 2)  # [NG, M]: zero-point term of the scores
    amax = tl.maximum(tl.max(tl.max(tl.abs(q_lo), 2), 0), tl.max(tl.max(tl.abs(q_hi), 2), 0))
    q_scale = tl.maximum(amax, 1e-30) / 127.0  # [M], used when K_INT8
    q_lo = quantize_rows(q_lo, q_scale[None, :, None], K_INT8)
    q_hi = quantize_rows(q_hi, q_scale[None, :, None], K_INT8)
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    corr = tl.zeros([NG, BLOCK_M], tl.float32)
    acc_lo = tl.zeros([NG, BLOCK_M, W], tl.float32)
    acc_hi = tl.zeros([NG, BLOCK_M, W], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, full_hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr = _int4_tile(
            q_lo, q_hi, q_scale, q_gsum, m, l, acc_lo, acc_hi, corr, start, hi, pos, bt_row,
            h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, G, K_INT8, V_INT8, False)
    for start in range(full_hi, hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr = _int4_tile(
            q_lo, q_hi, q_scale, q_gsum, m, l, acc_lo, acc_hi, corr, start, hi, pos, bt_row,
            h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, G, K_INT8, V_INT8, True)
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_rows = (tok * stride_ot + head * stride_oh)[None, :, None]
    part_rows = (((b * NUM_Q_HEADS + head) * NUM_SPLITS + split) * HEAD_DIM)[None, :, None]
    l_b = l[None, :, None]
    corr_b = corr[:, :, None]
    store_output(acc_lo + corr_b, l_b, ch_lo, out_rows, part_rows, q_ok, out_ptr, part_acc_ptr,
                 NUM_SPLITS)
    store_output(acc_hi + corr_b, l_b, ch_lo + W, out_rows, part_rows, q_ok, out_ptr,
                 part_acc_ptr, NUM_SPLITS)
    store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr, NUM_Q_HEADS, NUM_SPLITS)


def int4_cache_args(cache, k_int8: bool, v_int8: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `int4_attention_kernel` for a cache."""
    p = cache.parts
    g = cache.fmt.group_size
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"]],
            {"G": g, "K_INT8": k_int8 and g >= 64, "V_INT8": v_int8})
