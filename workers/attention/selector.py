"""Picks the attention backend and KV format of an engine from its `kv_format` argument.

`auto` and `none` (also spelled `bf16`/`fp16`: the model's own dtype) keep the cache unquantized: the Triton
kernels on CUDA in fp16/bf16, the plain torch backend elsewhere (exact in float32 on CPU, and the only one
with sliding-window attention). Quantized formats (`fp8`, `int8`, `int4`, `kivi2`, with options such as
`int4:group_size=64`) always use the KV-format backend, on CPU through the kernels' torch references.
"""
from __future__ import annotations

import dataclasses

import torch

from partita.kernels.kv_base import KVFormat
from partita.kernels.kv_formats import get_kv_format
from partita.workers.attention.kernel_paged import KernelPagedAttention, cache_dtype
from partita.workers.attention.torch_paged import TorchPagedAttention
from partita.workers.config import ModelConfig

UNQUANTIZED = ("auto", "none", "bf16", "fp16")


def parse_kv_format(kv_format: str, head_dim: int) -> KVFormat:
    """The KVFormat named by `kv_format`; ValueError naming the argument when it is not one.

    int4 without a group_size takes groups of min(128, head_dim) channels (a group cannot span heads).
    """
    if not isinstance(kv_format, str):
        raise ValueError(f"kv_format must be a string such as 'auto' or 'int4', got {kv_format!r}")
    spec = "none" if kv_format.strip().lower() in UNQUANTIZED else kv_format
    try:
        fmt = get_kv_format(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"kv_format={kv_format!r}: {e}") from None
    if fmt.name == "int4" and "group_size" not in spec and fmt.group_size > head_dim:
        fmt = dataclasses.replace(fmt, group_size=head_dim)
    return fmt


def make_backend(fmt: KVFormat, config: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int,
                 max_model_len: int, max_num_seqs: int) -> TorchPagedAttention | KernelPagedAttention:
    """The backend for `fmt`; ValueError naming what the format cannot do for this model."""
    windowed = config.sliding_window is not None and config.sliding_window < max_model_len
    if fmt.name == "none":
        kernels_fit = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and not windowed
        if kernels_fit:
            try:
                fmt.check(block_size, config.num_kv_heads, config.head_dim, dtype)
            except ValueError:
                kernels_fit = False
        return KernelPagedAttention(fmt, max_num_seqs) if kernels_fit else TorchPagedAttention()
    if windowed:
        raise ValueError(f"kv_format={fmt.name!r} has no sliding-window attention, and this model's window "
                         f"({config.sliding_window} tokens) is shorter than max_model_len={max_model_len}; "
                         f"use kv_format='none' or max_model_len <= {config.sliding_window}")
    try:
        fmt.check(block_size, config.num_kv_heads, config.head_dim, cache_dtype(dtype))
    except ValueError as e:
        raise ValueError(f"kv_format={fmt.name!r} cannot store this model's cache: {e}") from None
    return KernelPagedAttention(fmt, max_num_seqs)
