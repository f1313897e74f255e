"""One decoder-only transformer for every supported family (Llama, Mistral, Qwen2/3, Mixtral, Qwen2/3-MoE).

Families differ by switches of `ModelConfig` (qkv bias, q/k norm, sliding window, MoE layers and routing).
Each layer's attention half and FFN half are callable apart, so that attention and FFN can later run on
different workers; the residual stream is threaded explicitly as (hidden, residual).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from partita.workers.attention.backend import AttentionBackend, AttentionMetadata
from partita.workers.config import ModelConfig
from partita.workers.models.layers import Embedding, Linear, RMSNorm, Shard, rope_cos_sin
from partita.workers.models.moe import DenseMLP, MoEBlock
from partita.workers.models.ops import Ops


@dataclass
class ForwardBatch:
    """The batch description every step function takes.

    token_ids, positions: [T]; attn: paging metadata; token_mask: [T] int, 1 for real tokens and 0 for the
    padding of a CUDA-graph batch (None when there is no padding).
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    token_mask: torch.Tensor | None = None


class Rotary(nn.Module):
    """Holds the rotary table cos_sin: [max_position_embeddings, head_dim] float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("cos_sin", rope_cos_sin(config.head_dim, config.max_position_embeddings,
                                                     config.rope_theta, config.rope_scaling), persistent=False)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend: AttentionBackend, rotary: "Rotary", *,
                 ops: Ops, shard: Shard, dtype: torch.dtype):
        super().__init__()
        self.layer, self.backend, self.ops = layer, backend, ops
        self.num_heads = shard.split(config.num_heads, "num_attention_heads")
        self.num_kv_heads = shard.split(config.num_kv_heads, "num_key_value_heads")
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.sliding_window = config.sliding_window
        self.rotary = rotary  # one module shared by every layer
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, ops=ops, shard=shard,
                               bias=config.qkv_bias, output_sizes=(q_size, kv_size, kv_size),
                               shard_names=("q", "k", "v"), dtype=dtype)
        self.o_proj = Linear(q_size, config.hidden_size, ops=ops, shard=shard, row=True, dtype=dtype)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops=ops, dtype=dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, ops=ops, dtype=dtype)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        T = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        self.ops.apply_rotary(q, k, batch.positions, self.rotary.cos_sin)
        out = self.backend.forward(self.layer, q, k, v, batch.attn, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(T, q_size))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend: AttentionBackend, rotary: "Rotary", *,
                 ops: Ops, shard: Shard, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops=ops, dtype=dtype)
        self.self_attn = Attention(config, layer, backend, rotary, ops=ops, shard=shard, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops=ops, dtype=dtype)
        if layer in config.moe_layers:
            self.mlp: nn.Module = MoEBlock(config, ops=ops, shard=shard, dtype=dtype)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, ops=ops, shard=shard, dtype=dtype)

    def attention_half(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                       batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """norm -> q/k/v -> attention over the paged cache -> output projection. Returns (out, residual)."""
        hidden, residual = self.input_layernorm(hidden, residual)
        return self.self_attn(hidden, batch), residual

    def ffn_half(self, hidden: torch.Tensor, residual: torch.Tensor,
                 batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """residual add -> norm -> dense FFN or MoE. Returns (out, residual)."""
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, batch.token_mask), residual


class DecoderModel(nn.Module):
    """Token ids in, final hidden states out; `compute_logits` applies the LM head to chosen rows."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend, *, ops: Ops, shard: Shard = Shard(),
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        rotary = Rotary(config)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, rotary, ops=ops, shard=shard, dtype=dtype)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops=ops, dtype=dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, ops=ops, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """layer_hook(i), when given, runs right after layer i's attention wrote its KV (layer-by-layer KV
        export while later layers compute); steps without it, CUDA-graph decodes included, never pass one."""
        hidden, residual = self.embed_tokens(batch.token_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer.attention_half(hidden, residual, batch)
            if layer_hook is not None:
                layer_hook(i)
            hidden, residual = layer.ffn_half(hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> float32 logits [N, vocab_size]."""
        return self.lm_head(hidden).float()

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]
