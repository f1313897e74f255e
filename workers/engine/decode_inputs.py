"""The static inputs of a captured decode step, filled on the host with numpy and sent up in one copy.

A replay used to build its inputs with some twenty torch calls (tensors from lists, slice assignments, seven
copies); here it fills one pinned buffer through numpy views and makes one copy into the device buffer whose views
the graph reads. On the 2-core development machine, staging 48 sequences into a batch of 64 with 64-block tables
took 0.16 ms instead of 0.57-0.75 ms (CPU tensors, scratch probe). With a thread copying 4 MiB messages in a loop
beside it (as grpcio receiving KV chunks), at a 0.5 ms switch interval: p50 0.27 against 0.98 ms, p90 0.34
against 2.44 ms. On an H100, Llama-3-8B offline decode (benchmarks/offline_throughput.py, arms alternated in one
call): a step of batch 128 took 9.28 ms against 9.54 (-2.7%), of batch 1 5.50 against 5.56 ms.

Layout of both buffers (bytes; every input starts on a 256-byte boundary, so that Triton sees the same pointer
alignment as for any other tensor and compiles no other variant):
    token_ids, positions, slots, mask: [batch] int64 each (slots -1 and mask 0 on padding rows)
    lens, seq_slots: [batch] int32 each (padding rows: one cached token, slot 0)
    tables: [batch, width] int32 (block ids, zero past a sequence's table)
"""
from __future__ import annotations

import math

import torch

from partita.workers.engine.sequence import Sequence

ALIGN = 256
_INPUTS = (("token_ids", torch.int64, False), ("positions", torch.int64, False), ("slots", torch.int64, False),
           ("mask", torch.int64, False), ("lens", torch.int32, False), ("seq_slots", torch.int32, False),
           ("tables", torch.int32, True))
_PADDING = {"token_ids": 0, "positions": 0, "slots": -1, "mask": 0, "lens": 1, "seq_slots": 0}


def input_layout(batch_size: int, width: int) -> tuple[dict[str, tuple[int, torch.dtype, tuple[int, ...]]], int]:
    """name -> (byte offset, dtype, shape) of every input, and the buffer's size in bytes."""
    layout, offset = {}, 0
    for name, dtype, is_table in _INPUTS:
        shape = (batch_size, width) if is_table else (batch_size,)
        layout[name] = (offset, dtype, shape)
        offset += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return layout, offset


def _views(buffer: torch.Tensor, layout: dict) -> dict[str, torch.Tensor]:
    return {name: buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            for name, (offset, dtype, shape) in layout.items()}


class DecodeInputs:
    """The device tensors a captured decode step reads (`device`: name -> tensor, module docstring's layout) and
    their pinned host staging; `stage` fills the host side, `upload` queues the one copy."""

    def __init__(self, batch_size: int, width: int, device: torch.device):
        layout, nbytes = input_layout(batch_size, width)
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self.device = _views(self.buffer, layout)
        self.staged = {name: t.numpy() for name, t in _views(self.host, layout).items()}
        for name, value in _PADDING.items():
            self.staged[name][:] = value
        self.buffer.copy_(self.host)

    def stage(self, decodes: list[Sequence], block_size: int) -> None:
        """Writes the inputs of one decode step for `decodes` (padding rows after them) into the host buffer. The
        caller makes sure the previous upload is done (a step reads its sampled tokens back before the next)."""
        n, h = len(decodes), self.staged
        pos = [s.num_computed_tokens for s in decodes]
        h["token_ids"][:n] = [s.token_ids[p] for s, p in zip(decodes, pos)]
        h["positions"][:n] = pos
        h["slots"][:n] = [s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(decodes, pos)]
        h["mask"][:n] = 1
        h["lens"][:n] = [p + 1 for p in pos]
        h["seq_slots"][:n] = [s.kv_slot for s in decodes]
        for name, value in _PADDING.items():
            h[name][n:] = value
        tables = h["tables"]
        tables[:] = 0
        for row, s in zip(tables, decodes):
            row[:len(s.block_table)] = s.block_table

    def upload(self) -> None:
        """Queues the one host-to-device copy on the current stream."""
        self.buffer.copy_(self.host, non_blocking=self.buffer.is_cuda)
