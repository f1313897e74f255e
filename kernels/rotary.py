"""Rotary position embedding applied in place to q and k, NeoX / Hugging Face "rotate_half" style.

Operation, for each token t at position p = positions[t] and each head of q and of k:
    c = cos_sin[p, :D/2].to(q.dtype),  s = cos_sin[p, D/2:].to(q.dtype)
    x1, x2 = x[..., :D/2], x[..., D/2:]
    x[..., :D/2] = x1 * c - x2 * s
    x[..., D/2:] = x2 * c + x1 * s
This is HF's `q * cos + rotate_half(q) * sin` with cos = cat(c, c), sin = cat(s, s): HF computes cos and
sin in fp32 and casts them to q's dtype before multiplying, and each product and the sum are rounded to
q's dtype, as torch does for two bf16 tensors. The kernel follows those roundings and is compiled
without multiply-add fusion (which would drop one of them), so it matches the reference bit for bit.

Shapes: q [T, Hq, D], k [T, Hkv, D] (any strides: views into a fused qkv output work), positions [T]
int32/int64, cos_sin [max_pos, D] float32. Dtypes: q and k share one of bf16, fp16, fp32. D even,
D <= 1024. positions must lie in [0, max_pos): they are not checked (that would need a host sync).

One launch for q and k together: grid (T, q head blocks + k head blocks). On sm_90+ it is launched with
programmatic dependent launch (see partita.kernels.linear).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from partita.kernels.linear import pdl_default

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 1024


@triton.jit
def _rotate(ptr, t, h0, H, stride_t, stride_h, stride_d, c, s,
            HALF_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
    heads = h0 + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D2)
    mask = (heads[:, None] < H) & (offs_d[None, :] < HALF_D)
    p1 = ptr + t * stride_t + heads[:, None] * stride_h + offs_d[None, :] * stride_d
    p2 = p1 + HALF_D * stride_d
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * s).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s).to(dt).to(tl.float32)
    tl.store(p1, (a1 - b1).to(dt), mask=mask)
    tl.store(p2, (a2 + b2).to(dt), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cs_ptr,  # q [T, Hq, D], k [T, Hkv, D], positions [T], cos_sin [max_pos, D]
    Hq, Hkv,  # head counts
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,  # strides of q and k, in elements
    stride_pos, stride_cp, stride_cd,  # strides of positions and cos_sin
    HALF_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr,  # BLOCK_D2: pow2 >= HALF_D
    USE_PDL: tl.constexpr,  # programmatic dependent launch (see partita.kernels.linear)
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its weights
        tl.extra.cuda.gdc_wait()  # q, k and positions come from earlier kernels
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t * stride_pos).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D2)
    d_in = offs_d < HALF_D
    c = tl.load(cs_ptr + pos * stride_cp + offs_d * stride_cd, mask=d_in, other=0.0)
    s = tl.load(cs_ptr + pos * stride_cp + (offs_d + HALF_D) * stride_cd, mask=d_in, other=0.0)
    c = c.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]  # HF casts cos and sin to q's dtype
    s = s.to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
    num_q_blocks = tl.cdiv(Hq, BLOCK_H)
    if hb < num_q_blocks:
        _rotate(q_ptr, t, hb * BLOCK_H, Hq, stride_qt, stride_qh, stride_qd, c, s, HALF_D, BLOCK_H, BLOCK_D2)
    else:
        _rotate(k_ptr, t, (hb - num_q_blocks) * BLOCK_H, Hkv, stride_kt, stride_kh, stride_kd, c, s,
                HALF_D, BLOCK_H, BLOCK_D2)


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D] and k [T, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} must have q's T={T} and D={D}")
    if D % 2 != 0 or not 2 <= D <= MAX_D:
        raise ValueError(f"head dim D={D} must be even and in 2..{MAX_D}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}")
    if positions.dim() != 1 or positions.shape[0] != T or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be [T={T}] int32/int64; got {tuple(positions.shape)} {positions.dtype}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != D or cos_sin.dtype != torch.float32:
        raise ValueError(f"cos_sin must be [max_pos, D={D}] float32; got {tuple(cos_sin.shape)} {cos_sin.dtype}")
    if any(t.device != q.device for t in (k, positions, cos_sin)):
        raise ValueError("q, k, positions and cos_sin must be on one device")
    if q.device.type != "cuda" and type(_rotary_kernel).__name__ != "InterpretedFunction":
        raise ValueError(f"apply_rotary needs CUDA tensors (or TRITON_INTERPRET=1); got {q.device}")


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, *,
                 pdl: bool | None = None) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place; one launch, no host sync.

    pdl: programmatic dependent launch (None: on for CUDA sm_90+), as in partita.kernels.linear.
    """
    _check(q, k, positions, cos_sin)
    pdl = pdl_default(q.device) if pdl is None else pdl
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if T == 0:
        return
    block_d2 = triton.next_power_of_2(D // 2)
    block_h = max(1, min(triton.next_power_of_2(max(Hq, Hkv)), 4096 // block_d2, 8))
    grid = (T, triton.cdiv(Hq, block_h) + triton.cdiv(Hkv, block_h))
    _rotary_kernel[grid](
        q, k, positions, cos_sin, Hq, Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        positions.stride(0), cos_sin.stride(0), cos_sin.stride(1),
        HALF_D=D // 2, BLOCK_H=block_h, BLOCK_D2=block_d2, USE_PDL=pdl, num_warps=2,
        enable_fp_fusion=False,  # a fused multiply-add would skip a rounding torch does
        **({"launch_pdl": True} if pdl else {}))


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos_sin: torch.Tensor) -> None:
    """Plain torch, in place, in Hugging Face's order: cos/sin cast to q's dtype, then q*cos + rot(q)*sin."""
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        x.copy_(torch.cat((r1, r2), dim=-1))
