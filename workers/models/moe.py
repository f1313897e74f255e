"""The mixture-of-experts FFN through one expert-dispatch seam.

router top-k -> logical-to-physical expert map -> grouped expert compute -> combine. Expert rebalancing
changes `log2phy` and the physical weights, never this code; activation counts per logical expert are
accumulated here (`expert_counts`), masked to the batch's real tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from partita.workers.config import ModelConfig
from partita.workers.models.layers import Linear, Shard
from partita.workers.models.ops import Ops


class ExpertWeights(nn.Module):
    """Physical expert slots. w13: [num_slots, 2 * I, H] (gate rows, then up rows); w2: [num_slots, H, I]."""

    def __init__(self, num_slots: int, hidden: int, inter: int, dtype: torch.dtype):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Parameter(torch.empty(num_slots, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_slots, hidden, inter, dtype=dtype), requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int]) -> None:
        slot, half = shard_id
        _copy(param.data[slot, half * self.inter:(half + 1) * self.inter], loaded, param)

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        _copy(param.data[shard_id], loaded, param)


def _copy(target: torch.Tensor, loaded: torch.Tensor, param: nn.Parameter) -> None:
    from partita.workers.models.layers import _check_copy
    _check_copy(target, loaded, getattr(param, "hf_name", "?"))


class DenseMLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)) with gate and up fused into one matrix."""

    def __init__(self, hidden: int, inter: int, *, ops: Ops, shard: Shard, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(hidden, 2 * inter, ops=ops, shard=shard, output_sizes=(inter, inter),
                                   dtype=dtype)
        self.down_proj = Linear(inter, hidden, ops=ops, shard=shard, row=True, dtype=dtype)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class MoEBlock(nn.Module):
    """Routed experts (plus Qwen2-MoE's gated shared expert) for the tokens x: [T, H]."""

    def __init__(self, config: ModelConfig, *, ops: Ops, shard: Shard, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, ops=ops, dtype=dtype)
        self.experts = ExpertWeights(config.num_experts, config.hidden_size, config.moe_intermediate_size, dtype)
        self.register_buffer("log2phy", torch.arange(config.num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("expert_counts", torch.zeros(config.num_experts, dtype=torch.int64), persistent=False)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_expert_intermediate_size, ops=ops,
                                          shard=shard, dtype=dtype)
            self.shared_expert_gate = Linear(config.hidden_size, 1, ops=ops, dtype=dtype)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights [T, K] float32, logical expert ids [T, K])."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # Hugging Face rounds the routing weights to the activation dtype before combining.
        return weights.to(x.dtype).float(), ids

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        weights, ids = self.route(x)
        counted = torch.ones_like(ids) if token_mask is None else token_mask[:, None].expand_as(ids).long()
        self.expert_counts.index_add_(0, ids.reshape(-1), counted.reshape(-1))
        out = self.ops.grouped_experts(x, self.experts.w13, self.experts.w2, weights, self.log2phy[ids])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
