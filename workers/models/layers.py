"""Building blocks of a decoder layer whose weights arrive through shard-aware loaders.

Each parameter carries a `weight_loader(param, loaded, shard_id)` that copies its slice of a checkpoint
tensor, so that tensor parallelism (column / row sharding) is a constructor argument, not a second model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from partita.workers.errors import ModelLoadError
from partita.workers.models.ops import Ops


@dataclass(frozen=True)
class Shard:
    """This worker's place in a tensor-parallel group: rank `rank` of `size`."""

    rank: int = 0
    size: int = 1

    def split(self, n: int, what: str) -> int:
        if n % self.size:
            raise ModelLoadError(f"{what} ({n}) is not divisible by the tensor-parallel size {self.size}")
        return n // self.size


def _check_copy(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ModelLoadError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match "
                             f"the model's {tuple(param.shape)}")
    param.copy_(loaded)


def default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    _check_copy(param.data, loaded, getattr(param, "hf_name", "?"))


class Linear(nn.Module):
    """y = x W^T + b with W: [out_features / tp, in_features] (column-parallel) or
    [out_features, in_features / tp] (row-parallel, `row=True`; the caller reduces the partial sums).

    `output_sizes` merges several checkpoint matrices into one (fused qkv or gate_up): shard_id picks the
    slice, either an index into output_sizes or a name from `shard_names`.
    """

    def __init__(self, in_features: int, out_features: int, *, ops: Ops, bias: bool = False, row: bool = False,
                 shard: Shard = Shard(), output_sizes: tuple[int, ...] | None = None,
                 shard_names: tuple[str, ...] | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.ops = ops
        self.row = row
        self.shard = shard
        self.output_sizes = output_sizes or (out_features,)
        self.shard_names = shard_names
        local_in = shard.split(in_features, "in_features") if row else in_features
        local_out = out_features if row else sum(shard.split(s, "output size") for s in self.output_sizes)
        self.weight = nn.Parameter(torch.empty(local_out, local_in, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self._load
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        name = getattr(param, "hf_name", "?")
        if self.row:
            if loaded.dim() == 2:
                loaded = loaded.chunk(self.shard.size, dim=1)[self.shard.rank]
            _check_copy(param.data, loaded, name)
            return
        index = 0 if shard_id is None else (self.shard_names.index(shard_id) if isinstance(shard_id, str)
                                             else shard_id)
        sizes = [s // self.shard.size for s in self.output_sizes]
        offset = sum(sizes[:index])
        target = param.data.narrow(0, offset, sizes[index])
        _check_copy(target, loaded.chunk(self.shard.size, dim=0)[self.shard.rank], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension, optionally fused with the residual add."""

    def __init__(self, size: int, eps: float, *, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        out, res = self.ops.rms_norm(x.reshape(-1, shape[-1]), self.weight, self.eps,
                                     None if residual is None else residual.reshape(-1, shape[-1]))
        return out.view(shape), res.view(shape)


class Embedding(nn.Module):
    """Token embedding table: weight [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_loader

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(token_ids, self.weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] float32, with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos of position x inverse frequency, then sin."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)
