"""The decode side of KV migration: writes received payloads (`workers/kv_migration.py`'s wire layout) into a
sequence's blocks and slot state.

A write has two halves. `stage_payloads` checks payloads against the layout and lays them out (with Triton also
fills the pinned upload: a copy table, then the rows); it touches no engine state, only a `CacheTarget` (where
the cache parts are, read once on the engine's thread) and a copy of the sequence's block table, so a receiver
runs it on a worker thread next to the checksums. The block runs' write it returns (`StagedWrite.write_blocks`:
on CUDA one upload and one `kernels/scatter_copy.py` launch) touches only the reserved blocks, so a receiver
runs it on that thread too, on the engine's stream, while the engine steps other sequences; the state rows,
which go through the engine, are written on its thread (`write_states`). `write_staged` does both halves there,
and `import_payloads` everything in one call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from partita.kernels.kv_base import use_triton
from partita.kernels.scatter_copy import scatter_copy, warm_up
from partita.workers.engine.engine import Engine
from partita.workers.engine.sequence import Sequence
from partita.workers.kv_migration import (CacheTarget, KvLayout, Payload, cache_target, device_ids, kv_layout,
                                         layer_state)


def import_payload(engine: Engine, seq: Sequence, num_tokens: int, layer: int, block_index: int, data: bytes,
                   layout: KvLayout | None = None) -> None:
    """Writes one payload (layer, block_index) of the wire layout into seq's blocks (or its slot's state)."""
    import_payloads(engine, seq, num_tokens, [(layer, block_index, data)], layout)


def import_payloads(engine: Engine, seq: Sequence, num_tokens: int, payloads: list[Payload],
                    layout: KvLayout | None = None, impl: str = "auto") -> None:
    """Writes payloads (layer, first block index, data) of the wire layout into seq's blocks (or its slot's
    state): `stage_payloads` then `write_staged`, both here on the engine's thread."""
    layout = layout or kv_layout(engine)
    staged = stage_payloads(cache_target(engine), seq.block_table, num_tokens, payloads, layout, impl)
    write_staged(engine, seq, staged)


def prepare_writes(target: CacheTarget, impl: str = "auto") -> None:
    """Compiles what `write_staged` will launch for this cache (Triton compiles on first use), so that the first
    transfer does not stall; on the engine's thread, before the first transfer."""
    if use_triton(impl, target.rows[0][0]):
        warm_up(target.word, target.device)


@dataclass
class StagedWrite:
    """Payloads checked and laid out for one write (`stage_payloads`), to hand to `write_staged`."""

    num_tokens: int
    layout: KvLayout
    # the block runs' write: on any thread, queued on the current stream, only while the sequence still holds the
    # blocks it was staged for, and before the engine reads them
    write_blocks: Callable[[], None] | None
    states: list[tuple[int, bytes | memoryview]]  # (layer, data) of state payloads, for `write_states`


def stage_payloads(target: CacheTarget, block_table: list[int], num_tokens: int, payloads: list[Payload],
                   layout: KvLayout, impl: str = "auto") -> StagedWrite:
    """Checks payloads (layer, first block index, data) against the wire layout and prepares writing them into
    the blocks `block_table` names (a sequence's table, or a copy of it taken on the engine's thread): all block
    runs at once, since one small copy per block, then one per layer and part, is what made the receiver slow.
    Touches no engine state, so it may run on any thread: with Triton it also fills the pinned upload (a copy
    table, then the rows), which leaves the write one upload and one launch per chunk. data may be any
    bytes-like object (a view of a received message). A wrong size or index raises ValueError. impl: 'auto'
    (the Triton scatter on CUDA, numpy on the CPU), 'triton' (also on the CPU, through Triton's interpreter) or
    'torch' (numpy on the CPU, one indexed copy per layer and part on CUDA)."""
    n, width = layout.num_blocks(num_tokens), layout.bytes_per_block
    if len(block_table) < n:
        raise ValueError(f"the sequence holds {len(block_table)} blocks, {n} expected")
    runs: list[np.ndarray] = []
    block_ids: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (layer, first row, end row) of the runs' rows
    states: list[tuple[int, bytes | memoryview]] = []
    for layer, index, data in payloads:
        if not 0 <= layer < layout.num_layers:
            raise ValueError(f"payload (layer {layer}, block {index}): no such layer of {layout.num_layers}")
        if index == n:
            expected = layout.state_bytes(num_tokens)
            if not expected or len(data) != expected:
                raise ValueError(f"state payload of layer {layer}: {len(data)} bytes, expected {expected}")
            states.append((layer, data))
            continue
        count, rest = divmod(len(data), width)
        if rest or not count or not 0 <= index <= n - count:
            raise ValueError(f"payload (layer {layer}, block {index}): {len(data)} bytes, expected whole blocks of "
                             f"{width} bytes within the {n} blocks")
        runs.append(np.frombuffer(data, dtype=np.uint8).reshape(count, width))
        block_ids.extend(block_table[index:index + count])
        spans.append((layer, len(block_ids) - count, len(block_ids)))
    write_blocks = None
    if runs:
        if int(target.widths.sum()) != width:
            raise ValueError(f"the cache's parts hold {int(target.widths.sum())} bytes per block, the layout {width}")
        if use_triton(impl, target.rows[0][0]):
            write_blocks = _staged_scatter(target, spans, block_ids, runs)
        else:
            write_blocks = lambda: _write_runs(target, spans, block_ids, runs)  # noqa: E731
    return StagedWrite(num_tokens, layout, write_blocks, states)


def write_staged(engine: Engine, seq: Sequence, staged: StagedWrite) -> None:
    """Writes what `stage_payloads` prepared into seq's blocks and slot state; on the engine's thread, and only
    while seq still holds the blocks the staging was given."""
    if staged.write_blocks is not None:
        staged.write_blocks()
    write_states(engine, seq, staged)


def write_states(engine: Engine, seq: Sequence, staged: StagedWrite) -> None:
    """Writes the state payloads `stage_payloads` set aside into seq's slot; on the engine's thread."""
    for layer, data in staged.states:
        _import_state(engine, seq, staged.num_tokens, layer, data, staged.layout)


def _staged_scatter(target: CacheTarget, spans: list[tuple[int, int, int]], block_ids: list[int],
                    runs: list[np.ndarray]) -> Callable[[], None]:
    """One upload and one `scatter_copy` launch for every layer and part the runs touch. The copy table (per row
    and part: the part's block address, where the row's piece starts, its length) is made with numpy and goes up
    with the rows, so the write makes a few torch calls per chunk instead of dozens (most of them give the GIL
    up and wait to take it back from the event loop receiving the next chunk)."""
    widths, word, width, rows = target.widths, target.word, runs[0].shape[1], len(block_ids)
    table = np.empty((rows, len(widths), 3), dtype=np.int64)
    for layer, a, b in spans:
        table[a:b, :, 0] = target.bases[layer]
    table[:, :, 0] += np.asarray(block_ids, dtype=np.int64)[:, None] * widths
    table[:, :, 1] = (np.arange(rows)[:, None] * width + target.starts) // word.itemsize
    table[:, :, 2] = widths // word.itemsize
    device = target.device
    host = torch.empty(table.nbytes + rows * width, dtype=torch.uint8, pin_memory=device.type == "cuda")
    host_bytes = host.numpy()
    host_bytes[:table.nbytes].view(np.int64)[:] = table.reshape(-1)
    np.concatenate(runs, out=host_bytes[table.nbytes:].reshape(rows, width))

    def write() -> None:
        both = host.to(device, non_blocking=True)  # the pinned buffer is reused only once this copy is done
        scatter_copy(both[table.nbytes:].view(word), both[:table.nbytes].view(torch.int64).view(-1, 3),
                     int(widths.max()) // word.itemsize)
    return write


def _write_runs(target: CacheTarget, spans: list[tuple[int, int, int]], block_ids: list[int],
                runs: list[np.ndarray]) -> None:
    """Without Triton: on the CPU through numpy, which copies whole rows straight from the runs (torch's
    index_copy_ on uint8 moves one byte at a time); on CUDA one upload, then one indexed copy per layer and
    part."""
    columns = [(int(s), int(s + w)) for s, w in zip(target.starts, target.widths)]
    if target.device.type == "cpu":
        ids = np.asarray(block_ids)
        for (layer, a, b), run in zip(spans, runs):
            for part, (start, end) in zip(target.rows[layer], columns):
                part.numpy()[ids[a:b]] = run[:, start:end]
        return
    ids = device_ids(block_ids, target.device)
    source = _uploaded(runs, target.device)
    for layer, a, b in spans:
        for part, (start, end) in zip(target.rows[layer], columns):
            part.index_copy_(0, ids[a:b], source[a:b, start:end])


def _uploaded(runs: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """The runs (uint8 arrays of one row width, maybe read-only views of a received message) concatenated into
    a tensor of their own on `device`. On CUDA through pinned memory (torch's caching host allocator, which reuses
    a buffer only once its copy is done): one host copy and a copy queued on the stream, where a copy to make the
    bytes writable and then a pageable copy would wait for the GPU."""
    host = torch.empty((sum(len(r) for r in runs), *runs[0].shape[1:]), dtype=torch.uint8,
                       pin_memory=device.type == "cuda")
    np.concatenate(runs, out=host.numpy())
    return host.to(device, non_blocking=True)


def _import_state(engine: Engine, seq: Sequence, num_tokens: int, layer: int, data: bytes,
                  layout: KvLayout) -> None:
    r = num_tokens % layout.state_period
    res_k, res_v = layer_state(engine, layer)
    half = _uploaded([np.frombuffer(data, dtype=np.uint8)], res_k.device)
    half = half.view(res_k.dtype).reshape(2, r, *res_k.shape[2:])
    res_k[seq.kv_slot, :r] = half[0]
    res_v[seq.kv_slot, :r] = half[1]
