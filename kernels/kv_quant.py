"""Asymmetric integer quantization shared by the int8, int4 and kivi2 KV formats.

    scale = (max - min) / levels   (1 when max == min; never below 2**-24), stored as float16
    zero  = min, stored as float16
    code  = clamp(floor((x - zero) / scale + 0.5), 0, levels)      x ~= code * scale + zero

Codes are computed from the float16-rounded scale and zero (the values that are stored), so the
reconstruction error stays within scale / 2 plus the float16 rounding of zero. The Triton helpers
and the torch reference perform the same float32 operations in the same order; on the CPU
interpreter they agree bit for bit, on GPUs a code may differ by one where x sits on a rounding
boundary.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_SCALE = 2.0 ** -24  # smallest positive float16 subnormal: a stored scale is never zero


@triton.jit
def asym_params(mn, mx, LEVELS: tl.constexpr):
    """float16 (scale, zero) from float32 min and max (any shape)."""
    rng = mx - mn
    s16 = tl.maximum(tl.where(rng > 0, rng / LEVELS, 1.0), 5.960464477539063e-08).to(tl.float16)
    return s16, mn.to(tl.float16)


@triton.jit
def asym_codes(x, s16, z16, LEVELS: tl.constexpr):
    """uint8 codes of float32 x given broadcastable float16 scale and zero."""
    c = tl.floor((x - z16.to(tl.float32)) / s16.to(tl.float32) + 0.5)
    return tl.clamp(c, 0.0, LEVELS).to(tl.uint8)


def asym_quantize(x: torch.Tensor, dim: int,
                  levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes uint8 (shape of x) and float16 scale, zero (x's shape with `dim` kept as 1)."""
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    rng = xf.amax(dim, keepdim=True) - mn
    s = torch.where(rng > 0, rng / levels, torch.ones_like(rng)).clamp_min(MIN_SCALE).half()
    z = mn.half()
    c = torch.floor((xf - z.float()) / s.float() + 0.5).clamp(0, levels)
    return c.to(torch.uint8), s, z
