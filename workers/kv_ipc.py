"""Same-GPU KV migration: the decode engine's cache shared over CUDA IPC and written in place by the prefill engine.

When a prefill and a decode worker share one GPU (semi-PD, `gpus_per_worker: 0.5`), sending the KV through gRPC
moves every byte GPU -> host -> socket -> host -> GPU at a fraction of a GB/s, though both caches sit in the same
device memory. Here instead the decode engine shares its cache tensors (`share_cache`, CUDA IPC handles in the
`CudaIpcTensor` messages of kv_transfer.proto), the prefill engine maps them once (`open_cache`), and a migration
is one device-to-device gather/scatter per layer and part into the blocks (and the sequence slot) that the decode
side reserved, either after the prefill (`copy_in_place`) or layer by layer inside the forward pass of the step
that completes it (`stream_in_place`, the in-place counterpart of `kv_migration.stream_layers`), followed by a wait
for the copies, so the bytes are in place before the sender commits. The reservation, the commit and every refusal
stay on the gRPC service (cluster/kv_transfer_server.py).

Tensors, per layer, in the order `cache_tensors` lists them (both sides' layouts must be equal: `kv_layout`):
    block-indexed parts, each viewed [num_blocks, bytes per block] uint8 (the format's parts, in part order; the
    torch backend's keys then values), then the per-sequence state tensors [max_num_seqs, ...] if any (kivi2's
    residual keys then values).
The handles are torch.multiprocessing's (the producer keeps each allocation alive while it is mapped); they are
carried field by field in protobuf, never pickled. Every function here runs on its engine's thread (`InPlaceStream.wait`
on any thread).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from partita.protos.partita.v1 import kv_transfer_pb2 as pb
from partita.workers.engine.engine import Engine
from partita.workers.engine.sequence import Sequence
from partita.workers.kv_migration import (KvLayout, RequestRows, device_ids, kv_layout, layer_byte_rows, layer_state,
                                          request_rows)


def device_uuid(engine: Engine) -> str:
    """The engine's GPU, as CUDA names it (stable across processes and CUDA_VISIBLE_DEVICES); "" off CUDA."""
    if engine.device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(engine.device).uuid)


def cache_tensors(engine: Engine) -> tuple[list[list[torch.Tensor]], int]:
    """Per layer, the block-indexed parts then the state tensors (module docstring); and how many of each
    layer's tensors are block-indexed."""
    layers = [layer_byte_rows(engine, layer) + layer_state(engine, layer)
              for layer in range(engine.model_config.num_layers)]
    return layers, len(layer_byte_rows(engine, 0))


def share_cache(engine: Engine) -> pb.OpenCacheResponse:
    """The engine's cache tensors as CUDA IPC handles, for a sender on the same GPU."""
    if engine.device.type != "cuda":
        raise ValueError(f"the KV cache is on {engine.device}, not on a CUDA device")
    layers, num_parts = cache_tensors(engine)
    msgs = []
    for tensors in layers:
        for t in tensors:
            _, (_, size, stride, offset, _, dtype, _, handle, size_bytes, offset_bytes, _, rc_handle, rc_offset,
                event, event_sync) = reduce_tensor(t)
            msgs.append(pb.CudaIpcTensor(
                shape=list(size), stride=list(stride), storage_offset=offset, dtype=str(dtype).removeprefix("torch."),
                storage_handle=handle, storage_size_bytes=size_bytes, storage_offset_bytes=offset_bytes,
                ref_counter_handle=rc_handle, ref_counter_offset=rc_offset, event_handle=event or b"",
                event_sync_required=event_sync))
    return pb.OpenCacheResponse(device_uuid=device_uuid(engine), tensors=msgs, tensors_per_layer=len(layers[0]))


@dataclass
class PeerCache:
    """A decode engine's cache mapped into this process (`open_cache`), paired with this engine's own tensors once
    (`peer_cache`), so that a streamed prefill's first layer does not spend milliseconds making views."""

    layout: KvLayout  # this engine's (and, as OpenCache checked, the peer's)
    blocks: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per layer: (own, peer) block-indexed parts, as words
    states: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per layer: (own, peer) per-sequence state (kivi2)


def _words(rows: torch.Tensor) -> torch.Tensor:
    """A [num_blocks, bytes] uint8 view as the widest integers its rows allow: the index kernels move an element
    per thread, and 8-byte elements take 8x fewer of them."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        try:
            return rows.view(dtype)
        except RuntimeError:  # the row length or the storage offset does not fit this width
            continue
    return rows


def peer_cache(engine: Engine, layers: list[list[torch.Tensor]]) -> PeerCache:
    """The peer's tensors (`cache_tensors`' order) paired with `engine`'s own."""
    own, num_parts = cache_tensors(engine)
    return PeerCache(kv_layout(engine), [[(_words(m), _words(t)) for m, t in zip(mine[:num_parts], theirs[:num_parts])]
                      for mine, theirs in zip(own, layers)],
                     [list(zip(mine[num_parts:], theirs[num_parts:])) for mine, theirs in zip(own, layers)])


def open_cache(engine: Engine, response: pb.OpenCacheResponse) -> PeerCache:
    """Maps the tensors of `share_cache`'s response (from another process on this engine's GPU). The layouts were
    checked by OpenCache; here each mapped tensor must also match this engine's own tensor in shape and dtype."""
    if response.device_uuid != device_uuid(engine):
        raise ValueError(f"the peer's cache is on GPU {response.device_uuid}, this engine on {device_uuid(engine)!r}")
    own, _ = cache_tensors(engine)
    per_layer = response.tensors_per_layer
    if per_layer != len(own[0]) or len(response.tensors) != per_layer * len(own):
        raise ValueError(f"the peer shares {len(response.tensors)} tensors ({per_layer} per layer); this engine has "
                         f"{len(own)} layers of {len(own[0])}")
    index = engine.device.index if engine.device.index is not None else torch.cuda.current_device()
    layers = []
    for layer, mine in enumerate(own):
        mapped = []
        for j, t in enumerate(mine):
            m = response.tensors[layer * per_layer + j]
            dtype = getattr(torch, m.dtype, None)
            if not isinstance(dtype, torch.dtype) or dtype != t.dtype or list(m.shape)[1:] != list(t.shape)[1:]:
                raise ValueError(f"layer {layer} tensor {j}: the peer's is {m.dtype} {list(m.shape)}, this engine's "
                                 f"{t.dtype} {list(t.shape)}")
            mapped.append(rebuild_cuda_tensor(
                torch.Tensor, torch.Size(m.shape), tuple(m.stride), m.storage_offset, torch.UntypedStorage, dtype,
                index, m.storage_handle, m.storage_size_bytes, m.storage_offset_bytes, False, m.ref_counter_handle,
                m.ref_counter_offset, m.event_handle or None, m.event_sync_required))
        layers.append(mapped)
    return peer_cache(engine, layers)


@dataclass
class _Plan:
    """One request's copies into a peer's reservation."""

    peer: PeerCache
    rows: RequestRows  # the request's blocks and state here
    dst: torch.Tensor  # the reserved blocks there, on the device
    seq_slot: int  # the reserved sequence slot there


def _plan(engine: Engine, seq: Sequence, peer: PeerCache, block_ids: list[int], seq_slot: int) -> _Plan:
    rows = request_rows(engine, seq, seq.num_prompt_tokens, peer.layout)
    if len(block_ids) != rows.ids.numel():
        raise ValueError(f"{len(block_ids)} reserved blocks for {rows.num_tokens} tokens, {rows.ids.numel()} "
                         f"expected")
    if rows.state_rows and seq_slot < 0:
        raise ValueError("the format keeps per-sequence state but the reservation has no sequence slot")
    return _Plan(peer, rows, device_ids(block_ids, engine.device), seq_slot)


def _copy_layer(plan: _Plan, layer: int) -> int:
    """Queues the copies of one layer into the peer's cache on the current stream; returns the bytes."""
    src, r = plan.rows.ids, plan.rows.state_rows
    written = 0
    for mine, theirs in plan.peer.blocks[layer]:
        theirs.index_copy_(0, plan.dst, mine.index_select(0, src))
        written += src.numel() * mine.shape[1] * mine.element_size()
    for mine, theirs in plan.peer.states[layer] if r else ():
        rows = mine[plan.rows.kv_slot, :r]
        theirs[plan.seq_slot, :r].copy_(rows)
        written += rows.numel() * rows.element_size()
    return written


def copy_in_place(engine: Engine, request_id: str, peer: PeerCache, block_ids: list[int], seq_slot: int) -> int:
    """Copies the prompt's KV of a prefill-only request held on `engine` into the peer's reserved blocks (and
    sequence slot), then waits for the copies: the bytes are in the peer's cache when this returns. Returns the
    bytes written."""
    plan = _plan(engine, engine.prefilled_sequence(request_id), peer, block_ids, seq_slot)
    written = sum(_copy_layer(plan, layer) for layer in range(len(peer.blocks)))
    if engine.device.type == "cuda":
        torch.cuda.current_stream(engine.device).synchronize()
    return written


class InPlaceStream:
    """The copies `stream_in_place` queues during a prefill; `wait` (any thread, once the first token is out)
    blocks until they are done and returns the bytes written, or raises what went wrong."""

    def __init__(self) -> None:
        self.first_layer_at = 0.0  # perf_counter() when the first layer's copies were queued
        self.written = 0
        self.queued = False  # the last layer's copies are queued
        self.done: torch.cuda.Event | None = None  # recorded after them (CUDA; elsewhere they ran in the step)
        self.error: Exception | None = None

    def wait(self) -> int:
        if self.error is not None:
            raise RuntimeError(f"copying the KV in place failed: {self.error}") from self.error
        if not self.queued:
            raise RuntimeError("the prefill step that copies the KV in place has not run")
        if self.done is not None:
            self.done.synchronize()
        return self.written


def stream_in_place(engine: Engine, request_id: str, peer: PeerCache, block_ids: list[int],
                    seq_slot: int) -> InPlaceStream:
    """For a queued prefill-only request: during the step that completes its prefill, each layer's KV is copied
    into the peer's reserved blocks (and sequence slot) right after that layer's attention wrote it, so the KV is
    in place when the first token is. On CUDA the copies run on a side stream after the layer's attention, beside
    the later layers' compute rather than in its way. A failure inside the forward pass is kept for `wait` and
    stops the copies; the prefill itself goes on."""
    stream = InPlaceStream()
    plans: list[_Plan] = []
    last = engine.model_config.num_layers - 1
    side = torch.cuda.Stream(engine.device) if engine.device.type == "cuda" else None

    def on_layer(seq: Sequence, layer: int) -> None:
        if stream.error is not None:
            return
        try:
            if not plans:
                stream.first_layer_at = time.perf_counter()
                plans.append(_plan(engine, seq, peer, block_ids, seq_slot))
                if side is not None:  # made on the compute stream, used on the side one until its last copy
                    plans[0].rows.ids.record_stream(side)
                    plans[0].dst.record_stream(side)
            if side is None:
                stream.written += _copy_layer(plans[0], layer)
            else:
                ready = torch.cuda.current_stream(engine.device).record_event()
                with torch.cuda.stream(side):
                    side.wait_event(ready)
                    stream.written += _copy_layer(plans[0], layer)
                if layer == last:
                    stream.done = side.record_event()
            stream.queued = layer == last
        except Exception as e:  # noqa: BLE001 - reported by wait(); the caller falls back to chunks
            stream.error = e

    engine.stream_kv(request_id, on_layer)
    return stream
