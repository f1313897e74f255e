"""RMS normalisation fused with the residual add, in Hugging Face Llama's order of operations.

Operation, for each row of T:
    s = x + residual            (in x's dtype: an fp32 sum rounded once, as torch adds two bf16 tensors)
    h = s.float()
    h = h * rsqrt(mean(h^2) + eps)
    out = weight * h.to(x.dtype)   (the product rounded once to the promoted dtype, as torch does)
and residual_out = s; without a residual, s = x and residual_out is x itself (no copy).

Shapes: x, residual: [T, H] (any strides); weight: [H]. Returns (out [T, H], residual_out [T, H]).
Dtypes: x and residual bf16, fp16 or fp32, one dtype; weight any of those; out has
torch.promote_types(weight.dtype, x.dtype), as `weight * h.to(x.dtype)` would. Limits: 1 <= H <= 65536.

One launch: one program per row holds the row in registers, so x and residual are read once and out
and residual_out written once. On sm_90+ it is launched with programmatic dependent launch (see
partita.kernels.linear): it reads the norm weight, then waits for the previous kernel. Compiled without
multiply-add fusion so its roundings are torch's. The sum of squares is reduced in another order than
torch's mean and rsqrt is computed as 1/sqrt, so h.to(x.dtype) may differ from the reference's by one
rounding step; after the weight product and its own rounding, out may then differ by about two steps
of its dtype (on an H200, bf16, H = 4096 and 1000: bit-identical; residual_out always is).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from partita.kernels.linear import pdl_default

MAX_H = 65536
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,  # x, residual, res_out [T, H]; weight [H]; out [T, H]
    H, eps,  # row length; epsilon added to the mean square
    stride_xt, stride_xh, stride_rt, stride_rh, stride_ot, stride_oh, stride_st, stride_sh,  # strides
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,  # BLOCK_H: power of two >= H
    USE_PDL: tl.constexpr,  # programmatic dependent launch (see partita.kernels.linear)
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its weights
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)  # no earlier kernel writes the weight
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # x and residual come from the previous kernel
    x = tl.load(x_ptr + row * stride_xt + offs * stride_xh, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rt + offs * stride_rh, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_st + offs * stride_sh, s, mask=mask)
    else:
        s = x
    h = s.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / H
    h = h * (1.0 / tl.sqrt(mean_sq + eps))
    out = w.to(tl.float32) * h.to(x.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + offs * stride_oh, out.to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got shape {tuple(x.shape)}")
    T, H = x.shape
    if tuple(weight.shape) != (H,):
        raise ValueError(f"weight must be [H={H}]; got {tuple(weight.shape)}")
    if not 1 <= H <= MAX_H:
        raise ValueError(f"H={H} is outside 1..{MAX_H}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x.dtype={x.dtype} and weight.dtype={weight.dtype} must be in {_DTYPES}")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}); got "
                             f"{tuple(residual.shape)}, {residual.dtype}")
        if residual.device != x.device:
            raise ValueError("residual must be on x's device")
    if weight.device != x.device:
        raise ValueError("weight must be on x's device")
    if x.device.type != "cuda" and type(_rms_norm_kernel).__name__ != "InterpretedFunction":
        raise ValueError(f"rms_norm needs CUDA tensors (or TRITON_INTERPRET=1); got {x.device}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H], residual_out [T, H]) as in the module docstring; one launch, no host sync.

    pdl: programmatic dependent launch (None: on for CUDA sm_90+), as in partita.kernels.linear.
    """
    _check(x, weight, residual)
    pdl = pdl_default(x.device) if pdl is None else pdl
    T, H = x.shape
    out = torch.empty((T, H), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = x if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return out, res_out
    r = residual if residual is not None else x  # never read when HAS_RESIDUAL is False
    block_h = triton.next_power_of_2(H)
    num_warps = min(max(block_h // 512, 1), 16)
    _rms_norm_kernel[(T,)](
        x, r, weight, out, res_out, H, float(eps),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1),
        res_out.stride(0), res_out.stride(1),
        HAS_RESIDUAL=residual is not None, BLOCK_H=block_h, USE_PDL=pdl, num_warps=num_warps,
        enable_fp_fusion=False, **({"launch_pdl": True} if pdl else {}))  # keep torch's separate roundings
    return out, res_out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, in Hugging Face LlamaRMSNorm's order of operations (the residual added first)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x
