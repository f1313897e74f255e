"""KV formats with one code per element: `none` (model dtype), `fp8` (e4m3) and `int8`.

All three keep the engine's token-major page layout, per block (B = block_size, H = num_kv_heads,
D = head_dim):

    none:  k, v       [B, H, D] model dtype (bf16/fp16), exactly the engine's unquantized cache
    fp8:   k, v       [B, H, D] uint8 holding float8_e4m3fn bits; x ~= e4m3(code) * scale[head]
           state["scales"] [2, H] float32 (row 0 keys, row 1 values): per-layer, per-kv-head
           scales, fixed before the first write (`FP8Format.calibrate` or a checkpoint);
           values beyond 448 * scale saturate.
    int8:  k, v       [B, H, D] uint8 codes, asymmetric per token and head:
           k_meta, v_meta [B, H, 2] float16 (scale, zero); x ~= code * scale + zero,
           zero = min over the head's D channels, scale = (max - min) / 255.

Quantize-on-write runs one Triton program per new token over all its heads
(`_write_dense_kernel`); the torch reference does the same arithmetic in the same order, so on
CPU (interpreter) the codes agree exactly. Bytes per token and kv head (K+V): none 4D,
fp8 2D, int8 2D + 8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from partita.kernels.kv_base import KVFormat, PagedKVCache
from partita.kernels.kv_quant import MIN_SCALE, asym_codes, asym_params, asym_quantize

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FORMAT_ID = {"none": 0, "fp8": 1, "int8": 2}


@triton.jit
def _round_to_e4m3(y):
    # Round float32 y (|y| <= 448) to the e4m3 grid, ties to even, by adding and subtracting
    # 1.5 * 2**(q + 23), q = log2 of the e4m3 quantum at y; the final cast is then exact. Done by
    # hand because Triton's interpreter rounds float8 casts wrongly at binade edges.
    bits = tl.abs(y).to(tl.int32, bitcast=True)
    q = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
    magic = (((q + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(y) + magic) - magic
    return tl.where(y < 0, -r, r)


@triton.jit
def _store_token_dense(src, dst, meta_ptr, scale_ptr, hv, mask, NUM_HEADS: tl.constexpr,
                       FORMAT: tl.constexpr):
    # src/dst: [HEADS_PAD, D] pointers of one token; hv: [HEADS_PAD] head index
    x = tl.load(src, mask=mask, other=0.0)
    if FORMAT == 0:
        tl.store(dst, x, mask=mask)
    elif FORMAT == 1:
        s = tl.load(scale_ptr + hv, mask=hv < NUM_HEADS, other=1.0)
        y = _round_to_e4m3(tl.clamp(x.to(tl.float32) / s[:, None], -448.0, 448.0))
        tl.store(dst, y.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=mask)
    else:
        xf = x.to(tl.float32)
        s16, z16 = asym_params(tl.min(xf, 1), tl.max(xf, 1), 255.0)
        tl.store(dst, asym_codes(xf, s16[:, None], z16[:, None], 255.0), mask=mask)
        tl.store(meta_ptr + hv * 2, s16, mask=hv < NUM_HEADS)
        tl.store(meta_ptr + hv * 2 + 1, z16, mask=hv < NUM_HEADS)


@triton.jit
def _write_dense_kernel(
    # new tokens [T, H, D] and their slots [T]
    k_ptr, v_ptr, slot_ptr,
    # cache: data [num_blocks, B, H, D]; int8 meta [num_blocks, B, H, 2]; fp8 scales [2, H]
    kc_ptr, vc_ptr, kmeta_ptr, vmeta_ptr, scales_ptr,
    # strides, in elements
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    # shapes and format
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FORMAT: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    hv = tl.arange(0, HEADS_PAD)
    h = hv[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    meta_off = (slot * NUM_HEADS) * 2
    _store_token_dense(k_ptr + t * stride_kt + h * stride_kh + d,
                       kc_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d,
                       kmeta_ptr + meta_off, scales_ptr, hv, mask, NUM_HEADS, FORMAT)
    _store_token_dense(v_ptr + t * stride_vt + h * stride_vh + d,
                       vc_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
                       vmeta_ptr + meta_off, scales_ptr + NUM_HEADS, hv, mask, NUM_HEADS, FORMAT)


# -- torch references -----------------------------------------------------------------------
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> codes uint8 [..., D], meta float16 [..., 2] = (scale, zero)."""
    codes, s, z = asym_quantize(x, -1, 255)
    return codes, torch.cat([s, z], -1)


def dequantize_int8(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return codes.float() * meta[..., 0:1].float() + meta[..., 1:2].float()


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., H, D], scale [H] -> e4m3 bits uint8 [..., H, D]."""
    y = (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn).float() * scale[:, None]


# -- formats --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _DenseFormat(KVFormat):
    """Shared write path of none/fp8/int8 (token-major pages, one code per element)."""

    def write_triton(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        kc, vc = cache.parts["k"], cache.parts["v"]
        kmeta = cache.parts.get("k_meta", kc)  # unused pointers when the format has no meta
        vmeta = cache.parts.get("v_meta", vc)
        scales = cache.state.get("scales", kc)
        h = cache.num_kv_heads
        _write_dense_kernel[(k.shape[0],)](
            k, v, slot_mapping, kc, vc, kmeta, vmeta, scales,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
            NUM_HEADS=h, HEADS_PAD=triton.next_power_of_2(h), HEAD_DIM=cache.head_dim,
            BLOCK_SIZE=cache.block_size, FORMAT=_FORMAT_ID[self.name], num_warps=4)

    def write_reference(self, cache: PagedKVCache, k, v, slot_mapping, seq_slots) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        for name, x in (("k", k[keep]), ("v", v[keep])):
            part = cache.parts[name]
            flat = part.view(-1, cache.num_kv_heads, cache.head_dim)
            flat[slots] = self._encode(cache, name, x, slots)

    def _encode(self, cache: PagedKVCache, name: str, x: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class NoneFormat(_DenseFormat):
    """Unquantized K/V in the model dtype (`kv_format="none"`, alias bf16/fp16)."""

    name = "none"

    def part_specs(self, block_size, num_kv_heads, head_dim, dtype):
        shape = (block_size, num_kv_heads, head_dim)
        return {"k": (shape, dtype), "v": (shape, dtype)}

    def dequantize_blocks(self, cache, block_ids):
        return cache.parts["k"][block_ids].float(), cache.parts["v"][block_ids].float()


@dataclass(frozen=True)
class FP8Format(_DenseFormat):
    """float8 e4m3 codes with a per-layer scale per kv head (keys and values apart)."""

    name = "fp8"
    scale: float = 1.0  # initial scale of every head until `calibrate` or a checkpoint sets them

    def part_specs(self, block_size, num_kv_heads, head_dim, dtype):
        shape = (block_size, num_kv_heads, head_dim)
        return {"k": (shape, torch.uint8), "v": (shape, torch.uint8)}

    def init_state(self, cache, max_num_seqs):
        return {"scales": torch.full((2, cache.num_kv_heads), self.scale, dtype=torch.float32,
                                     device=cache.device)}

    def calibrate(self, cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor,
                  headroom: float = 1.25) -> None:
        """Set the per-head scales from sample K/V [T, H, D] (before the first write)."""
        for row, x in enumerate((k, v)):
            amax = x.float().abs().amax(dim=(0, 2))
            cache.state["scales"][row] = (amax * headroom / FP8_MAX).clamp_min(MIN_SCALE)

    def _encode(self, cache, name, x, slots):
        return quantize_fp8(x, cache.state["scales"][0 if name == "k" else 1])

    def dequantize_blocks(self, cache, block_ids):
        s = cache.state["scales"]
        return (dequantize_fp8(cache.parts["k"][block_ids], s[0]),
                dequantize_fp8(cache.parts["v"][block_ids], s[1]))


@dataclass(frozen=True)
class Int8Format(_DenseFormat):
    """uint8 codes, asymmetric per token and kv head (fp16 scale and zero)."""

    name = "int8"

    def part_specs(self, block_size, num_kv_heads, head_dim, dtype):
        shape = (block_size, num_kv_heads, head_dim)
        meta = (block_size, num_kv_heads, 2)
        return {"k": (shape, torch.uint8), "k_meta": (meta, torch.float16),
                "v": (shape, torch.uint8), "v_meta": (meta, torch.float16)}

    def write_reference(self, cache, k, v, slot_mapping, seq_slots) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        h, d = cache.num_kv_heads, cache.head_dim
        for name, x in (("k", k[keep]), ("v", v[keep])):
            codes, meta = quantize_int8(x)
            cache.parts[name].view(-1, h, d)[slots] = codes
            cache.parts[name + "_meta"].view(-1, h, 2)[slots] = meta

    def dequantize_blocks(self, cache, block_ids):
        p = cache.parts
        return (dequantize_int8(p["k"][block_ids], p["k_meta"][block_ids]),
                dequantize_int8(p["v"][block_ids], p["v_meta"][block_ids]))
