"""Hands out fixed-size KV-cache blocks to sequences.

Each action has a side-effect-free check beside it (`can_allocate` / `allocate`), so that the scheduler
decides first and acts second. Blocks carry reference counts, so that a later prefix cache can share them.

A sequence that holds blocks also holds a *sequence slot* (`seq.kv_slot`, in [0, num_seq_slots)): KV formats
with per-sequence state (kivi2's full-precision residual) index it. Every holder has at least one block, so
`num_seq_slots` defaults to the block count; the engine passes max_num_seqs.
"""
from __future__ import annotations

from collections import deque

from partita.workers.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, num_seq_slots: int | None = None):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"BlockManager needs positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.free_seq_slots: deque[int] = deque(range(num_seq_slots or num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grows seq.block_table to cover `num_tokens` tokens. Call only after can_allocate."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"allocate: {needed} blocks needed, {self.num_free_blocks} free")
        if needed and seq.kv_slot < 0:
            if not self.free_seq_slots:
                raise RuntimeError("allocate: no free sequence slot (more sequences hold blocks than max_num_seqs)")
            seq.kv_slot = self.free_seq_slots.popleft()
        for _ in range(needed):
            block = self.free_blocks.popleft()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def fork(self, block: int) -> int:
        """Adds a reference to a block already in use (prefix sharing)."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"fork of free block {block}")
        self.ref_counts[block] += 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drops seq's references; blocks whose count reaches zero return to the free list."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        seq.block_table.clear()
        if seq.kv_slot >= 0:
            self.free_seq_slots.append(seq.kv_slot)
            seq.kv_slot = -1

    def slot(self, seq: Sequence, position: int) -> int:
        """Cache slot (block * block_size + offset) of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
