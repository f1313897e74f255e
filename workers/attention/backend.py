"""The attention seam: what a layer hands to an attention backend, and what a backend must do.

A step's tokens are laid out flat: first the tokens of every prefill (or chunked-prefill) sequence, then one
token per decoding sequence. The backend writes the new keys and values into its paged cache at
`slot_mapping` (slot = block * block_size + offset) and attends each query to its sequence's cached context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class PrefillSeq:
    """One prefill chunk: queries [query_start, query_start + query_len) of the flat batch, attending to the
    first `context_len` cached tokens of its sequence (the chunk's own tokens included)."""

    query_start: int
    query_len: int
    context_len: int
    block_table: torch.Tensor  # [>= num_blocks_of_seq] int32 (a row of prefill_block_tables, zero-padded)


@dataclass
class AttentionMetadata:
    """Where each new token goes and what each query attends to.

    slot_mapping: [num_tokens] int64, -1 for padding tokens (not written).
    prefills: the prefill chunks, covering tokens [0, num_prefill_tokens).
    decode_block_tables: [num_decodes, max_blocks] int32; decode_context_lens: [num_decodes] int32.
    max_decode_context_len: a host-side bound on decode_context_lens (sizes the work, never read from device).

    The same prefills as batched tensors, for kernels that take them in one launch:
    prefill_cu_seqlens [P + 1] int32 (query offsets), prefill_context_lens [P] int32, prefill_block_tables
    [P, max_blocks] int32, max_prefill_query_len (host-side).
    Sequence slots (formats with per-sequence state, such as kivi2's residual): an index in [0, max_num_seqs)
    fixed while a sequence holds blocks; token_seq_slots [num_tokens], prefill_seq_slots [P] and
    decode_seq_slots [num_decodes], all int32.
    """

    slot_mapping: torch.Tensor
    num_prefill_tokens: int
    prefills: list[PrefillSeq]
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    max_decode_context_len: int
    prefill_cu_seqlens: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    max_prefill_query_len: int = 0
    token_seq_slots: torch.Tensor | None = None
    prefill_seq_slots: torch.Tensor | None = None
    decode_seq_slots: torch.Tensor | None = None

    @property
    def num_decodes(self) -> int:
        return int(self.decode_block_tables.shape[0])


class AttentionBackend(Protocol):
    """Owns the paged KV cache of every layer and computes attention over it."""

    name: str

    def allocate(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        """Creates the cache: `num_blocks` blocks of `block_size` tokens per layer."""

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one block takes in one layer (keys and values), to size the cache from a memory budget."""

    def fixed_bytes(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes per layer that do not scale with the block count (per-sequence state)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                scale: float, sliding_window: int | None) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] of the new tokens -> attention output [T, Hq, D]."""

    def compile_decode(self, num_q_heads: int, max_num_seqs: int, max_context_len: int) -> int:
        """Compiles every variant of the decode kernels that batches of up to max_num_seqs sequences of up
        to max_context_len tokens can launch (once the cache is allocated); returns how many launches that
        took (0 where nothing compiles)."""
