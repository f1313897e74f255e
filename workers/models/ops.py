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


def select_ops(device: torch.device) -> Ops:
    """Triton kernels on CUDA where they exist, plain PyTorch elsewhere."""
    if device.type != "cuda":
        return torch_ops()
    ops = torch_ops()
    try:
        from partita.kernels.fused_moe import fused_moe
    except ImportError:
        return ops
    return Ops("triton", ops.rms_norm, ops.silu_and_mul, ops.apply_rotary, ops.linear, fused_moe)
