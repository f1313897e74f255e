"""KV format `int4`: 4-bit codes, asymmetric per token, kv head and group of G channels.

Packed layout per block (B = block_size, H = num_kv_heads, D = head_dim, G = group_size,
NG = D / G):

    k               [B, H, D/2] uint8: within channel group g, byte g*G/2 + j holds
                    channel g*G + j in its low nibble and channel g*G + G/2 + j in its high nibble
    v               [H, D/2, B] uint8: the same bytes, token-major within a (head, byte) row
    k_meta, v_meta  [B, H, NG, 2] float16 (scale, zero) per group; x ~= code * scale + zero

The half-group split (rather than neighbouring channels in one byte) lets the attention kernel
use the low and the high nibbles of a loaded tile as two contiguous channel slices, each a dot
operand as it is, without interleaving registers. Values are stored token-major because P V
reduces over tokens: an MMA lane's B operand is consecutive tokens of one channel, which in
this layout are neighbouring bytes (one shared-memory load for four), where the token-minor
layout of `k` needs a byte load each. Bytes per token and kv head (K+V):
D + 8 * D / G (D = 128: 160 at G = 32, 144 at G = 64, 136 at G = 128; bf16 takes 512).

Limits: G in {32, 64, 128} and G <= D; values within the float16 range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from partita.kernels.kv_base import KVFormat, PagedKVCache
from partita.kernels.kv_quant import asym_codes, asym_params, asym_quantize

INT4_GROUP_SIZES = (32, 64, 128)


@triton.jit
def _store_token_int4(src, dst, meta, mask, G: tl.constexpr):
    # src: [HP, NG, G/2] pointers to the first half of each group; dst: byte pointers, same shape;
    # meta: [HP, NG] pointers to (scale, zero) pairs
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + G // 2, mask=mask, other=0.0).to(tl.float32)
    mn = tl.minimum(tl.min(lo, 2), tl.min(hi, 2))
    mx = tl.maximum(tl.max(lo, 2), tl.max(hi, 2))
    s16, z16 = asym_params(mn, mx, 15.0)
    c_lo = asym_codes(lo, s16[:, :, None], z16[:, :, None], 15.0)
    c_hi = asym_codes(hi, s16[:, :, None], z16[:, :, None], 15.0)
    tl.store(dst, c_lo | (c_hi << 4), mask=mask)
    meta_mask = tl.max(mask.to(tl.int32), 2) > 0  # [HP, NG]: the head exists
    tl.store(meta, s16, mask=meta_mask)
    tl.store(meta + 1, z16, mask=meta_mask)


@triton.jit
def _write_int4_kernel(
    # new tokens [T, H, D] and their slots [T]
    k_ptr, v_ptr, slot_ptr,
    # cache parts (contiguous): k codes [num_blocks, B, H, D/2], v codes [num_blocks, H, D/2, B],
    # meta [num_blocks, B, H, NG, 2]
    kc_ptr, vc_ptr, kmeta_ptr, vmeta_ptr,
    # strides of the new tokens, in elements
    stride_kt, stride_kh, stride_vt, stride_vh,
    # shapes
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, G: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    NG: tl.constexpr = HEAD_DIM // G
    h = tl.arange(0, HEADS_PAD)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    j = tl.arange(0, G // 2)[None, None, :]
    mask = (h < NUM_HEADS) & (j < G // 2)
    dst = (slot * NUM_HEADS + h) * (HEAD_DIM // 2) + g * (G // 2) + j
    blk = slot // BLOCK_SIZE
    v_dst = ((blk * NUM_HEADS + h) * (HEAD_DIM // 2) + g * (G // 2) + j) * BLOCK_SIZE \
        + slot % BLOCK_SIZE
    meta = ((slot * NUM_HEADS + tl.arange(0, HEADS_PAD)[:, None]) * NG
            + tl.arange(0, NG)[None, :]) * 2
    _store_token_int4(k_ptr + t * stride_kt + h * stride_kh + g * G + j, kc_ptr + dst,
                      kmeta_ptr + meta, mask, G)
    _store_token_int4(v_ptr + t * stride_vt + h * stride_vh + g * G + j, vc_ptr + v_dst,
                      vmeta_ptr + meta, mask, G)


# -- torch references -----------------------------------------------------------------------
def quantize_int4(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 [..., D/2], meta float16 [..., D/G, 2] (layout above)."""
    *lead, d = x.shape
    g = group_size
    codes, s, z = asym_quantize(x.reshape(*lead, d // g, g), -1, 15)
    packed = codes[..., : g // 2] | (codes[..., g // 2:] << 4)
    return packed.reshape(*lead, d // 2), torch.cat([s, z], -1)


def dequantize_int4(codes: torch.Tensor, meta: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes [..., D/2], meta [..., D/G, 2] -> float32 [..., D]."""
    *lead, half = codes.shape
    g = group_size
    c = codes.reshape(*lead, 2 * half // g, g // 2)
    c = torch.cat([c & 15, c >> 4], -1).float()
    x = c * meta[..., 0:1].float() + meta[..., 1:2].float()
    return x.reshape(*lead, 2 * half)


@dataclass(frozen=True)
class Int4Format(KVFormat):
    """4-bit K and V, asymmetric per token, kv head and group of `group_size` channels."""

    name = "int4"
    group_size: int = 128  # channels per (scale, zero); 128 = one group per head of 128

    def check(self, block_size, num_kv_heads, head_dim, dtype) -> None:
        super().check(block_size, num_kv_heads, head_dim, dtype)
        if self.group_size not in INT4_GROUP_SIZES or head_dim % self.group_size:
            raise ValueError(f"int4 group_size={self.group_size}: must be one of "
                             f"{INT4_GROUP_SIZES} and divide head_dim={head_dim}")

    def part_specs(self, block_size, num_kv_heads, head_dim, dtype):
        meta = (block_size, num_kv_heads, head_dim // self.group_size, 2)
        return {"k": ((block_size, num_kv_heads, head_dim // 2), torch.uint8),
                "k_meta": (meta, torch.float16),
                "v": ((num_kv_heads, head_dim // 2, block_size), torch.uint8),
                "v_meta": (meta, torch.float16)}

    def bytes_per_token(self, num_kv_heads, head_dim) -> float:
        return num_kv_heads * (head_dim + 8 * head_dim / self.group_size)

    def write_triton(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        p = cache.parts
        h = cache.num_kv_heads
        _write_int4_kernel[(k.shape[0],)](
            k, v, slot_mapping, p["k"], p["v"], p["k_meta"], p["v_meta"],
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            NUM_HEADS=h, HEADS_PAD=triton.next_power_of_2(h), HEAD_DIM=cache.head_dim,
            BLOCK_SIZE=cache.block_size, G=self.group_size, num_warps=4)

    def write_reference(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        h, d, ng = cache.num_kv_heads, cache.head_dim, cache.head_dim // self.group_size
        p, bs = cache.parts, cache.block_size
        k_codes, k_meta = quantize_int4(k[keep], self.group_size)
        v_codes, v_meta = quantize_int4(v[keep], self.group_size)
        p["k"].view(-1, h, d // 2)[slots] = k_codes
        p["v"][slots // bs, :, :, slots % bs] = v_codes  # token-major
        p["k_meta"].view(-1, h, ng, 2)[slots] = k_meta
        p["v_meta"].view(-1, h, ng, 2)[slots] = v_meta

    def dequantize_blocks(self, cache, block_ids):
        p, g = cache.parts, self.group_size
        v_codes = p["v"][block_ids].permute(0, 3, 1, 2)  # token-major -> [n, B, H, D/2]
        return (dequantize_int4(p["k"][block_ids], p["k_meta"][block_ids], g),
                dequantize_int4(v_codes, p["v_meta"][block_ids], g))
