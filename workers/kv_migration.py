"""Moves one request's KV cache between two engines (prefill -> decode) as bytes, in the cache's stored form.

Wire layout of a request whose prompt fills `num_blocks` blocks, over `num_layers` layers:

    payload (layer l, block_index i), i < num_blocks: blocks i, i + 1, ... of the request's block table in layer
        l, exactly `bytes_per_block` bytes each (a run of one or more blocks). Kernel backend:
        `kernels.kv_base.export_blocks` (every part of the format, scales and zero points included, quantized
        formats stay quantized). Torch backend (kv_format none on CPU): the block's keys then its values,
        [block_size, Hkv, D] each, in the model dtype. An export holds each layer's blocks as one run; the
        sender cuts runs to its chunks (`cluster/kv_wire.py`).
    payload (layer l, block_index num_blocks): the per-sequence state of layer l, only for formats that keep
        the newest tokens outside the blocks: kivi2's full-precision residual rows [0, num_tokens % R) of the
        sequence's slot, keys then values (`state_bytes(num_tokens)` bytes). Without it the decode side would
        read zeros for those tokens.

`KvLayout.descriptor` names everything the bytes depend on (backend, format and its options, cache dtype,
block size, heads, head_dim, part order) plus a checksum of the per-layer state that must be equal on both
ends (fp8's per-head scales: codes written under one scale and read under another are wrong). Both ends must
have the same descriptor; converting between formats is refused (`KvLayoutMismatch`), not attempted.

Export runs after prefill has finished (`begin_export`: the whole prompt's KV at once, on CUDA gathered into one
host buffer by launches that `export_plan` lays out from the cache's addresses, `CacheTarget`, through a bounded
staging buffer on the device, `gather_in_pieces`), or layer by layer inside the forward pass of the step that
completes the prefill (`stream_layers`, through `Engine.stream_kv`), so that a sender streams early layers while
later ones compute (on CUDA the device-to-host copies run on a side stream and a copy thread, so the forward pass
never waits for them). The functions that take the engine touch its cache and must run on the engine's thread.
The decode side's writes are in `workers/kv_import.py`.
"""
from __future__ import annotations

import dataclasses
import logging
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from partita.kernels.scatter_copy import gather_copy, warm_up_gather, word_dtype
from partita.protos.partita.v1 import kv_transfer_pb2 as pb
from partita.workers.attention.kernel_paged import KernelPagedAttention
from partita.workers.attention.torch_paged import TorchPagedAttention
from partita.workers.engine.engine import Engine
from partita.workers.engine.sequence import Sequence

log = logging.getLogger(__name__)

STATE_PARTS = ("res_k", "res_v")  # per-sequence state of the formats that keep some, in wire order
_BITS = {"none": 16, "fp8": 8, "int8": 8, "int4": 4, "kivi2": 2}
Payload = tuple[int, int, bytes | memoryview]  # (layer, first block index, data): whole blocks, or the state
# Device memory one export gathers through (`gather_in_pieces`); a request's whole KV can be gigabytes (Llama-3-8B,
# bf16: 128 KiB a token), more than the headroom the engine leaves beside its cache.
EXPORT_STAGING_BYTES = 256 << 20


class KvLayoutMismatch(ValueError):
    """The two ends store KV differently (format, options, shape or fp8 scales); no conversion is done."""


@dataclass(frozen=True)
class KvLayout:
    """How one engine's KV bytes are laid out on the wire (module docstring)."""

    descriptor: str
    format_name: str
    bits: int
    group_size: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    bytes_per_block: int  # one layer's one block
    state_row_bytes: int  # per-sequence state bytes per token row (kivi2 residual: K and V), 0 if none
    state_period: int  # the state holds num_tokens % state_period rows

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def state_bytes(self, num_tokens: int) -> int:
        """Bytes of one layer's per-sequence state payload for a prompt of num_tokens (0: no payload)."""
        return (num_tokens % self.state_period) * self.state_row_bytes if self.state_row_bytes else 0

    def total_bytes(self, num_tokens: int) -> int:
        return self.num_layers * (self.num_blocks(num_tokens) * self.bytes_per_block + self.state_bytes(num_tokens))

    def to_proto(self) -> pb.KvFormat:
        return pb.KvFormat(name=self.format_name, bits=self.bits, group_size=self.group_size,
                           block_size=self.block_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           has_scales=self.format_name not in ("none",), layout=self.descriptor)

    def check_compatible(self, remote: pb.KvFormat) -> None:
        """Raises KvLayoutMismatch naming what differs between this (receiving) end and the sender's format."""
        if remote.layout == self.descriptor:
            return
        mine = dict(zip(("backend", "format", "dtype", "block_size", "heads", "head_dim", "parts", "state"),
                        self.descriptor.split("|")))
        theirs = dict(zip(mine, remote.layout.split("|")))
        diff = [f"{k}: sender {theirs.get(k, '?')!r}, receiver {v!r}" for k, v in mine.items() if theirs.get(k) != v]
        raise KvLayoutMismatch("KV layouts differ and format conversion is not supported; use the same kv_format "
                               "(and model dtype) on both ends: " + "; ".join(diff or [remote.layout]))


def kv_layout(engine: Engine) -> KvLayout:
    """The wire layout of `engine`'s KV cache."""
    backend, cfg = engine.runner.backend, engine.model_config
    bs, h, d = engine.config.block_size, cfg.num_kv_heads, cfg.head_dim
    if isinstance(backend, TorchPagedAttention):
        dtype = backend.k_caches[0].dtype
        elem = backend.k_caches[0].element_size()
        fields = ("torch", "none", str(dtype).removeprefix("torch."), str(bs), str(h), str(d), "k,v", "-")
        return KvLayout("|".join(fields), "none", 8 * elem, 0, cfg.num_layers, bs, h, d, 2 * bs * h * d * elem, 0, 1)
    if not isinstance(backend, KernelPagedAttention):
        raise TypeError(f"KV migration does not know the {type(backend).__name__} attention backend")
    fmt, cache0 = backend.fmt, backend.caches[0]
    spec = fmt.name + ":" + ",".join(f"{f.name}={getattr(fmt, f.name)}" for f in dataclasses.fields(fmt))
    state_crc = 0
    if "scales" in cache0.state:  # must agree on both ends; not sent (checked through the descriptor)
        for cache in backend.caches:
            state_crc = zlib.crc32(cache.state["scales"].cpu().contiguous().view(torch.uint8).numpy(), state_crc)
    row_bytes, period = 0, 1
    if "res_k" in cache0.state:
        res = cache0.state["res_k"]
        row_bytes = 2 * res[0, 0].numel() * res.element_size()
        period = res.shape[1]
    fields = ("kernel", spec, str(cache0.dtype).removeprefix("torch."), str(bs), str(h), str(d),
              ",".join(cache0.parts), f"scales_crc={state_crc:08x}")
    return KvLayout("|".join(fields), fmt.name, _BITS.get(fmt.name, 0), int(getattr(fmt, "group_size", 0)),
                    cfg.num_layers, bs, h, d, cache0.bytes_per_block, row_bytes, period)


@dataclass
class RequestRows:
    """What gathering (or copying) one request's layers needs, made once per request rather than per layer: the
    layout (for fp8 it reads every layer's scales back from the device) and the block ids on the cache's device
    (a blocking copy of them there made the host wait for the forward pass at every layer of a streamed
    prefill)."""

    layout: KvLayout
    ids: torch.Tensor
    num_tokens: int
    kv_slot: int

    @property
    def state_rows(self) -> int:
        """Rows of the sequence's per-layer state that hold its newest tokens (kivi2's residual); 0: none."""
        return self.num_tokens % self.layout.state_period if self.layout.state_bytes(self.num_tokens) else 0


def device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """ids as int64 on `device`; on CUDA copied from pinned memory, so the copy is queued on the stream and the
    host does not wait for the GPU (a streamed prefill makes them in the middle of its forward pass)."""
    t = torch.tensor(ids, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def request_rows(engine: Engine, seq: Sequence, num_tokens: int, layout: KvLayout | None = None) -> RequestRows:
    layout = layout or kv_layout(engine)
    n = layout.num_blocks(num_tokens)
    if len(seq.block_table) < n:
        raise ValueError(f"{seq.request_id!r} holds {len(seq.block_table)} blocks, {n} expected")
    ids = device_ids(seq.block_table[:n], layer_byte_rows(engine, 0)[0].device)
    return RequestRows(layout, ids, num_tokens, seq.kv_slot)


def _gather_layer(engine: Engine, rows: RequestRows, layer: int) -> list[torch.Tensor]:
    """One layer's KV for the request of `rows`, on the cache's device: the block rows [num_blocks,
    bytes_per_block] uint8 (`layer_byte_rows` gathered into one buffer, copied to the host at once), then the
    state rows (if the layout has state)."""
    out = [torch.cat([part.index_select(0, rows.ids) for part in layer_byte_rows(engine, layer)], dim=1)]
    if r := rows.state_rows:
        out.append(torch.cat([s[rows.kv_slot, :r].reshape(-1).view(torch.uint8) for s in layer_state(engine, layer)]))
    return out


def _payloads(layer: int, gathered: list[torch.Tensor]) -> list[Payload]:
    """Host tensors of `_gather_layer` -> that layer's payloads: its blocks as one run, then the state. The data
    are byte views of the tensors, which they keep alive: a copy here held the GIL for a whole layer (8 MiB of
    Llama-3-8B's bf16 KV at 2k tokens) while the forward pass beside it needed it to launch kernels."""
    rows, *state = gathered
    return [(layer, 0, _bytes_view(rows))] + [(layer, rows.shape[0], _bytes_view(s)) for s in state]


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy().reshape(-1))


def export_layer(engine: Engine, rows: RequestRows, layer: int) -> list[Payload]:
    """One layer's payloads for the request of `rows`: its blocks as one run, then the state (if any)."""
    return _payloads(layer, [t.cpu() for t in _gather_layer(engine, rows, layer)])


class _DeviceToHost:
    """Copies KV to the host without stalling the forward pass: each copy into pinned memory (`submit`: of
    buffers the compute stream gathered; `queue`: of whatever the caller queues, gathers included) runs on a
    side stream after the compute stream's work so far, and one thread waits for the copies in order and hands
    each one's host tensors to deliver(index, hosts), index 0, 1, ... in submission order. Submitted device
    buffers are kept alive for the side stream (`record_stream`), so the prefill's blocks may be reused as soon
    as the gather has run."""

    def __init__(self, device: torch.device, num_copies: int,
                 deliver: Callable[[int, list[torch.Tensor]], None],
                 on_error: Callable[[BaseException], None] | None = None):
        self.stream = torch.cuda.Stream(device)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kv-d2h")
        self.num_copies, self.deliver, self.on_error = num_copies, deliver, on_error

    def submit(self, index: int, gathered: list[torch.Tensor]) -> None:
        def copies() -> list[torch.Tensor]:
            hosts = []
            for t in gathered:
                hosts.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True))
                t.record_stream(self.stream)
            return hosts
        self.queue(index, copies)

    def queue(self, index: int, enqueue: Callable[[], list[torch.Tensor]]) -> None:
        """Runs enqueue() here with the side stream current, after what the compute stream queued so far; it
        queues work that fills host tensors and returns them, handed to deliver once that work is done."""
        ready = torch.cuda.current_stream(self.stream.device).record_event()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            hosts = enqueue()
            done = self.stream.record_event()
        self.pool.submit(self._deliver, index, done, hosts)
        if index == self.num_copies - 1:
            self.pool.shutdown(wait=False)

    def _deliver(self, index: int, done: torch.cuda.Event, hosts: list[torch.Tensor]) -> None:
        try:
            done.synchronize()
            self.deliver(index, hosts)
        except Exception as e:
            if self.on_error is not None:
                self.on_error(e)
            else:  # the receiver's deadline then fails the streamed attempt, which falls back
                log.exception("copying part %d of a streamed KV export to the host failed", index)


@dataclass(frozen=True)
class CacheTarget:
    """Where an engine's cache parts and per-sequence state are, read once on its thread (they are allocated with
    the engine and never move), so that exports can be planned and writes staged without touching the engine."""

    layout: KvLayout  # `kv_layout` (for fp8 it reads every layer's scales back from the device: once, here)
    rows: tuple[tuple[torch.Tensor, ...], ...]  # per layer, `layer_byte_rows`: [num_blocks, width] uint8 per part
    bases: np.ndarray  # [num_layers, num_parts] int64: each part's address
    widths: np.ndarray  # [num_parts] int64: bytes of one block in each part
    state_bases: np.ndarray  # [num_layers, num_states] int64: each state tensor's address (`layer_state`)
    state_slot_bytes: np.ndarray  # [num_states] int64: bytes from one sequence slot to the next
    state_row_bytes: np.ndarray  # [num_states] int64: bytes of one token row of a slot
    # the widest word every address, width, stride and row divides (`scatter_copy.word_dtype`): so also every
    # address, offset and size of an export's gather and of a write's scatter
    word: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.rows[0][0].device

    @property
    def starts(self) -> np.ndarray:
        """[num_parts] int64: where each part's bytes start in a wire block."""
        return np.cumsum(self.widths) - self.widths


def cache_target(engine: Engine) -> CacheTarget:
    num_layers = engine.model_config.num_layers
    rows = tuple(tuple(layer_byte_rows(engine, layer)) for layer in range(num_layers))
    bases = np.array([[r.data_ptr() for r in rs] for rs in rows], dtype=np.int64)
    widths = np.array([r.shape[1] for r in rows[0]], dtype=np.int64)
    states = [layer_state(engine, layer) for layer in range(num_layers)]
    state_bases = np.array([[s.data_ptr() for s in ss] for ss in states], dtype=np.int64).reshape(num_layers, -1)
    slot = np.array([s.stride(0) * s.element_size() for s in states[0]], dtype=np.int64)
    row = np.array([s[0, 0].numel() * s.element_size() for s in states[0]], dtype=np.int64)
    word = word_dtype([*widths, *bases.ravel(), *state_bases.ravel(), *slot, *row])
    return CacheTarget(kv_layout(engine), rows, bases, widths, state_bases, slot, row, word)


@dataclass(frozen=True)
class ExportPlan:
    """How to gather one request's KV into one buffer in wire order with `gather_copy` (`export_plan`; launched
    in pieces by `gather_in_pieces`)."""

    table: np.ndarray  # [E, 3] int64: source byte address, offset in words in the buffer, words
    word: torch.dtype
    total_bytes: int
    max_words: int
    spans: list[tuple[int, int, int, int]]  # per payload: layer, first block index, first and end byte


def export_plan(target: CacheTarget, block_ids: list[int], num_tokens: int, kv_slot: int) -> ExportPlan:
    """The table that gathers a request's KV (its blocks `block_ids`, its state in slot `kv_slot`) into one
    buffer laid out as its payloads in wire order: per layer the block rows [num_blocks, bytes_per_block] (each
    row the parts of one block, in `layer_byte_rows`' order), then the state rows (if the layout has state). One
    entry per block and part, and one per state tensor. Plain numpy: touches no engine state."""
    layout = target.layout
    ids, n, width = np.asarray(block_ids, dtype=np.int64), len(block_ids), layout.bytes_per_block
    state_rows = num_tokens % layout.state_period if layout.state_bytes(num_tokens) else 0
    if int(target.widths.sum()) != width or n != layout.num_blocks(num_tokens):
        raise ValueError(f"{n} blocks of {int(target.widths.sum())} bytes for {num_tokens} tokens do not match the "
                         f"layout's {layout.num_blocks(num_tokens)} blocks of {width}")
    num_layers, num_parts = layout.num_layers, len(target.widths)
    num_states = len(target.state_row_bytes) if state_rows else 0
    per_layer = n * width + state_rows * int(target.state_row_bytes.sum())
    # Offsets and counts are in words; the target's word divides every size and address, so they are divided
    # before they are spread over the table (a division pass over the table took most of its time).
    w = target.word.itemsize
    firsts = np.arange(num_layers, dtype=np.int64)[:, None] * per_layer  # [num_layers, 1]: each layer's first byte
    table = np.empty((num_layers, n * num_parts + num_states, 3), dtype=np.int64)
    blocks = table[:, :n * num_parts].reshape(num_layers, n, num_parts, 3)
    blocks[..., 0] = target.bases[:, None, :] + ids[None, :, None] * target.widths
    rows = np.arange(n, dtype=np.int64)[:, None] * (width // w)  # [n, 1]: each block's first word in a layer
    blocks[..., 1] = (firsts // w)[:, :, None] + rows + target.starts // w
    blocks[..., 2] = target.widths // w
    spans = []
    for layer in range(num_layers):
        first = layer * per_layer
        spans.append((layer, 0, first, first + n * width))
        if state_rows:
            spans.append((layer, n, first + n * width, first + per_layer))
    if state_rows:
        sizes = state_rows * target.state_row_bytes
        states = table[:, n * num_parts:]
        states[..., 0] = target.state_bases + kv_slot * target.state_slot_bytes
        states[..., 1] = (firsts + n * width + (np.cumsum(sizes) - sizes)) // w
        states[..., 2] = sizes // w
    table = table.reshape(-1, 3)
    return ExportPlan(table, target.word, num_layers * per_layer, int(table[:, 2].max()), spans)


def export_pieces(plan: ExportPlan, max_bytes: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Cuts the plan's buffer into pieces of at most max_bytes (or one table entry, where an entry is larger),
    each gathered by its own launch into one staging buffer: (the plan's table with each entry's offset made
    relative to its piece, per piece (first entry, end entry, first byte, bytes)). The table's entries are in
    wire order and tile the buffer, so a piece is a run of entries."""
    w = plan.word.itemsize
    offsets, ends = plan.table[:, 1], plan.table[:, 1] + plan.table[:, 2]
    cap = max(1, max_bytes // w)
    table, pieces, first = plan.table.copy(), [], 0
    while first < len(ends):
        start = int(offsets[first])
        end = max(first + 1, int(np.searchsorted(ends, start + cap, side="right")))
        if start:
            table[first:end, 1] -= start
        pieces.append((first, end, start * w, int(ends[end - 1] - start) * w))
        first = end
    return table, pieces


def gather_in_pieces(plan: ExportPlan, device: torch.device, host: torch.Tensor, max_bytes: int) -> None:
    """Gathers the plan's buffer into host ([total_bytes] uint8; pinned when device is CUDA), queued in order
    on the current stream: per piece (`export_pieces`) one launch into a staging buffer on `device` of at most
    max_bytes and one copy from it into its place in host. The stream's order keeps a piece's gather from
    overwriting the staging buffer before the previous piece's copy has read it, so an export of any length
    holds at most max_bytes of device memory. The table goes up once, through pinned memory."""
    table, pieces = export_pieces(plan, max_bytes)
    table = torch.from_numpy(table)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    words = max(size for _, _, _, size in pieces) // plan.word.itemsize
    staging = torch.empty(words, dtype=plan.word, device=device)
    for first, end, start, size in pieces:
        piece = staging[:size // plan.word.itemsize]
        gather_copy(piece, table[first:end], plan.max_words)
        host[start:start + size].copy_(piece.view(torch.uint8), non_blocking=True)


def prepare_exports(target: CacheTarget) -> None:
    """Compiles what `begin_export` launches on CUDA (Triton compiles on first use), so that the first export does
    not stall the engine thread; on the engine's thread, before the first export. Nothing to do elsewhere."""
    if target.device.type == "cuda":
        warm_up_gather(target.word, target.device)


def layer_byte_rows(engine: Engine, layer: int) -> list[torch.Tensor]:
    """Each part of `layer`'s cache as a [num_blocks, bytes of one block] uint8 view of its storage, in wire
    order (the torch backend: keys then values; the kernel backend: its format's parts, `export_blocks`'s
    order). Writing into a view writes the cache."""
    backend = engine.runner.backend
    if isinstance(backend, TorchPagedAttention):
        parts = [backend.k_caches[layer], backend.v_caches[layer]]
    else:
        parts = list(backend.caches[layer].parts.values())
    return [p.view(p.shape[0], -1).view(torch.uint8) for p in parts]


def layer_state(engine: Engine, layer: int) -> list[torch.Tensor]:
    """`layer`'s per-sequence state tensors [max_num_seqs, ...] in wire order (kivi2's residual keys, then
    values); empty for formats without state."""
    backend = engine.runner.backend
    if isinstance(backend, TorchPagedAttention):
        return []
    state = backend.caches[layer].state
    return [state[name] for name in STATE_PARTS if name in state]


@dataclass
class KvExport:
    """A prefilled request ready to migrate: what Reserve and Commit need, and every payload in wire order."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    layout: KvLayout
    payloads: list[Payload]  # (layer, first block index, data): per layer its blocks as one run, then the state

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_bytes(self) -> int:
        return sum(len(d) for _, _, d in self.payloads)


def begin_export(engine: Engine, request_id: str, target: CacheTarget | None = None) -> "Future[KvExport]":
    """Every layer's payloads of a prefill-only request held after its first token (`Engine.prefilled_sequence`),
    as a future. On CUDA only the plan (`export_plan`: every layer's blocks and state into one buffer in wire
    order) and its queueing run here, on the engine thread: the gathers (one launch per `EXPORT_STAGING_BYTES`)
    and the copies to pinned host memory run on a side stream after the compute stream's work so far, and the
    future is completed by a copy thread (`_DeviceToHost`), so that the engine thread does not wait for them: no
    step runs while it waits, and a 1k-token prompt of Llama-3-8B holds 128 MiB of bf16 KV. With
    a gather and a copy per layer (some ten torch calls each, a pinned allocation among them) a loaded prefill
    worker's engine thread spent 47% of its time here, 31% on the line that allocates pinned memory and queues
    the copy (py-spy, 2026-12-07). Elsewhere the export is made here, layer by layer. target:
    `cache_target(engine)`, read once by the caller (else here, on CUDA). The request must stay held until the
    future is done."""
    seq = engine.prefilled_sequence(request_id)
    n = seq.num_prompt_tokens
    layout = target.layout if target is not None else kv_layout(engine)
    prompt, first_token = seq.token_ids[:n], seq.token_ids[n]  # read here: the copy thread reads no engine state
    done: Future[KvExport] = Future()

    def make(payloads: list[Payload]) -> KvExport:
        return KvExport(request_id, prompt, first_token, layout, payloads)

    if engine.device.type != "cuda":
        rows = request_rows(engine, seq, n, layout)
        done.set_result(make([p for layer in range(layout.num_layers) for p in export_layer(engine, rows, layer)]))
        return done
    plan = export_plan(target or cache_target(engine), seq.block_table[:layout.num_blocks(n)], n, seq.kv_slot)

    def deliver(_: int, hosts: list[torch.Tensor]) -> None:
        view = _bytes_view(hosts[0])
        done.set_result(make([(layer, index, view[a:b]) for layer, index, a, b in plan.spans]))

    def fail(e: BaseException) -> None:
        if not done.done():
            done.set_exception(e)

    def enqueue() -> list[torch.Tensor]:
        host = torch.empty(plan.total_bytes, dtype=torch.uint8, pin_memory=True)
        gather_in_pieces(plan, engine.device, host, EXPORT_STAGING_BYTES)
        return [host]

    _DeviceToHost(engine.device, 1, deliver, fail).queue(0, enqueue)
    return done


def export_request(engine: Engine, request_id: str) -> KvExport:
    """`begin_export`, waited for (on CUDA the engine thread then waits for the copies)."""
    return begin_export(engine, request_id).result()


def stream_layers(engine: Engine, request_id: str, sink: Callable[[list[Payload]], None]) -> None:
    """For a queued prefill-only request: during the step that completes its prefill, hands each layer's
    payloads (`export_layer`'s) to sink, layer 0 first, as soon as that layer's attention wrote them. On CUDA
    the copy to the host runs beside the forward pass and sink is called from a copy thread (`_DeviceToHost`);
    elsewhere on the engine thread, inside the forward pass."""
    layout = kv_layout(engine)
    made: list[RequestRows] = []  # the request's rows, made at its first layer (its blocks are allocated by then)

    def rows_of(seq: Sequence) -> RequestRows:
        if not made:
            made.append(request_rows(engine, seq, seq.num_prompt_tokens, layout))
        return made[0]

    if engine.device.type == "cuda":
        copier = _DeviceToHost(engine.device, engine.model_config.num_layers,
                               lambda layer, hosts: sink(_payloads(layer, hosts)))

        def on_layer(seq: Sequence, layer: int) -> None:
            copier.submit(layer, _gather_layer(engine, rows_of(seq), layer))
    else:
        def on_layer(seq: Sequence, layer: int) -> None:
            sink(export_layer(engine, rows_of(seq), layer))

    engine.stream_kv(request_id, on_layer)
