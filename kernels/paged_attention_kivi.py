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
"""
from __future__ import annotations

import triton
import triton.language as tl

from partita.kernels.paged_attention_common import (NEG_BIG, TAU, causal_mask, crumb_planes,
                                                    packed_unpack, program_rows, quantize_rows,
                                                    store_output, store_split_stats)


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
    vb = tl.load(v_ptr + vrow[:, None] * Q + c[None, :])
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


@triton.jit
def kivi_attention_kernel(
    # common: output, queries, paging, split scratch
    out_ptr, q_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_q_ptr, seq_slots_ptr,
    part_acc_ptr, part_ml_ptr,
    sm_scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    # cache (contiguous, layout in kv_kivi) and residual [S, R, H, D]
    k_ptr, kmeta_ptr, v_ptr, vmeta_ptr, res_k_ptr, res_v_ptr,
    # shapes and tiling (BLOCK_N is the key group size G)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GQ: tl.constexpr, GQ_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IS_DECODE: tl.constexpr,
    # format
    R: tl.constexpr, GV: tl.constexpr, K_INT8: tl.constexpr, V_INT8: tl.constexpr,
    PACKED: tl.constexpr,
):
    b, split, is_done, row_valid, tok, head, pos, lo, full_hi, hi = program_rows(
        context_lens_ptr, cu_seqlens_q_ptr, GQ, GQ_PAD, BLOCK_Q, BLOCK_M, BLOCK_N, NUM_SPLITS,
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
    part_rows = (((b * NUM_Q_HEADS + head) * NUM_SPLITS + split) * HEAD_DIM)[:, None]
    l_b = l[:, None]
    ok = row_valid[:, None]
    corr_b = corr[:, None]
    ch = (c // (GV // 4) * GV + c % (GV // 4))  # channel of slice 0's column c
    store_output(a0 + corr_b, l_b, ch, out_rows, part_rows, ok, out_ptr, part_acc_ptr, NUM_SPLITS)
    store_output(a1 + corr_b, l_b, ch + GV // 4, out_rows, part_rows, ok, out_ptr, part_acc_ptr,
                 NUM_SPLITS)
    store_output(a2 + corr_b, l_b, ch + GV // 2, out_rows, part_rows, ok, out_ptr, part_acc_ptr,
                 NUM_SPLITS)
    store_output(a3 + corr_b, l_b, ch + 3 * GV // 4, out_rows, part_rows, ok, out_ptr,
                 part_acc_ptr, NUM_SPLITS)
    store_split_stats(m, l, b, head, split, row_valid, part_ml_ptr, NUM_Q_HEADS, NUM_SPLITS)


def kivi_cache_args(cache, k_int8: bool, v_int8: bool) -> tuple[list, dict]:
    """Pointer arguments and constexprs of `kivi_attention_kernel` for a cache."""
    p, s, fmt = cache.parts, cache.state, cache.fmt
    gv = fmt.value_group(cache.head_dim)
    return ([p["k"], p["k_meta"], p["v"], p["v_meta"], s["res_k"], s["res_v"]],
            {"R": fmt.r, "GV": gv,
             "K_INT8": k_int8 and cache.head_dim >= 128,
             "V_INT8": v_int8 and gv == cache.head_dim,
             "PACKED": packed_unpack(p["k"])})
