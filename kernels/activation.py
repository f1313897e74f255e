"""SwiGLU's elementwise half: silu(gate) * up, from the fused gate_up projection's output.

Operation: x [T, 2I] holds gate = x[:, :I] and up = x[:, I:]; out [T, I] = silu(gate) * up.
Matches Hugging Face Llama's `act_fn(gate_proj(x)) * up_proj(x)` in the input dtype, rounding where
torch does: silu is computed in fp32 (gate / (1 + exp(-gate))) and rounded to x's dtype, then the
product of the two x-dtype tensors is computed in fp32 and rounded once. exp differs from torch's in the
last fp32 bits, so an element can differ from the reference by one rounding step of its dtype.

Dtypes: bf16, fp16, fp32; out has x's dtype. Shapes: T >= 0, I >= 1; x may have any strides.
One launch; grid (T, I / BLOCK). On sm_90+ it is launched with programmatic dependent launch (see
partita.kernels.linear). Compiled without multiply-add fusion so its roundings are torch's: it matches the
reference bit for bit on an H200.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from partita.kernels.linear import pdl_default

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK = 512


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr,  # x [T, 2I], out [T, I]
    I,  # width of one half
    stride_xt, stride_xi, stride_ot, stride_oi,  # strides, in elements
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,  # USE_PDL: programmatic dependent launch
):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start and fetch its weights
        tl.extra.cuda.gdc_wait()  # x comes from the previous kernel
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_xt + offs * stride_xi, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_xt + (offs + I) * stride_xi, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_ot + offs * stride_oi, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, pdl: bool | None = None) -> torch.Tensor:
    """out [T, I] = silu(x[:, :I]) * x[:, I:] for x [T, 2I]; one launch, no host sync.

    pdl: programmatic dependent launch (None: on for CUDA sm_90+), as in partita.kernels.linear.
    """
    if x.dim() != 2 or x.shape[1] % 2 != 0 or x.shape[1] == 0:
        raise ValueError(f"x must be [T, 2I] with I >= 1; got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not one of {_DTYPES}")
    if x.device.type != "cuda" and type(_silu_and_mul_kernel).__name__ != "InterpretedFunction":
        raise ValueError(f"silu_and_mul needs CUDA tensors (or TRITON_INTERPRET=1); got {x.device}")
    pdl = pdl_default(x.device) if pdl is None else pdl
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((T, I), dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    grid = (T, triton.cdiv(I, _BLOCK))
    _silu_and_mul_kernel[grid](x, out, I, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                               BLOCK=_BLOCK, USE_PDL=pdl, num_warps=4,
                               enable_fp_fusion=False,  # keep torch's roundings
                               **({"launch_pdl": True} if pdl else {}))
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch, as Hugging Face Llama's MLP computes it: F.silu(gate) * up in x's dtype."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
