"""The elementwise and matrix operations a decoder layer needs, as one swappable table.

`torch_ops()` is plain PyTorch and runs anywhere; on CUDA `select_ops` substitutes the Triton kernels of
`partita.kernels` where they exist. The model takes an `Ops` in its constructor, so the choice is made once,
outside the model code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds `residual` (if given) and normalises, in the order of operations of HF Llama's RMSNorm.

    x, residual: [T, H]; weight: [H]. Returns (normalised [T, H], the new residual stream [T, H]).
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] with the gate in the first half -> silu(gate) * up: [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotates q [T, Hq, D] and k [T, Hkv, D] in place (HF's rotate_half convention).

    cos_sin: [max_pos, D] float32, cos in the first half, sin in the second; cast to q's dtype before use, as
    Hugging Face does.
    """
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        r1 = x1 * cos - x2 * sin
        r2 = x2 * cos + x1 * sin
        x.copy_(torch.cat((r1, r2), dim=-1))


def linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def grouped_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor) -> torch.Tensor:
    """Mixture-of-experts FFN over the routed experts only.

    x: [T, H]; w13: [E, 2I, H] (gate rows then up rows); w2: [E, H, I]; topk_weights: [T, K] float32;
    topk_ids: [T, K] physical expert ids. Returns [T, H] in x's dtype, summed over the K experts of a token.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        tokens = pairs // topk_ids.shape[1]
        h = silu_and_mul_torch(F.linear(x[tokens], w13[expert]))
        y = F.linear(h, w2[expert]).float() * topk_weights.reshape(-1)[pairs, None]
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)


@dataclass(frozen=True)
class Ops:
    """One implementation of each operation; every field has the signature of its `*_torch` function."""

    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    apply_rotary: Callable[..., None]
    linear: Callable[..., torch.Tensor]
    grouped_experts: Callable[..., torch.Tensor]


def torch_ops() -> Ops:
    return Ops("torch", rms_norm_torch, silu_and_mul_torch, apply_rotary_torch, linear_torch, grouped_experts_torch)


def cuda_ops() -> Ops:
    """The Triton kernels of `partita.kernels` for fp16/bf16 tensors, torch for float32 (which they skip).

    Linear layers take `small_m_linear` for decode-sized inputs (M <= 16, where it beats cuBLAS) with the
    config `ModelRunner` tuned ahead of time (never timed mid-run, when the KV cache holds the memory), and
    cuBLAS otherwise.
    """
    from partita.kernels.activation import silu_and_mul
    from partita.kernels.fused_moe import fused_moe
    from partita.kernels.linear import cached_config, small_m_linear, use_small_m_linear
    from partita.kernels.rmsnorm import rms_norm
    from partita.kernels.rotary import apply_rotary

    half = (torch.float16, torch.bfloat16)

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and x.dtype in half and weight.dtype == x.dtype and x.shape[0] > 0 and \
                use_small_m_linear(x.shape[0], weight.shape[0], x.shape[1]):
            config = cached_config(x.shape[0], weight.shape[0], x.shape[1], x.dtype, x.device)
            return small_m_linear(x, weight, bias, config=config)
        return F.linear(x, weight, bias)

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype in half and weight.dtype == x.dtype:
            return rms_norm(x, weight, eps, residual)
        return rms_norm_torch(x, weight, eps, residual)

    def act(x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x) if x.dtype in half else silu_and_mul_torch(x)

    def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
        (apply_rotary if q.dtype in half else apply_rotary_torch)(q, k, positions, cos_sin)

    return Ops("triton", norm, act, rotary, linear, fused_moe)


def select_ops(device: torch.device) -> Ops:
    """Triton kernels on CUDA, plain PyTorch elsewhere."""
    return cuda_ops() if device.type == "cuda" else torch_ops()
