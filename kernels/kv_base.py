"""Paged KV cache: the per-layer container, the format interface, block export/import.

A *KV format* says how one layer's keys and values are stored in pages ("blocks") of `block_size`
tokens, how new tokens are written (quantize-on-write) and how they read back (dequantize). The
engine keeps one `PagedKVCache` per layer, made by `fmt.allocate(...)`, writes each step's new K/V
with `fmt.write(...)`, and attends with `paged_decode_attention` / `paged_prefill_attention`
(`partita.kernels.paged_attention`). Formats are looked up by name in `partita.kernels.kv_formats`.

Contract with the engine (shared by every format):
    slot = block_id * block_size + offset_in_block
    slot_mapping: [num_new_tokens] int64   where each new token's K/V goes; -1 = skip (padding)
    block_tables: [num_seqs, max_blocks_per_seq] int32; trailing entries may hold anything
    context_lens: [num_seqs] int32         tokens in the cache per sequence, new ones included
    seq_slots:    [num_seqs] or [num_new_tokens] int32, only for formats with `needs_seq_slots`
                  (kivi2): an index in [0, max_num_seqs) that stays fixed while a sequence lives;
                  it names the sequence's full-precision residual area.

Storage: `cache.parts` holds the per-block tensors, each `[num_blocks, ...]` and contiguous, so
block b of a layer is the bytes of `part[b]` for every part; `export_blocks` / `import_blocks`
copy blocks as one `[n, bytes_per_block]` uint8 tensor (the prefill->decode transfer).
`cache.state` holds what is per layer rather than per block (fp8 scales, the kivi2 residual).

Limits: head_dim a power of two >= 16; block_size a power of two in 8..128; K/V in fp16/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PagedKVCache:
    """One layer's paged K/V cache in some format (made by `KVFormat.allocate`)."""

    fmt: "KVFormat"  # the format that made it; kernels dispatch on fmt.name
    num_blocks: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # model dtype: queries, outputs and full-precision parts
    parts: dict[str, torch.Tensor]  # per-block tensors, each [num_blocks, ...], contiguous
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-layer tensors

    @property
    def device(self) -> torch.device:
        return next(iter(self.parts.values())).device

    @property
    def bytes_per_block(self) -> int:
        return sum(p[0].numel() * p.element_size() for p in self.parts.values())


def use_triton(impl: str, t: torch.Tensor) -> bool:
    """'auto' runs Triton on CUDA tensors and the torch reference elsewhere."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl={impl!r}; allowed: 'auto', 'triton', 'torch'")
    return impl == "triton" or (impl == "auto" and t.is_cuda)


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class KVFormat:
    """Base of every KV format; subclasses set `name` and implement the abstract methods."""

    name: ClassVar[str] = "?"
    needs_seq_slots: ClassVar[bool] = False  # write/attention need `seq_slots` (kivi2)

    # -- layout ----------------------------------------------------------------------------
    def part_specs(self, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape (without the leading num_blocks) and dtype of each per-block part."""
        raise NotImplementedError

    def block_multiple(self) -> int:
        """block_size must be a multiple of this (kivi2: its residual length)."""
        return 1

    def check(self, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        """Raise ValueError naming the argument when this format cannot store that shape."""
        if not (_is_pow2(block_size) and 8 <= block_size <= 128):
            raise ValueError(f"block_size={block_size}: must be a power of two in 8..128")
        if block_size % self.block_multiple():
            raise ValueError(f"block_size={block_size}: kv_format {self.name!r} needs a multiple "
                             f"of {self.block_multiple()}")
        if not (_is_pow2(head_dim) and head_dim >= 16):
            raise ValueError(f"head_dim={head_dim}: must be a power of two >= 16")
        if num_kv_heads < 1:
            raise ValueError(f"num_kv_heads={num_kv_heads}: must be >= 1")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype={dtype}: allowed {SUPPORTED_DTYPES}")

    def allocate(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, *,
                 max_num_seqs: int = 0) -> PagedKVCache:
        """Zero-filled cache for one layer; `max_num_seqs` sizes per-sequence state (kivi2)."""
        self.check(block_size, num_kv_heads, head_dim, dtype)
        specs = self.part_specs(block_size, num_kv_heads, head_dim, dtype)
        parts = {name: torch.zeros((num_blocks, *shape), dtype=dt, device=device)
                 for name, (shape, dt) in specs.items()}
        cache = PagedKVCache(self, num_blocks, block_size, num_kv_heads, head_dim, dtype, parts)
        cache.state.update(self.init_state(cache, max_num_seqs))
        return cache

    def init_state(self, cache: PagedKVCache, max_num_seqs: int) -> dict[str, torch.Tensor]:
        return {}

    def bytes_per_token(self, num_kv_heads: int, head_dim: int) -> float:
        """Cache bytes per token (K and V, all kv heads), per-block parts only."""
        unit = self.block_multiple()
        specs = self.part_specs(unit, num_kv_heads, head_dim, torch.bfloat16)
        total = sum(torch.Size(s).numel() * torch.empty((), dtype=dt).element_size()
                    for s, dt in specs.values())
        return total / unit

    # -- write -----------------------------------------------------------------------------
    def write(self, cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor,
              slot_mapping: torch.Tensor, seq_slots: torch.Tensor | None = None, *,
              impl: str = "auto") -> None:
        """Store new tokens: k, v [num_new_tokens, num_kv_heads, head_dim] at `slot_mapping`."""
        check_write_inputs(cache, k, v, slot_mapping, seq_slots)
        if use_triton(impl, k):
            self.write_triton(cache, k, v, slot_mapping, seq_slots)
        else:
            self.write_reference(cache, k, v, slot_mapping, seq_slots)

    def write_triton(self, cache, k, v, slot_mapping, seq_slots) -> None:
        raise NotImplementedError

    def write_reference(self, cache, k, v, slot_mapping, seq_slots) -> None:
        raise NotImplementedError

    # -- read back (references) ------------------------------------------------------------
    def dequantize_blocks(self, cache: PagedKVCache,
                          block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of whole blocks: [n, block_size, num_kv_heads, head_dim] float32."""
        raise NotImplementedError

    def gather(self, cache: PagedKVCache, block_ids: torch.Tensor, context_len: int,
               seq_slot: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one sequence's first `context_len` tokens: [context_len, H, D] float32."""
        k, v = self.dequantize_blocks(cache, block_ids)
        h, d = cache.num_kv_heads, cache.head_dim
        return k.reshape(-1, h, d)[:context_len], v.reshape(-1, h, d)[:context_len]


def check_write_inputs(cache: PagedKVCache, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor, seq_slots: torch.Tensor | None) -> None:
    shape = (slot_mapping.shape[0], cache.num_kv_heads, cache.head_dim)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}.shape={tuple(t.shape)}: expected {shape}")
        if t.dtype != cache.dtype:
            raise ValueError(f"{name}.dtype={t.dtype}: the cache holds {cache.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device}, the cache on {cache.device}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError("slot_mapping: expected a 1-D int64 tensor")
    if cache.fmt.needs_seq_slots:
        if seq_slots is None or tuple(seq_slots.shape) != (shape[0],):
            raise ValueError(f"seq_slots: kv_format {cache.fmt.name!r} needs one per new token")


def export_blocks(cache: PagedKVCache, block_ids: torch.Tensor) -> torch.Tensor:
    """Blocks as bytes: [len(block_ids), cache.bytes_per_block] uint8, parts in `parts` order."""
    rows = [p[block_ids].reshape(len(block_ids), -1).view(torch.uint8)
            for p in cache.parts.values()]
    return torch.cat(rows, dim=1)


def import_blocks(cache: PagedKVCache, block_ids: torch.Tensor, data: torch.Tensor) -> None:
    """Inverse of `export_blocks`: write byte rows `data` into blocks `block_ids`."""
    if tuple(data.shape) != (len(block_ids), cache.bytes_per_block) or data.dtype != torch.uint8:
        raise ValueError(f"data: expected uint8 [{len(block_ids)}, {cache.bytes_per_block}]")
    offset = 0
    for p in cache.parts.values():
        nbytes = p[0].numel() * p.element_size()
        chunk = data[:, offset:offset + nbytes].contiguous()
        p[block_ids] = chunk.view(p.dtype).reshape(len(block_ids), *p.shape[1:])
        offset += nbytes
