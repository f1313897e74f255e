"""KV format `kivi2`: 2-bit KIVI. Keys per channel over groups of G tokens, values per token.

Keys are quantized per channel (KIVI: key outliers live in fixed channels), which needs the G
tokens of a group before the group's scales exist. New tokens therefore land first in a
full-precision *residual* area of their sequence and are quantized when a unit of R tokens
(R a multiple of G, dividing block_size) fills; keys and values move together, so the newest
`context_len % R` tokens of every sequence are always read in full precision.

Packed layout per block (B = block_size, H = num_kv_heads, D = head_dim, Gv = value group):

    k       [B/G, H, G, D/4] uint8: token t of key group g; byte c holds channel c + p*D/4 in
            bits 2p..2p+1 (p = 0..3)
    k_meta  [B/G, H, 2, D] float16: per group and channel, row 0 scale, row 1 zero
    v       [H, D/4, B] uint8, token-major: within value group w (Gv channels), byte row
            w*Gv/4 + j holds channel w*Gv + p*Gv/4 + j in bits 2p..2p+1, one byte per token
    v_meta  [B, H, D/Gv, 2] float16 (scale, zero) per token and value group
    state["res_k"], state["res_v"]  [max_num_seqs, R, H, D] model dtype: the residual of each
            sequence slot; token at position pos sits at row pos % R while pos >= context_len
            rounded down to R

x ~= code * scale + zero with code in 0..3. Packing four *strided* channels per byte (rather
than neighbours) lets the attention kernel take the four bit-pairs of a loaded tile as four
contiguous channel slices, each a dot operand without register interleaving. Values are
token-major (as int4's) because P V reduces over tokens: a tensor-core lane's operand is
consecutive tokens of one channel, neighbouring bytes in this layout.

Writing (`fmt.write(cache, k, v, slot_mapping, seq_slots)`, two launches):
  1. flush: for each new token that ends a unit (offset % R == R - 1) quantize the unit's R
     tokens, taking those written in this call from k/v and older ones from the residual;
  2. stage: copy new tokens whose unit does not end in this call into the residual.
A sequence's new tokens must be contiguous in k/v and in position order (the engine's layout);
slot contiguity is what tells a new token from an older one.

Bytes per token and kv head in blocks (K+V): D/2 + 4D/G + 4D/Gv (D = 128, G = 32, Gv = 128: 84,
6.1x less than bf16; Gv = 64: 88, 5.8x), plus the residual: 4 * R * D bytes per sequence slot and
kv head. Gv defaults to the whole head (at most 128 channels): values have no outlier channels, so
on `outlier_kv` data a 128-wide group raised the attention-output error by ~5% (median 0.689 vs
0.655 over 12 seeds, D = 128, 512 tokens) for 4.5% fewer bytes and a faster decode kernel (one
value scale per token: H200, batch 64 x 8k, 486 vs 615 us,
benchmarks/results/2026-11-25-attention-int4-h200.md).

Limits: G in {32, 64, 128}; R a power-of-two multiple of G, <= 128, dividing block_size; Gv in {64, 128} dividing D;
head_dim >= 64; values within the float16 range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from partita.kernels.kv_base import KVFormat, PagedKVCache
from partita.kernels.kv_quant import asym_codes, asym_params, asym_quantize


# -- packing (torch) --------------------------------------------------------------------------
def pack2(codes: torch.Tensor, width: int) -> torch.Tensor:
    """codes [..., D] in 0..3 -> [..., D/4] uint8 (channel groups of `width`, strided quarters)."""
    *lead, d = codes.shape
    c = codes.reshape(*lead, d // width, 4, width // 4)
    out = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    return out.reshape(*lead, d // 4)


def unpack2(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack2`: [..., D/4] uint8 -> codes [..., D] uint8."""
    *lead, q = packed.shape
    d = 4 * q
    b = packed.reshape(*lead, d // width, 1, width // 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    return ((b >> shifts[:, None]) & 3).reshape(*lead, d)


# -- Triton kernels ---------------------------------------------------------------------------
@triton.jit
def _unit_rows(k_ptr, res_ptr, slot_ptr, t, slot, seq, h, r, c, stride_kt, stride_kh,
               NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, R: tl.constexpr):
    # rows r (unit offsets, any shape) of the unit ending at token t, channels c: tokens written in
    # this call come from k, older ones from the residual
    src_t = t - (R - 1 - r)
    prev = tl.load(slot_ptr + tl.maximum(src_t, 0))
    is_new = (src_t >= 0) & (prev == slot - (R - 1 - r))
    x_new = tl.load(k_ptr + src_t * stride_kt + h * stride_kh + c, mask=is_new, other=0.0)
    x_old = tl.load(res_ptr + ((seq * R + r) * NUM_HEADS + h) * HEAD_DIM + c, mask=~is_new,
                    other=0.0)
    return tl.where(is_new, x_new, x_old).to(tl.float32)


@triton.jit
def _kivi_flush_kernel(
    # new tokens [T, H, D], slots [T], sequence slots [T]
    k_ptr, v_ptr, slot_ptr, seq_ptr,
    # cache parts (contiguous, layout in the module docstring) and residual [S, R, H, D]
    kc_ptr, kmeta_ptr, vc_ptr, vmeta_ptr, res_k_ptr, res_v_ptr,
    # strides of the new tokens, in elements
    stride_kt, stride_kh, stride_vt, stride_vh,
    # shapes
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr, R: tl.constexpr, GV: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if (slot < 0) | (slot % R != R - 1):  # only the token that ends a unit flushes it
        return
    seq = tl.load(seq_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    unit = (slot % BLOCK_SIZE) // R
    Q: tl.constexpr = HEAD_DIM // 4
    NGU: tl.constexpr = R // G
    # keys: [NGU, G, Q] tiles, one per bit-pair p, channel c + p*Q; quantized over tokens (axis 1)
    gi = tl.arange(0, NGU)[:, None, None]
    tt = tl.arange(0, G)[None, :, None]
    cq = tl.arange(0, Q)[None, None, :]
    kbyte = tl.zeros([NGU, G, Q], dtype=tl.uint8)
    group = blk * (BLOCK_SIZE // G) + unit * NGU + tl.arange(0, NGU)[:, None]  # absolute key group
    for p in tl.static_range(4):
        x = _unit_rows(k_ptr, res_k_ptr, slot_ptr, t, slot, seq, h, gi * G + tt, cq + p * Q,
                       stride_kt, stride_kh, NUM_HEADS, HEAD_DIM, R)
        s16, z16 = asym_params(tl.min(x, 1), tl.max(x, 1), 3.0)
        kbyte = kbyte | (asym_codes(x, s16[:, None, :], z16[:, None, :], 3.0) << (2 * p))
        meta = kmeta_ptr + ((group * NUM_HEADS + h) * 2) * HEAD_DIM + p * Q + tl.arange(0, Q)[None, :]
        tl.store(meta, s16)
        tl.store(meta + HEAD_DIM, z16)
    tl.store(kc_ptr + ((group[:, :, None] * NUM_HEADS + h) * G + tt) * Q + cq, kbyte)
    # values: per token r, value group w: [R, NGV, GV/4] tiles per bit-pair p
    NGV: tl.constexpr = HEAD_DIM // GV
    r = tl.arange(0, R)[:, None, None]
    w = tl.arange(0, NGV)[None, :, None]
    j = tl.arange(0, GV // 4)[None, None, :]
    x0 = _unit_rows(v_ptr, res_v_ptr, slot_ptr, t, slot, seq, h, r, w * GV + j,
                    stride_vt, stride_vh, NUM_HEADS, HEAD_DIM, R)
    x1 = _unit_rows(v_ptr, res_v_ptr, slot_ptr, t, slot, seq, h, r, w * GV + GV // 4 + j,
                    stride_vt, stride_vh, NUM_HEADS, HEAD_DIM, R)
    x2 = _unit_rows(v_ptr, res_v_ptr, slot_ptr, t, slot, seq, h, r, w * GV + GV // 2 + j,
                    stride_vt, stride_vh, NUM_HEADS, HEAD_DIM, R)
    x3 = _unit_rows(v_ptr, res_v_ptr, slot_ptr, t, slot, seq, h, r, w * GV + 3 * GV // 4 + j,
                    stride_vt, stride_vh, NUM_HEADS, HEAD_DIM, R)
    mn = tl.minimum(tl.minimum(tl.min(x0, 2), tl.min(x1, 2)),
                    tl.minimum(tl.min(x2, 2), tl.min(x3, 2)))
    mx = tl.maximum(tl.maximum(tl.max(x0, 2), tl.max(x1, 2)),
                    tl.maximum(tl.max(x2, 2), tl.max(x3, 2)))
    s16, z16 = asym_params(mn, mx, 3.0)
    s3 = s16[:, :, None]
    z3 = z16[:, :, None]
    vbyte = (asym_codes(x0, s3, z3, 3.0) | (asym_codes(x1, s3, z3, 3.0) << 2)
             | (asym_codes(x2, s3, z3, 3.0) << 4) | (asym_codes(x3, s3, z3, 3.0) << 6))
    col = (blk * NUM_HEADS + h) * Q + w * (GV // 4) + j  # [1, NGV, GV/4] (head, byte) rows
    tl.store(vc_ptr + col * BLOCK_SIZE + unit * R + r, vbyte)
    tok2 = blk * BLOCK_SIZE + unit * R + tl.arange(0, R)[:, None]
    vmeta = vmeta_ptr + ((tok2 * NUM_HEADS + h) * NGV + tl.arange(0, NGV)[None, :]) * 2
    tl.store(vmeta, s16)
    tl.store(vmeta + 1, z16)


@triton.jit
def _kivi_stage_kernel(
    # new tokens [T, H, D], slots [T], sequence slots [T]; residual [S, R, H, D]
    k_ptr, v_ptr, slot_ptr, seq_ptr, res_k_ptr, res_v_ptr,
    # strides of the new tokens, in elements
    stride_kt, stride_kh, stride_vt, stride_vh,
    # sizes
    num_tokens,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, R: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    j = slot % R
    end = t + (R - 1 - j)  # the token that would end this unit, if it is in this call
    end_slot = tl.load(slot_ptr + tl.minimum(end, num_tokens - 1))
    if (end < num_tokens) & (end_slot == slot + (R - 1 - j)):
        return  # flushed by `_kivi_flush_kernel`
    seq = tl.load(seq_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    dst = ((seq * R + j) * NUM_HEADS + h) * HEAD_DIM + d
    tl.store(res_k_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask),
             mask=mask)
    tl.store(res_v_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask),
             mask=mask)


@dataclass(frozen=True)
class Kivi2Format(KVFormat):
    """2-bit KIVI: keys per channel over `group_size` tokens, values per token; residual R."""

    name = "kivi2"
    needs_seq_slots = True
    group_size: int = 32  # tokens per key (scale, zero) per channel
    residual: int = 0  # R: tokens kept in full precision until quantized; 0 means group_size
    value_group_size: int = 0  # channels per value (scale, zero); 0: the head's, at most 128

    @property
    def r(self) -> int:
        return self.residual or self.group_size

    def value_group(self, head_dim: int) -> int:
        """Gv: channels sharing a value (scale, zero)."""
        return self.value_group_size or min(head_dim, 128)

    def block_multiple(self) -> int:
        return self.r

    def check(self, block_size, num_kv_heads, head_dim, dtype) -> None:
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"kivi2 group_size={self.group_size}: must be 32, 64 or 128")
        if self.r % self.group_size or self.r > 128 or self.r & (self.r - 1):
            raise ValueError(f"kivi2 residual={self.residual}: must be a power-of-two multiple "
                             f"of group_size={self.group_size}, at most 128")
        gv = self.value_group(head_dim)
        if gv not in (64, 128) or head_dim % gv:
            raise ValueError(f"kivi2 value_group_size={gv}: must be 64 or 128 and divide "
                             f"head_dim={head_dim}")
        super().check(block_size, num_kv_heads, head_dim, dtype)

    def part_specs(self, block_size, num_kv_heads, head_dim, dtype):
        g, h, d = self.group_size, num_kv_heads, head_dim
        return {"k": ((block_size // g, h, g, d // 4), torch.uint8),
                "k_meta": ((block_size // g, h, 2, d), torch.float16),
                "v": ((h, d // 4, block_size), torch.uint8),
                "v_meta": ((block_size, h, d // self.value_group(d), 2), torch.float16)}

    def init_state(self, cache, max_num_seqs):
        shape = (max(max_num_seqs, 1), self.r, cache.num_kv_heads, cache.head_dim)
        return {"res_k": torch.zeros(shape, dtype=cache.dtype, device=cache.device),
                "res_v": torch.zeros(shape, dtype=cache.dtype, device=cache.device)}

    def write_triton(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        p, s = cache.parts, cache.state
        h, t = cache.num_kv_heads, k.shape[0]
        strides = (k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        _kivi_flush_kernel[(t, h)](
            k, v, slot_mapping, seq_slots, p["k"], p["k_meta"], p["v"], p["v_meta"],
            s["res_k"], s["res_v"], *strides,
            NUM_HEADS=h, HEAD_DIM=cache.head_dim, BLOCK_SIZE=cache.block_size,
            G=self.group_size, R=self.r, GV=self.value_group(cache.head_dim), num_warps=4)
        _kivi_stage_kernel[(t,)](
            k, v, slot_mapping, seq_slots, s["res_k"], s["res_v"], *strides, t,
            NUM_HEADS=h, HEADS_PAD=triton.next_power_of_2(h), HEAD_DIM=cache.head_dim,
            R=self.r, num_warps=4)

    def write_reference(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        r = self.r
        s = slot_mapping.long()
        seq = seq_slots.long()
        idx = torch.arange(len(s), device=s.device)
        valid = s >= 0
        j = s % r
        # is the token's unit completed by a later token of this same call?
        end = idx + (r - 1 - j)
        end_c = end.clamp(max=len(s) - 1)
        completes = valid & (end < len(s)) & (s[end_c] == s + (r - 1 - j))
        # 1. flush: units ending in this call, their rows from k/v (new) or the residual (older)
        te = idx[valid & (j == r - 1)]
        if len(te):
            off = torch.arange(r, device=s.device)
            src = te[:, None] - (r - 1 - off)
            is_new = (src >= 0) & (s[src.clamp(min=0)] == s[te][:, None] - (r - 1 - off))
            is_new = is_new[..., None, None]
            res_rows = (seq[te][:, None], off[None, :])
            uk = torch.where(is_new, k[src.clamp(min=0)], cache.state["res_k"][res_rows])
            uv = torch.where(is_new, v[src.clamp(min=0)], cache.state["res_v"][res_rows])
            self._store_units(cache, uk, uv, s[te])
        # 2. stage: tokens whose unit stays open
        st = valid & ~completes
        cache.state["res_k"][seq[st], j[st]] = k[st]
        cache.state["res_v"][seq[st], j[st]] = v[st]

    def _store_units(self, cache: PagedKVCache, uk: torch.Tensor, uv: torch.Tensor,
                     end_slots: torch.Tensor) -> None:
        # uk, uv: [U, R, H, D] the units ending at `end_slots` [U]
        r, bs, g, gv = self.r, cache.block_size, self.group_size, self.value_group(cache.head_dim)
        n_u, _, h, d = uk.shape
        blk = end_slots // bs
        unit = (end_slots % bs) // r
        kg = uk.reshape(n_u, r // g, g, h, d)
        codes, sc, zr = asym_quantize(kg, 2, 3)  # per channel over the group's tokens
        groups = unit[:, None] * (r // g) + torch.arange(r // g, device=uk.device)
        packed = pack2(codes, d).permute(0, 1, 3, 2, 4)  # [U, R/G, H, G, D/4]
        cache.parts["k"][blk[:, None], groups] = packed
        meta = torch.cat([sc, zr], 2).permute(0, 1, 3, 2, 4)  # [U, R/G, H, 2, D]
        cache.parts["k_meta"][blk[:, None], groups] = meta
        vc, vs, vz = asym_quantize(uv.reshape(n_u, r, h, d // gv, gv), -1, 3)
        rows = unit[:, None] * r + torch.arange(r, device=uk.device)
        hh = torch.arange(h, device=uk.device)[:, None, None]
        qq = torch.arange(d // 4, device=uk.device)[:, None]
        packed_v = pack2(vc.reshape(n_u, r, h, d), gv).permute(0, 2, 3, 1)  # [U, H, D/4, R]
        cache.parts["v"][blk[:, None, None, None], hh, qq, rows[:, None, None]] = packed_v
        cache.parts["v_meta"][blk[:, None], rows] = torch.cat([vs, vz], -1)

    def dequantize_blocks(self, cache, block_ids):
        p, gv = cache.parts, self.value_group(cache.head_dim)
        n, bs, h, d = len(block_ids), cache.block_size, cache.num_kv_heads, cache.head_dim
        kc = unpack2(p["k"][block_ids], d).float()  # [n, B/G, H, G, D]
        km = p["k_meta"][block_ids].float()  # [n, B/G, H, 2, D]
        k = kc * km[:, :, :, 0:1] + km[:, :, :, 1:2]
        k = k.permute(0, 1, 3, 2, 4).reshape(n, bs, h, d)
        vc = unpack2(p["v"][block_ids].permute(0, 3, 1, 2), gv).float()  # [n, B, H, D]
        vc = vc.reshape(n, bs, h, d // gv, gv)
        vm = p["v_meta"][block_ids].float()
        v = (vc * vm[..., 0:1] + vm[..., 1:2]).reshape(n, bs, h, d)
        return k, v

    def gather(self, cache, block_ids, context_len, seq_slot=None):
        """Quantized tokens below context_len rounded down to R, the rest from the residual."""
        k, v = super().gather(cache, block_ids, context_len)
        done = context_len // self.r * self.r
        if done < context_len:
            n = context_len - done
            k = torch.cat([k[:done], cache.state["res_k"][seq_slot, :n].float()])
            v = torch.cat([v[:done], cache.state["res_v"][seq_slot, :n].float()])
        return k, v
