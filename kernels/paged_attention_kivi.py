"""Paged attention kernel for the `kivi2` format (layout in `kv_kivi`).

A tile is one key group of G tokens (its per-channel key scales are one vector). The four
bit-pairs p of the loaded bytes [G, D/4] are four channel slices (keys: channels p*D/4 + c;
values: column c = w*Gv/4 + j is channel w*Gv + p*Gv/4 + j of value group w), each a 2D dot
operand as extracted:
    S[m, n]   = sum_p (q_p * sk_p) . c_p[n]  +  sum_p q_p . zk_p       (scale folded into q)
    O_p      += (P * sv) C_p  +  (P . zv)                               (one value group, Gv = D)
    O_p      += P (C_p * sv + zv)                  (several groups: dequantized in registers)
`K_INT8` / `V_INT8` run those dots on int8 tensor cores, the scaled query / P-weights quantized
per row (needs D >= 128 for keys, one value group for values); otherwise float16 operands. The
newest context_len % R tokens come from the sequence's full-precision residual (`seq_slots`), one
masked tile of R tokens. Every tensor is 2D (batched 3D dots compiled to slow code).

Decode with one value group per head takes `kivi_decode_kernel`, with tokens as the dots' M
dimension and the GQA group as their N columns (see `paged_attention_int4`):
    S^T [G, H] = sum_p C_p [G, Q] (q_p * sk_p)^T + q . zk      O_p^T [Q, H] += C_p^T (P * sv)^T
Its codes are float16 subnormals (`subnormal_crumbs`: the AND that isolates a field is the whole
conversion, and no bias needs cancelling), the per-group query scaling is one float16 product per
channel and head, and the zero-point term is reduced in float32. With `PAIRS` a loop step takes two
key groups, which share one tile max, one rescale check and one cross-lane reduction per softmax
sum; the odd group left at a split's end takes a step of its own.
"""
from __future__ import annotations

import triton
import triton.language as tl

from partita.kernels.paged_attention_common import (NEG_BIG, TAU, causal_mask, crumb_planes,
                                                    decode_slice, float16_halves, packed_unpack,
                                                    program_rows, quantize_rows, scale_zero,
                                                    store_output, store_split_stats,
                                                    subnormal_crumbs)


@triton.jit
def _rescale(s, m, l, a0, a1, a2, a3, corr):
    tile_max = tl.max(s, 1)
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        a0 = a0 * alpha[:, None]
        a1 = a1 * alpha[:, None]
        a2 = a2 * alpha[:, None]
        a3 = a3 * alpha[:, None]
        corr = corr * alpha
        l = l * alpha
        m = m_new
    p = tl.exp2(s - m[:, None])
    return p, m, l + tl.sum(p, 1), a0, a1, a2, a3, corr


@triton.jit
def _value_dot(pq, c, p_scale, vs, vz, acc, ONE_GROUP: tl.constexpr, V_INT8: tl.constexpr):
    if not ONE_GROUP:
        return tl.dot(pq, c * vs + vz, acc)
    elif V_INT8:
        return acc + tl.dot(pq, c).to(tl.float32) * p_scale[:, None]
    else:
        return tl.dot(pq, c, acc)


@triton.jit
def _kivi_tile(q0, q1, q2, q3, m, l, a0, a1, a2, a3, corr, start, hi, pos, bt_row, h_kv,
               sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
               NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               G: tl.constexpr, GV: tl.constexpr, K_INT8: tl.constexpr, V_INT8: tl.constexpr,
               PACKED: tl.constexpr, MASKED: tl.constexpr):
    Q: tl.constexpr = HEAD_DIM // 4
    NGV: tl.constexpr = HEAD_DIM // GV
    t = tl.arange(0, G)
    c = tl.arange(0, Q)
    blk = tl.load(bt_row + start // BLOCK_SIZE).to(tl.int64)  # a key group never spans blocks
    krow = (blk * (BLOCK_SIZE // G) + (start % BLOCK_SIZE) // G) * NUM_KV_HEADS + h_kv
    kb = tl.load(k_ptr + (krow * G + t[:, None]) * Q + c[None, :])  # [G, Q]
    km = kmeta_ptr + krow * 2 * HEAD_DIM + c
    ks0 = tl.load(km).to(tl.float32)
    ks1 = tl.load(km + Q).to(tl.float32)
    ks2 = tl.load(km + 2 * Q).to(tl.float32)
    ks3 = tl.load(km + 3 * Q).to(tl.float32)
    kz = km + HEAD_DIM
    zterm = tl.sum(q0 * tl.load(kz).to(tl.float32)[None, :]
                   + q1 * tl.load(kz + Q).to(tl.float32)[None, :]
                   + q2 * tl.load(kz + 2 * Q).to(tl.float32)[None, :]
                   + q3 * tl.load(kz + 3 * Q).to(tl.float32)[None, :], 1)
    # per-channel key scales folded into the query, then one row scale for int8
    s0 = q0 * ks0[None, :]
    s1 = q1 * ks1[None, :]
    s2 = q2 * ks2[None, :]
    s3 = q3 * ks3[None, :]
    amax = tl.maximum(tl.maximum(tl.max(tl.abs(s0), 1), tl.max(tl.abs(s1), 1)),
                      tl.maximum(tl.max(tl.abs(s2), 1), tl.max(tl.abs(s3), 1)))
    q_scale = tl.maximum(amax, 1e-30) / 127.0
    k0, k1, k2, k3 = crumb_planes(kb, PACKED, K_INT8)
    if K_INT8:  # int32 products; Triton takes no int32 accumulator operand here
        s = tl.dot(quantize_rows(s0, q_scale[:, None], True), tl.trans(k0))
        s += tl.dot(quantize_rows(s1, q_scale[:, None], True), tl.trans(k1))
        s += tl.dot(quantize_rows(s2, q_scale[:, None], True), tl.trans(k2))
        s += tl.dot(quantize_rows(s3, q_scale[:, None], True), tl.trans(k3))
        s = s.to(tl.float32) * q_scale[:, None]
    else:
        s = tl.dot(s0.to(tl.float16), tl.trans(k0))
        s = tl.dot(s1.to(tl.float16), tl.trans(k1), s)
        s = tl.dot(s2.to(tl.float16), tl.trans(k2), s)
        s = tl.dot(s3.to(tl.float16), tl.trans(k3), s)
    s = (s + zterm[:, None]) * sm_scale_log2
    n = start + t
    if MASKED:
        s = causal_mask(s, n, pos, hi)
    p, m, l, a0, a1, a2, a3, corr = _rescale(s, m, l, a0, a1, a2, a3, corr)
    # values: bytes [G, Q], per-token (scale, zero) of each value group
    vrow = (blk * BLOCK_SIZE + start % BLOCK_SIZE + t) * NUM_KV_HEADS + h_kv
    vcol = (blk * NUM_KV_HEADS + h_kv) * Q + c  # token-major (head, byte) rows
    vb = tl.load(v_ptr + vcol[None, :] * BLOCK_SIZE + (start % BLOCK_SIZE + t)[:, None])
    if NGV == 1:
        vs = tl.load(vmeta_ptr + vrow * 2).to(tl.float32)
        vz = tl.load(vmeta_ptr + vrow * 2 + 1).to(tl.float32)
        pw = p * vs[None, :]
        p_scale = tl.maximum(tl.max(pw, 1), 1e-30) / 127.0
        pq = quantize_rows(pw, p_scale[:, None], V_INT8)
        corr = corr + tl.sum(p * vz[None, :], 1)
    else:
        vm = vmeta_ptr + vrow[:, None] * (NGV * 2) + (c // (GV // 4))[None, :] * 2  # [G, Q]
        vs = tl.load(vm)
        vz = tl.load(vm + 1)
        p_scale = l  # unused without V_INT8
        pq = p.to(tl.float16)
    c0, c1, c2, c3 = crumb_planes(vb, PACKED, V_INT8)
    a0 = _value_dot(pq, c0, p_scale, vs, vz, a0, NGV == 1, V_INT8)
    a1 = _value_dot(pq, c1, p_scale, vs, vz, a1, NGV == 1, V_INT8)
    a2 = _value_dot(pq, c2, p_scale, vs, vz, a2, NGV == 1, V_INT8)
    a3 = _value_dot(pq, c3, p_scale, vs, vz, a3, NGV == 1, V_INT8)
    return m, l, a0, a1, a2, a3, corr


@triton.jit
def _residual_tile(q0, q1, q2, q3, m, l, a0, a1, a2, a3, corr, start, lo, hi, pos, res_k, res_v,
                   sm_scale_log2, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   R: tl.constexpr, GV: tl.constexpr):
    # full-precision tokens start..start+R-1 (rows 0..R-1 of the residual), kept to [lo, hi)
    Q: tl.constexpr = HEAD_DIM // 4
    t = tl.arange(0, R)
    n = start + t
    n_ok = (n >= lo) & (n < hi)
    ok = n_ok[:, None]
    c = tl.arange(0, Q)
    kr = res_k + (t * NUM_KV_HEADS)[:, None] * HEAD_DIM + c[None, :]
    s = tl.dot(q0.to(tl.float16), tl.trans(tl.load(kr, mask=ok, other=0.0).to(tl.float16)))
    s = tl.dot(q1.to(tl.float16), tl.trans(tl.load(kr + Q, mask=ok, other=0.0).to(tl.float16)), s)
    s = tl.dot(q2.to(tl.float16), tl.trans(tl.load(kr + 2 * Q, mask=ok, other=0.0).to(tl.float16)), s)
    s = tl.dot(q3.to(tl.float16), tl.trans(tl.load(kr + 3 * Q, mask=ok, other=0.0).to(tl.float16)), s)
    s = tl.where(n_ok[None, :], causal_mask(s * sm_scale_log2, n, pos, hi), float("-inf"))
    p, m, l, a0, a1, a2, a3, corr = _rescale(s, m, l, a0, a1, a2, a3, corr)
    p16 = p.to(tl.float16)
    ch = c // (GV // 4) * GV + c % (GV // 4)  # channel of slice 0's column c (module docstring)
    vr = res_v + (t * NUM_KV_HEADS)[:, None] * HEAD_DIM + ch[None, :]
    a0 = tl.dot(p16, tl.load(vr, mask=ok, other=0.0).to(tl.float16), a0)
    a1 = tl.dot(p16, tl.load(vr + GV // 4, mask=ok, other=0.0).to(tl.float16), a1)
    a2 = tl.dot(p16, tl.load(vr + GV // 2, mask=ok, other=0.0).to(tl.float16), a2)
    a3 = tl.dot(p16, tl.load(vr + 3 * GV // 4, mask=ok, other=0.0).to(tl.float16), a3)
    return m, l, a0, a1, a2, a3, corr


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def kivi_attention_kernel(
    # common: output, queries, paging, split scratch
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, seq_slots_ptr,
    part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_splits,
    # cache (contiguous, layout in kv_kivi) and residual [S, R, H, D]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, res_k_ptr, res_v_ptr,
    # shapes and tiling (BLOCK_N is the key group size G)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IS_DECODE: tl.constexpr,
    # format
    R: tl.constexpr, GV: tl.constexpr, K_INT8: tl.constexpr, V_INT8: tl.constexpr,
    PACKED: tl.constexpr,
):
    b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi = program_rows(
        context_lens_ptr, cu_seqlens_q_ptr, GQ, GQ_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, num_splits,
        IS_DECODE)
    if is_done:
        return
    h_kv = tl.program_id(2)
    Q: tl.constexpr = HEAD_DIM // 4
    c = tl.arange(0, Q)[None, :]
    q_rows = (tok * stride_qt + head * stride_qh)[:, None]
    q_ok = row_valid[:, None]
    q0 = tl.load(q_ptr + q_rows + c, mask=q_ok, other=0.0).to(tl.float32)
    q1 = tl.load(q_ptr + q_rows + c + Q, mask=q_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + q_rows + c + 2 * Q, mask=q_ok, other=0.0).to(tl.float32)
    q3 = tl.load(q_ptr + q_rows + c + 3 * Q, mask=q_ok, other=0.0).to(tl.float32)
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    corr = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([BLOCK_M, Q], tl.float32)
    a1 = tl.zeros([BLOCK_M, Q], tl.float32)
    a2 = tl.zeros([BLOCK_M, Q], tl.float32)
    a3 = tl.zeros([BLOCK_M, Q], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    ctx_len = tl.load(context_lens_ptr + b)
    quantized = ctx_len // R * R  # tokens [0, quantized) are in pages, the rest in the residual
    q_end = tl.minimum(hi, quantized)
    for start in range(lo, tl.minimum(full_hi, q_end), BLOCK_N):
        m, l, a0, a1, a2, a3, corr = _kivi_tile(
            q0, q1, q2, q3, m, l, a0, a1, a2, a3, corr, start, q_end, pos, bt_row, h_kv,
            sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, GV, K_INT8, V_INT8, PACKED, False)
    for start in range(tl.minimum(full_hi, q_end), q_end, BLOCK_N):
        m, l, a0, a1, a2, a3, corr = _kivi_tile(
            q0, q1, q2, q3, m, l, a0, a1, a2, a3, corr, start, q_end, pos, bt_row, h_kv,
            sm_scale_log2, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
            NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, GV, K_INT8, V_INT8, PACKED, True)
    if hi > tl.maximum(lo, quantized):  # this slice reaches into the residual
        seq = tl.load(seq_slots_ptr + b).to(tl.int64)
        res = (seq * R * NUM_KV_HEADS + h_kv) * HEAD_DIM
        m, l, a0, a1, a2, a3, corr = _residual_tile(
            q0, q1, q2, q3, m, l, a0, a1, a2, a3, corr, quantized, lo, hi, pos,
            res_k_ptr + res, res_v_ptr + res, sm_scale_log2,
            NUM_KV_HEADS, HEAD_DIM, R, GV)
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_rows = (tok * stride_ot + head * stride_oh)[:, None]
    part_rows = (((b * NUM_Q_HEADS + head) * num_splits + split) * HEAD_DIM)[:, None]
    l_b = l[:, None]
    ok = row_valid[:, None]
    corr_b = corr[:, None]
    ch = (c // (GV // 4) * GV + c % (GV // 4))  # channel of slice 0's column c
    store_output(a0 + corr_b, l_b, ch, out_rows, part_rows, ok, out_ptr, part_acc_ptr, SPLIT)
    store_output(a1 + corr_b, l_b, ch + GV // 4, out_rows, part_rows, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_output(a2 + corr_b, l_b, ch + GV // 2, out_rows, part_rows, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_output(a3 + corr_b, l_b, ch + 3 * GV // 4, out_rows, part_rows, ok, out_ptr,
                 part_acc_ptr, SPLIT)
    store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr, NUM_Q_HEADS, num_splits, SPLIT)


KEY_EXP = tl.constexpr(18)  # key dots run at 2**-18 of the scores (subnormal codes, see below)


@triton.jit
def _meta_row(pairs_ptr, first: tl.constexpr, Q: tl.constexpr):
    """float16 [1, Q] from Q float16 read as Q/2 32-bit pairs from `pairs_ptr + first` (a load of
    at least 4 bytes per lane, which the loop pipeliner prefetches)."""
    lo, hi = float16_halves(tl.load(pairs_ptr + first + tl.arange(0, Q // 2)))
    return tl.reshape(tl.join(lo, hi), (1, Q))


@triton.jit
def _group_scores(qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, start, bt_row, h_kv, k_ptr, kmeta_ptr,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  G: tl.constexpr, PACKED: tl.constexpr):
    """Scores S^T [G, H] (log2 units) of the key group at `start`, all below the residual, and
    its page (blk) and offset in the page."""
    Q: tl.constexpr = HEAD_DIM // 4
    t = tl.arange(0, G)
    c = tl.arange(0, Q)
    start = tl.multiple_of(start, G)
    blk = tl.load(bt_row + start // BLOCK_SIZE).to(tl.int64)
    off = tl.multiple_of(start % BLOCK_SIZE, G)
    krow = (blk * (BLOCK_SIZE // G) + off // G) * NUM_KV_HEADS + h_kv
    kb = tl.load(k_ptr + krow * (G * Q) + (t * Q)[:, None] + c[None, :])  # [G, Q]
    # per-channel key scales and zeros, [1, Q] rows against the query planes [H, Q]; the scaled
    # query as a float16 product (one rounding, as the dot operand takes it), the zero-point term
    # in float32
    meta = kmeta_ptr.to(tl.pointer_type(tl.int32)) + krow * HEAD_DIM  # channel pairs
    zterm = tl.sum(qz0 * _meta_row(meta, HEAD_DIM // 2, Q).to(tl.float32)
                   + qz1 * _meta_row(meta, 5 * Q // 2, Q).to(tl.float32)
                   + qz2 * _meta_row(meta, 3 * Q, Q).to(tl.float32)
                   + qz3 * _meta_row(meta, 7 * Q // 2, Q).to(tl.float32), 1)
    k0, k1, k2, k3 = subnormal_crumbs(kb, PACKED)
    s = tl.dot(k0, tl.trans(qs0 * _meta_row(meta, 0, Q)))
    s = tl.dot(k1, tl.trans(qs1 * _meta_row(meta, Q // 2, Q)), s)
    s = tl.dot(k2, tl.trans(qs2 * _meta_row(meta, Q, Q)), s)
    s = tl.dot(k3, tl.trans(qs3 * _meta_row(meta, 3 * Q // 2, Q)), s)
    return s * (2.0 ** KEY_EXP) + zterm[None, :], blk, off


@triton.jit
def _group_values(p, blk, off, a0, a1, a2, a3, h_kv, v_ptr, vmeta_ptr,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, G: tl.constexpr, PACKED: tl.constexpr):
    """Accumulates the P-weights p [G, H] of a key group's tokens against their values; returns
    the accumulators and p * zero [G, H] (the zero-point term, not yet summed)."""
    Q: tl.constexpr = HEAD_DIM // 4
    t = tl.arange(0, G)
    c = tl.arange(0, Q)
    vs, vz = scale_zero(vmeta_ptr, (blk * BLOCK_SIZE + off + t) * NUM_KV_HEADS + h_kv, True)
    pw = (p * vs[:, None]).to(tl.float16)
    vb = tl.load(v_ptr + ((blk * NUM_KV_HEADS + h_kv) * Q + c)[:, None] * BLOCK_SIZE
                 + (off + t)[None, :])  # [Q, G], token-major
    v0, v1, v2, v3 = subnormal_crumbs(vb, PACKED)
    a0 = tl.dot(v0, pw, a0)
    a1 = tl.dot(v1, pw, a1)
    a2 = tl.dot(v2, pw, a2)
    a3 = tl.dot(v3, pw, a3)
    return a0, a1, a2, a3, p * vz[:, None]


@triton.jit
def _kivi_decode_tile(qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, m, l, a0, a1, a2, a3, corr, start,
                      bt_row, h_kv, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr,
                      NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, G: tl.constexpr, PACKED: tl.constexpr,
                      GROUPS: tl.constexpr):
    # GROUPS (1 or 2) key groups from `start`, all below the residual (no mask); two share one
    # max, one rescale check and one reduction per sum
    s0, blk0, off0 = _group_scores(qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, start, bt_row, h_kv,
                                   k_ptr, kmeta_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, G, PACKED)
    if GROUPS == 2:
        s1, blk1, off1 = _group_scores(qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, start + G, bt_row,
                                       h_kv, k_ptr, kmeta_ptr, NUM_KV_HEADS, HEAD_DIM,
                                       BLOCK_SIZE, G, PACKED)
        tile_max = tl.max(tl.maximum(s0, s1), 0)
    else:
        tile_max = tl.max(s0, 0)
    if tl.max((tile_max > m + TAU).to(tl.int32), 0) > 0:  # lazy rescale, see the common module
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp2(m - m_new)
        a0 = a0 * alpha[None, :]
        a1 = a1 * alpha[None, :]
        a2 = a2 * alpha[None, :]
        a3 = a3 * alpha[None, :]
        corr = corr * alpha
        l = l * alpha
        m = m_new
    p = tl.exp2(s0 - m[None, :])
    a0, a1, a2, a3, z = _group_values(p, blk0, off0, a0, a1, a2, a3, h_kv, v_ptr, vmeta_ptr,
                                      NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, G, PACKED)
    if GROUPS == 2:
        p1 = tl.exp2(s1 - m[None, :])
        a0, a1, a2, a3, z1 = _group_values(p1, blk1, off1, a0, a1, a2, a3, h_kv, v_ptr,
                                           vmeta_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, G,
                                           PACKED)
        p = p + p1
        z = z + z1
    return m, l + tl.sum(p, 0), a0, a1, a2, a3, corr + tl.sum(z, 0)


@triton.jit
def _residual_rows(qr0, qr1, qr2, qr3, m, l, a0, a1, a2, a3, corr, start, lo, hi, res_k, res_v,
                   NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, R: tl.constexpr):
    # `_residual_tile` with tokens as rows: full-precision tokens start..start+R-1 kept to [lo, hi)
    Q: tl.constexpr = HEAD_DIM // 4
    t = tl.arange(0, R)
    n = start + t
    n_ok = (n >= lo) & (n < hi)
    c = tl.arange(0, Q)
    kr = res_k + (t * NUM_KV_HEADS * HEAD_DIM)[:, None] + c[None, :]  # [R, Q]
    ok = n_ok[:, None]
    s = tl.dot(tl.load(kr, mask=ok, other=0.0).to(tl.float16), qr0)
    s = tl.dot(tl.load(kr + Q, mask=ok, other=0.0).to(tl.float16), qr1, s)
    s = tl.dot(tl.load(kr + 2 * Q, mask=ok, other=0.0).to(tl.float16), qr2, s)
    s = tl.dot(tl.load(kr + 3 * Q, mask=ok, other=0.0).to(tl.float16), qr3, s)
    s = tl.where(ok, s, float("-inf"))
    tile_max = tl.max(s, 0)
    m_new = tl.maximum(m, tile_max)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[None, :])
    l = l * alpha + tl.sum(p, 0)
    p16 = p.to(tl.float16)
    vr = res_v + (t * NUM_KV_HEADS * HEAD_DIM)[None, :] + c[:, None]  # [Q, R]
    vok = n_ok[None, :]
    a0 = tl.dot(tl.load(vr, mask=vok, other=0.0).to(tl.float16), p16, a0 * alpha[None, :])
    a1 = tl.dot(tl.load(vr + Q, mask=vok, other=0.0).to(tl.float16), p16, a1 * alpha[None, :])
    a2 = tl.dot(tl.load(vr + 2 * Q, mask=vok, other=0.0).to(tl.float16), p16,
                a2 * alpha[None, :])
    a3 = tl.dot(tl.load(vr + 3 * Q, mask=vok, other=0.0).to(tl.float16), p16,
                a3 * alpha[None, :])
    return m_new, l, a0, a1, a2, a3, corr * alpha


@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def kivi_decode_kernel(
    # output and queries [B, Hq, D], paging, split scratch (as `kivi_attention_kernel`)
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, seq_slots_ptr, part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt, num_splits,
    # cache (contiguous, layout in kv_kivi; one value group per head) and residual [S, R, H, D]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, res_k_ptr, res_v_ptr,
    # shapes and tiling: tiles are key groups of G tokens
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, G: tl.constexpr, SPLIT: tl.constexpr,
    R: tl.constexpr, PACKED: tl.constexpr, PAIRS: tl.constexpr,
):
    """Decode with tokens as the dots' M dimension: one program per (sequence, split, kv head),
    its GQA group the dots' N columns. Codes are subnormal float16 (`subnormal_crumbs`): the key
    plane p carries 2**(2p - 24) per code, so each group's scaled query plane is taken
    * 2**(24 - 2p - KEY_EXP) (in float16 range while |q * scale| <= 2**10 per channel) and the
    dots give scores * 2**-KEY_EXP; value plane p accumulates outputs * 2**(2p - 24)."""
    b, split, lo, full_hi, hi = decode_slice(context_lens_ptr, G, num_splits)
    h_kv = tl.program_id(2)
    Q: tl.constexpr = HEAD_DIM // 4
    hh = tl.arange(0, GQ_PAD)
    head = h_kv * GQ + hh
    valid = hh < GQ
    # query planes [H, Q]: plane p, column c is channel p * Q + c
    q_rows = q_ptr + (b * stride_qt + head * stride_qh)[:, None] + tl.arange(0, Q)[None, :]
    q_ok = valid[:, None]
    qz0 = tl.load(q_rows, mask=q_ok, other=0.0).to(tl.float32) * sm_scale_log2
    qz1 = tl.load(q_rows + Q, mask=q_ok, other=0.0).to(tl.float32) * sm_scale_log2
    qz2 = tl.load(q_rows + 2 * Q, mask=q_ok, other=0.0).to(tl.float32) * sm_scale_log2
    qz3 = tl.load(q_rows + 3 * Q, mask=q_ok, other=0.0).to(tl.float32) * sm_scale_log2
    c = tl.arange(0, Q)[:, None]  # output rows: plane p, row c is channel p * Q + c
    m = tl.full([GQ_PAD], NEG_BIG, tl.float32)
    l = tl.zeros([GQ_PAD], tl.float32)
    corr = tl.zeros([GQ_PAD], tl.float32)
    a0 = tl.zeros([Q, GQ_PAD], tl.float32)
    a1 = tl.zeros([Q, GQ_PAD], tl.float32)
    a2 = tl.zeros([Q, GQ_PAD], tl.float32)
    a3 = tl.zeros([Q, GQ_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    ctx_len = tl.load(context_lens_ptr + b)
    quantized = ctx_len // R * R  # tokens [0, quantized) are in pages, the rest in the residual
    qs0 = (qz0 * 2.0 ** (24 - KEY_EXP)).to(tl.float16)
    qs1 = (qz1 * 2.0 ** (22 - KEY_EXP)).to(tl.float16)
    qs2 = (qz2 * 2.0 ** (20 - KEY_EXP)).to(tl.float16)
    qs3 = (qz3 * 2.0 ** (18 - KEY_EXP)).to(tl.float16)
    q_end = tl.minimum(hi, quantized)
    singles_from = lo
    if PAIRS:
        singles_from = lo + (q_end - lo) // (2 * G) * (2 * G)
        for start in range(lo, singles_from, 2 * G):
            m, l, a0, a1, a2, a3, corr = _kivi_decode_tile(
                qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, m, l, a0, a1, a2, a3, corr, start,
                bt_row, h_kv, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, NUM_KV_HEADS, HEAD_DIM,
                BLOCK_SIZE, G, PACKED, 2)
    for start in range(singles_from, q_end, G):
        m, l, a0, a1, a2, a3, corr = _kivi_decode_tile(
            qs0, qs1, qs2, qs3, qz0, qz1, qz2, qz3, m, l, a0, a1, a2, a3, corr, start, bt_row,
            h_kv, k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, G,
            PACKED, 1)
    a0 = a0 * 2.0 ** 24  # value planes back to output units
    a1 = a1 * 2.0 ** 22
    a2 = a2 * 2.0 ** 20
    a3 = a3 * 2.0 ** 18
    if hi > tl.maximum(lo, quantized):  # this slice reaches into the residual
        seq = tl.load(seq_slots_ptr + b).to(tl.int64)
        res = (seq * R * NUM_KV_HEADS + h_kv) * HEAD_DIM
        m, l, a0, a1, a2, a3, corr = _residual_rows(
            tl.trans(qz0.to(tl.float16)), tl.trans(qz1.to(tl.float16)),
            tl.trans(qz2.to(tl.float16)), tl.trans(qz3.to(tl.float16)),
            m, l, a0, a1, a2, a3, corr, quantized, lo, hi, res_k_ptr + res, res_v_ptr + res,
            NUM_KV_HEADS, HEAD_DIM, R)
    NUM_Q_HEADS: tl.constexpr = NUM_KV_HEADS * GQ
    out_cols = (b * stride_ot + head * stride_oh)[None, :]
    part_cols = (((b * NUM_Q_HEADS + head) * num_splits + split) * HEAD_DIM)[None, :]
    l_b = l[None, :]
    ok = valid[None, :]
    corr_b = corr[None, :]
    store_output(a0 + corr_b, l_b, c, out_cols, part_cols, ok, out_ptr, part_acc_ptr, SPLIT)
    store_output(a1 + corr_b, l_b, c + Q, out_cols, part_cols, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_output(a2 + corr_b, l_b, c + 2 * Q, out_cols, part_cols, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_output(a3 + corr_b, l_b, c + 3 * Q, out_cols, part_cols, ok, out_ptr, part_acc_ptr,
                 SPLIT)
    store_split_stats(m, l, b, head, split, valid, part_ml_ptr, NUM_Q_HEADS, num_splits, SPLIT)


def kivi_decode_args(cache, pairs: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `kivi_decode_kernel` for a cache; `pairs`: two key
    groups per loop step."""
    p, s, fmt = cache.parts, cache.state, cache.fmt
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"], s["res_k"], s["res_v"]],
            {"G": fmt.group_size, "R": fmt.r, "PACKED": packed_unpack(p["k"]), "PAIRS": pairs})


def kivi_cache_args(cache, k_int8: bool, v_int8: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `kivi_attention_kernel` for a cache."""
    p, s, fmt = cache.parts, cache.state, cache.fmt
    gv = fmt.value_group(cache.head_dim)
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"], s["res_k"], s["res_v"]],
            {"R": fmt.r, "GV": gv,
             "K_INT8": k_int8 and cache.head_dim >= 128,
             "V_INT8": v_int8 and gv == cache.head_dim,
             "PACKED": packed_unpack(p["k"])})
