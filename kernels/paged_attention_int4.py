"""Paged attention kernel for the `int4` format (layout in `kv_int4`).

A tile of BLOCK_N tokens is loaded as one 2D byte tile [BLOCK_N, D/2]; its low nibbles are the
first half of every channel group and its high nibbles the second half, so each nibble plane is a
dot operand [BLOCK_N, D/2] as extracted, against the matching query half q_lo / q_hi [M, D/2]
(columns c -> channel (c // W) * G + c % W, plus W for the high plane; W = G / 2).
Scales and zeros, per token and channel group:
    one group per head (G = D, the default for D <= 128): they never touch the codes,
        S[m, n] = sk[n] * (q_lo . c_lo[n] + q_hi . c_hi[n]) + zk[n] * sum(q[m])
        O      += (P * sv) [C_lo | C_hi]  +  (P . zv)
    several groups: the codes are dequantized in registers (code * scale + zero, float16, the
        group's scale broadcast along its W columns) before the dots.
Codes become exact float16 values two per instruction on CUDA (`nibble_planes`). With one group
and float operands the key codes stay biased (1024 + c, 1024 + 16 c: `biased_nibble_planes`), the
high query half is taken / 16, and the score dots start from -1024 * sum(q as float16), which
cancels the bias inside the float32 accumulation. Values come from the token-major `v` part
(`_value_tile`), so the P V operand's consecutive tokens are neighbouring bytes.
With `K_INT8` (one group per head) the query is quantized per row to int8 and the score dots run
on int8 tensor cores; `V_INT8` does the same for the P-weights. Otherwise operands are float16.
Every tensor is 2D: batched 3D dots and reductions over a group axis compiled to slow code.

Decode with one group per head takes `int4_decode_kernel`, which turns the dots around: tokens are
their M dimension and the GQA group their N columns,
    S^T [N, H] = K_lo [N, D/2] q_lo^T + K_hi q_hi^T        O^T [D/2, H] += V_lo [D/2, N] (P * sv)^T
so a tensor-core tile carries BLOCK_N tokens against the group (4 heads padded to the 8 columns
of an m16n8 instruction) instead of 4 heads padded to 16 rows: half the tensor-core instructions
and half the softmax work per token (548 instructions per 32 tokens against 857, sm_90), and the
value tile [D/2, N] of the token-major `v` part is an A operand as it is loaded. Its value codes
stay biased too (1024 + c): the running sum of the float16 P-weights as used (`pbias`) takes
1024 * that sum back out of the accumulators at the end.
"""
from __future__ import annotations

import triton
import triton.language as tl

from partita.kernels.paged_attention_common import (NEG_BIG, TAU, biased_nibble_planes,
                                                    causal_mask, decode_slice, nibble_planes,
                                                    packed_unpack, program_rows, quantize_rows,
                                                    scale_zero, store_output, store_split_stats)


@triton.jit
def _per_column(x, BLOCK_N: tl.constexpr, NG: tl.constexpr, W: tl.constexpr):
    """[BLOCK_N, NG] group values -> [BLOCK_N, NG * W], each repeated along its group's columns."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], (BLOCK_N, NG, W)), (BLOCK_N, NG * W))


@triton.jit
def _value_tile(v_ptr, bt_row, h_kv, start, hi, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Value bytes [D/2, BLOCK_N] of tokens start.. from the token-major `v` part: runs of
    TB = min(BLOCK_N, BLOCK_SIZE) tokens are contiguous per (head, byte) row, so each run loads as
    one vector. `start` is a multiple of BLOCK_N (`program_rows`)."""
    TB: tl.constexpr = BLOCK_N if BLOCK_N < BLOCK_SIZE else BLOCK_SIZE
    NB: tl.constexpr = BLOCK_N // TB
    run = tl.multiple_of(start, BLOCK_N) + tl.arange(0, NB) * TB  # first token of each run [NB]
    if MASKED:
        blk = tl.load(bt_row + run // BLOCK_SIZE, mask=run < hi, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + run // BLOCK_SIZE).to(tl.int64)
    base = (blk * NUM_KV_HEADS + h_kv) * (HALF * BLOCK_SIZE) + run % BLOCK_SIZE
    offs = base[None, :, None] + (tl.arange(0, HALF) * BLOCK_SIZE)[:, None, None] \
        + tl.arange(0, TB)[None, None, :]  # [D/2, NB, TB]
    if MASKED:
        tok = run[None, :, None] + tl.arange(0, TB)[None, None, :]
        vt = tl.load(v_ptr + offs, mask=tok < hi, other=0)
    else:
        vt = tl.load(v_ptr + offs)
    return tl.reshape(vt, (HALF, BLOCK_N))


@triton.jit
def _int4_tile(q_lo, q_hi, q_scale, qsum, s_init, m, l, acc_lo, acc_hi, corr, start, hi, pos,
               bt_row, h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, G: tl.constexpr, K_INT8: tl.constexpr,
               V_INT8: tl.constexpr, PACKED: tl.constexpr, MASKED: tl.constexpr):
    NG: tl.constexpr = HEAD_DIM // G
    W: tl.constexpr = G // 2
    HALF: tl.constexpr = HEAD_DIM // 2
    n = start + tl.arange(0, BLOCK_N)
    n_ok = n < hi
    blk = tl.load(bt_row + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    row = (blk * BLOCK_SIZE + n % BLOCK_SIZE) * NUM_KV_HEADS + h_kv  # (token, head) row [N]
    codes = row[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [N, D/2]
    ok = n_ok[:, None]
    meta = row[:, None] * (NG * 2) + tl.arange(0, NG)[None, :] * 2  # [N, NG]
    # scores
    kb = tl.load(k_ptr + codes, mask=ok, other=0)
    if NG == 1:
        ks, kz = scale_zero(kmeta_ptr, row, n_ok)
        if K_INT8:  # int32 products; Triton takes no int32 accumulator operand here
            k_lo, k_hi = nibble_planes(kb, PACKED, True)
            dots = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
            dots = dots.to(tl.float32) * q_scale[:, None]
        else:  # biased codes; s_init takes the bias back out (see the kernel)
            k_lo, k_hi = biased_nibble_planes(kb, PACKED)
            dots = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo), s_init))
        s = dots * ks[None, :] + qsum[:, None] * kz[None, :]
    else:
        ks = _per_column(tl.load(kmeta_ptr + meta, mask=ok, other=0.0), BLOCK_N, NG, W)
        kz = _per_column(tl.load(kmeta_ptr + meta + 1, mask=ok, other=0.0), BLOCK_N, NG, W)
        k_lo, k_hi = nibble_planes(kb, PACKED, False)
        s = tl.dot(q_lo, tl.trans(k_lo * ks + kz))
        s = tl.dot(q_hi, tl.trans(k_hi * ks + kz), s)
    s = s * sm_scale_log2
    if MASKED:
        s = causal_mask(s, n, pos, hi)
    tile_max = tl.max(s, 1)
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        corr = corr * alpha
        l = l * alpha
        m = m_new
    p = tl.exp2(s - m[:, None])
    l = l + tl.sum(p, 1)
    # values
    vb = tl.trans(_value_tile(v_ptr, bt_row, h_kv, start, hi, NUM_KV_HEADS, HALF, BLOCK_SIZE,
                              BLOCK_N, MASKED))
    if NG == 1:
        vs, vz = scale_zero(vmeta_ptr, row, n_ok)
        pw = p * vs[None, :]
        v_lo, v_hi = nibble_planes(vb, PACKED, V_INT8)
        if V_INT8:
            p_scale = tl.maximum(tl.max(pw, 1), 1e-30) / 127.0  # [M]
            pq = quantize_rows(pw, p_scale[:, None], True)
            acc_lo += tl.dot(pq, v_lo).to(tl.float32) * p_scale[:, None]
            acc_hi += tl.dot(pq, v_hi).to(tl.float32) * p_scale[:, None]
        else:
            pq = pw.to(tl.float16)
            acc_lo = tl.dot(pq, v_lo, acc_lo)
            acc_hi = tl.dot(pq, v_hi, acc_hi)
        corr = corr + tl.sum(p * vz[None, :], 1)
    else:
        vs = _per_column(tl.load(vmeta_ptr + meta, mask=ok, other=0.0), BLOCK_N, NG, W)
        vz = _per_column(tl.load(vmeta_ptr + meta + 1, mask=ok, other=0.0), BLOCK_N, NG, W)
        pq = p.to(tl.float16)
        v_lo, v_hi = nibble_planes(vb, PACKED, False)
        acc_lo = tl.dot(pq, v_lo * vs + vz, acc_lo)
        acc_hi = tl.dot(pq, v_hi * vs + vz, acc_hi)
    return m, l, acc_lo, acc_hi, corr


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def int4_attention_kernel(
    # common: output, queries, paging, split scratch
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, seq_slots_ptr,
    part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_splits,
    # cache (contiguous): k codes [num_blocks, B, H, D/2], v codes [num_blocks, H, D/2, B],
    # meta [num_blocks, B, H, D/G, 2]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
    # shapes and tiling
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IS_DECODE: tl.constexpr,
    # format
    G: tl.constexpr, K_INT8: tl.constexpr, V_INT8: tl.constexpr, PACKED: tl.constexpr,
):
    b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi = program_rows(
        context_lens_ptr, cu_seqlens_q_ptr, GQ, GQ_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, num_splits,
        IS_DECODE)
    if is_done:
        return
    h_kv = tl.program_id(2)
    W: tl.constexpr = G // 2
    # query halves [M, D/2] matching the nibble planes (see the module docstring)
    col = tl.arange(0, HEAD_DIM // 2)
    ch_lo = (col // W * G + col % W)[None, :]
    q_rows = (tok * stride_qt + head * stride_qh)[:, None]
    q_ok = row_valid[:, None]
    q_lo = tl.load(q_ptr + q_rows + ch_lo, mask=q_ok, other=0.0).to(tl.float32)
    q_hi = tl.load(q_ptr + q_rows + ch_lo + W, mask=q_ok, other=0.0).to(tl.float32)
    qsum = tl.sum(q_lo, 1) + tl.sum(q_hi, 1)  # [M]: zero-point term of the scores
    amax = tl.maximum(tl.max(tl.abs(q_lo), 1), tl.max(tl.abs(q_hi), 1))
    q_scale = tl.maximum(amax, 1e-30) / 127.0  # [M], used when K_INT8
    if G == HEAD_DIM and not K_INT8:
        # The key planes come biased (`biased_nibble_planes`): 1024 + c for the low nibbles and
        # 1024 + 16 c for the high ones, so the high query half is taken / 16 (exact), and the dots
        # start from s_init = -1024 * sum of the float16 query as used, which cancels the bias.
        q_lo = q_lo.to(tl.float16)
        q_hi = (q_hi * 0.0625).to(tl.float16)
        bias = 1024.0 * (tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1))
    else:
        q_lo = quantize_rows(q_lo, q_scale[:, None], K_INT8)
        q_hi = quantize_rows(q_hi, q_scale[:, None], K_INT8)
        bias = tl.zeros([BLOCK_M], tl.float32)
    s_init = tl.broadcast_to(-bias[:, None], (BLOCK_M, BLOCK_N))
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    corr = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HEAD_DIM // 2], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, full_hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr = _int4_tile(
            q_lo, q_hi, q_scale, qsum, s_init, m, l, acc_lo, acc_hi, corr, start, hi, pos,
            bt_row, h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, G, K_INT8, V_INT8, PACKED, False)
    for start in range(full_hi, hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr = _int4_tile(
            q_lo, q_hi, q_scale, qsum, s_init, m, l, acc_lo, acc_hi, corr, start, hi, pos,
            bt_row, h_kv, sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, G, K_INT8, V_INT8, PACKED, True)
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_rows = (tok * stride_ot + head * stride_oh)[:, None]
    part_rows = (((b * NUM_Q_HEADS + head) * num_splits + split) * HEAD_DIM)[:, None]
    l_b = l[:, None]
    corr_b = corr[:, None]
    store_output(acc_lo + corr_b, l_b, ch_lo, out_rows, part_rows, q_ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_output(acc_hi + corr_b, l_b, ch_lo + W, out_rows, part_rows, q_ok, out_ptr,
                 part_acc_ptr, SPLIT)
    store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr, NUM_Q_HEADS, num_splits, SPLIT)


@triton.jit
def _int4_decode_scores(qt_lo, qt_hi, bias, qsum, start, hi, bt_row, h_kv, k_ptr, kmeta_ptr,
                        NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                        SUB_N: tl.constexpr, PACKED: tl.constexpr, MASKED: tl.constexpr):
    """Scores S^T [SUB_N, H] of tokens start.. (log2 units), their (token, head) rows and mask."""
    r = tl.arange(0, SUB_N)
    n = start + r
    n_ok = n < hi
    # start is a multiple of SUB_N (both powers of two): block index and offset per token
    # without a division per element; only the block's base needs 64 bits
    if MASKED:
        blk = tl.load(bt_row + start // BLOCK_SIZE + r // BLOCK_SIZE, mask=n_ok, other=0)
    else:
        blk = tl.load(bt_row + start // BLOCK_SIZE + r // BLOCK_SIZE)
    row = blk.to(tl.int64) * (BLOCK_SIZE * NUM_KV_HEADS) \
        + ((start % BLOCK_SIZE + r % BLOCK_SIZE) * NUM_KV_HEADS + h_kv)  # (token, head) row [N]
    ok = n_ok[:, None]
    kb = tl.load(k_ptr + row[:, None] * HALF + tl.arange(0, HALF)[None, :], mask=ok, other=0)
    ks, kz = scale_zero(kmeta_ptr, row, n_ok)
    k_lo, k_hi = biased_nibble_planes(kb, PACKED)
    dots = tl.dot(k_hi, qt_hi, tl.dot(k_lo, qt_lo))  # [N, H], biased by `bias`
    s = (dots - bias[None, :]) * ks[:, None] + kz[:, None] * qsum[None, :]
    if MASKED:
        s = tl.where(ok, s, float("-inf"))
    return s, row, n_ok


@triton.jit
def _int4_decode_values(p, row, n_ok, acc_lo, acc_hi, corr, pbias, start, hi, bt_row, h_kv,
                        v_ptr, vmeta_ptr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, SUB_N: tl.constexpr, PACKED: tl.constexpr,
                        MASKED: tl.constexpr):
    """Adds P V of tokens start.. (P [SUB_N, H], already under the running max) to the sums."""
    vs, vz = scale_zero(vmeta_ptr, row, n_ok)
    pw = (p * vs[:, None]).to(tl.float16)
    corr = corr + tl.sum(p * vz[:, None], 0)
    pbias = pbias + tl.sum(pw.to(tl.float32), 0)
    vb = _value_tile(v_ptr, bt_row, h_kv, start, hi, NUM_KV_HEADS, HALF, BLOCK_SIZE, SUB_N, MASKED)
    v_lo, v_hi = biased_nibble_planes(vb, PACKED)
    acc_lo = tl.dot(v_lo, pw, acc_lo)
    acc_hi = tl.dot(v_hi, pw, acc_hi)
    return acc_lo, acc_hi, corr, pbias


@triton.jit
def _int4_decode_tile(qt_lo, qt_hi, bias, qsum, m, l, acc_lo, acc_hi, corr, pbias, start, hi,
                      bt_row, h_kv, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
                      NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HALVES: tl.constexpr,
                      PACKED: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BLOCK_N tokens; with HALVES its two halves are unpacked and dotted one after
    the other under one max and one rescale check, so that only half a tile of unpacked codes
    is live at a time."""
    HALF: tl.constexpr = HEAD_DIM // 2
    SUB_N: tl.constexpr = BLOCK_N // 2 if HALVES else BLOCK_N
    start = tl.multiple_of(start, BLOCK_N)
    s0, row0, ok0 = _int4_decode_scores(qt_lo, qt_hi, bias, qsum, start, hi, bt_row, h_kv,
                                        k_ptr, kmeta_ptr, NUM_KV_HEADS, HALF, BLOCK_SIZE, SUB_N,
                                        PACKED, MASKED)
    tile_max = tl.max(s0, 0)
    if HALVES:
        s1, row1, ok1 = _int4_decode_scores(qt_lo, qt_hi, bias, qsum, start + SUB_N, hi, bt_row,
                                            h_kv, k_ptr, kmeta_ptr, NUM_KV_HEADS, HALF,
                                            BLOCK_SIZE, SUB_N, PACKED, MASKED)
        tile_max = tl.maximum(tile_max, tl.max(s1, 0))
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        acc_lo = acc_lo * alpha[None, :]
        acc_hi = acc_hi * alpha[None, :]
        corr = corr * alpha
        pbias = pbias * alpha
        l = l * alpha
        m = m_new
    p = tl.exp2(s0 - m[None, :])
    l = l + tl.sum(p, 0)
    acc_lo, acc_hi, corr, pbias = _int4_decode_values(
        p, row0, ok0, acc_lo, acc_hi, corr, pbias, start, hi, bt_row, h_kv, v_ptr, vmeta_ptr,
        NUM_KV_HEADS, HALF, BLOCK_SIZE, SUB_N, PACKED, MASKED)
    if HALVES:
        p = tl.exp2(s1 - m[None, :])
        l = l + tl.sum(p, 0)
        acc_lo, acc_hi, corr, pbias = _int4_decode_values(
            p, row1, ok1, acc_lo, acc_hi, corr, pbias, start + SUB_N, hi, bt_row, h_kv, v_ptr,
            vmeta_ptr, NUM_KV_HEADS, HALF, BLOCK_SIZE, SUB_N, PACKED, MASKED)
    return m, l, acc_lo, acc_hi, corr, pbias


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def int4_decode_kernel(
    # output and queries [B, Hq, D], paging (seq_slots unused: the launcher's common signature),
    # split scratch (as `int4_attention_kernel`)
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, seq_slots_ptr, part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_splits,
    # cache (contiguous, one (scale, zero) group per head): k [num_blocks, B, H, D/2],
    # v [num_blocks, H, D/2, B], meta [num_blocks, B, H, 1, 2]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
    # shapes and tiling
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    HALVES: tl.constexpr, PACKED: tl.constexpr,
):
    """Decode with tokens as the dots' M dimension (see the module docstring): one program per
    (sequence, split, kv head); its GQA group is the dots' N columns."""
    b, split, lo, full_hi, hi = decode_slice(context_lens_ptr, BLOCK_N, num_splits)
    h_kv = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    hh = tl.arange(0, GQ_PAD)
    head = h_kv * GQ + hh
    valid = hh < GQ
    col = tl.arange(0, HALF)[:, None]  # low plane column c = channel c, high plane 64 + c
    q_cols = (b * stride_qt + head * stride_qh)[None, :]
    qt_lo = tl.load(q_ptr + q_cols + col, mask=valid[None, :], other=0.0).to(tl.float32)
    qt_hi = tl.load(q_ptr + q_cols + col + HALF, mask=valid[None, :], other=0.0).to(tl.float32)
    qt_lo = qt_lo * sm_scale_log2  # scores in log2 units
    qt_hi = qt_hi * sm_scale_log2
    qsum = tl.sum(qt_lo, 0) + tl.sum(qt_hi, 0)  # [H]: zero-point term of the scores
    # biased key planes (1024 + c, 1024 + 16 c): the high half taken / 16, and the bias of the
    # float16 query as used taken back out of the dots
    qt_lo = qt_lo.to(tl.float16)
    qt_hi = (qt_hi * 0.0625).to(tl.float16)
    bias = 1024.0 * (tl.sum(qt_lo.to(tl.float32), 0) + tl.sum(qt_hi.to(tl.float32), 0))
    m = tl.full([GQ_PAD], NEG_BIG, tl.float32)
    l = tl.zeros([GQ_PAD], tl.float32)
    corr = tl.zeros([GQ_PAD], tl.float32)
    pbias = tl.zeros([GQ_PAD], tl.float32)  # sum of the float16 P weights: the value bias / 1024
    acc_lo = tl.zeros([HALF, GQ_PAD], tl.float32)
    acc_hi = tl.zeros([HALF, GQ_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for start in range(lo, full_hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr, pbias = _int4_decode_tile(
            qt_lo, qt_hi, bias, qsum, m, l, acc_lo, acc_hi, corr, pbias, start, hi, bt_row, h_kv,
            k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
            HALVES, PACKED, False)
    for start in range(full_hi, hi, BLOCK_N):
        m, l, acc_lo, acc_hi, corr, pbias = _int4_decode_tile(
            qt_lo, qt_hi, bias, qsum, m, l, acc_lo, acc_hi, corr, pbias, start, hi, bt_row, h_kv,
            k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
            HALVES, PACKED, True)
    vbias = 1024.0 * pbias[None, :]  # the values' biased codes, as for the keys
    out_lo = acc_lo - vbias + corr[None, :]
    out_hi = (acc_hi - vbias) * 0.0625 + corr[None, :]
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_cols = (b * stride_ot + head * stride_oh)[None, :]
    part_cols = (((b * NUM_Q_HEADS + head) * num_splits + split) * HEAD_DIM)[None, :]
    l_b = l[None, :]
    ok = valid[None, :]
    store_output(out_lo, l_b, col, out_cols, part_cols, ok, out_ptr, part_acc_ptr, SPLIT)
    store_output(out_hi, l_b, col + HALF, out_cols, part_cols, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_split_stats(m, l, b, head, split, valid, part_ml_ptr, NUM_Q_HEADS, num_splits, SPLIT)


def int4_decode_args(cache, block_n: int, halves: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `int4_decode_kernel` for a cache."""
    p = cache.parts
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"]],
            {"BLOCK_N": block_n, "HALVES": halves, "PACKED": packed_unpack(p["k"])})


def int4_cache_args(cache, k_int8: bool, v_int8: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `int4_attention_kernel` for a cache."""
    p = cache.parts
    g = cache.fmt.group_size
    one_group = g == cache.head_dim
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"]],
            {"G": g, "K_INT8": k_int8 and one_group, "V_INT8": v_int8 and one_group,
             "PACKED": packed_unpack(p["k"])})
