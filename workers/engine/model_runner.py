"""Builds the model on its device, sizes and allocates the KV cache, and runs one step over a batch.

A step's tokens are laid out flat (prefill chunks, then decodes) into a ForwardBatch. Decode-only steps on
CUDA replay CUDA graphs captured per (padded batch size, block-table width), captured lazily on first use; the
Triton kernels every step may launch are compiled when the runner is built (`ModelRunner._compile_kernels`).
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from partita.workers.attention.backend import AttentionBackend, AttentionMetadata, PrefillSeq
from partita.workers.config import EngineConfig, ModelConfig
from partita.workers.engine.decode_inputs import DecodeInputs
from partita.workers.engine.scheduler import ScheduledBatch
from partita.workers.engine.sequence import Sequence
from partita.workers.errors import EngineCapacityError
from partita.workers.models.decoder import DecoderModel, ForwardBatch
from partita.workers.models.loader import init_random, load_checkpoint
from partita.workers.models.ops import select_ops

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 * 2**20


@dataclass
class StepOutput:
    """Logits of the rows to sample, and the sequences they belong to (same order)."""

    logits: torch.Tensor
    sampled: list[Sequence]


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, device: torch.device,
                 dtype: torch.dtype, checkpoint: str | None, max_model_len: int, backend: AttentionBackend):
        self.config = model_config
        self.engine_config = engine_config
        self.device = device
        self.dtype = dtype
        self.block_size = engine_config.block_size
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.ops = select_ops(device)
        # Memory other engines of this process hold already; not ours to count.
        self._baseline_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self.backend = backend
        with torch.device(device):
            self.model = DecoderModel(model_config, self.backend, ops=self.ops, dtype=dtype)
        if checkpoint is None:
            init_random(self.model, engine_config.seed)
        else:
            load_checkpoint(self.model, checkpoint)
        self.model.eval()
        self._tune_linear_kernels()
        self.num_blocks = self._plan_num_blocks()
        self.backend.allocate(model_config.num_layers, self.num_blocks, self.block_size, model_config.num_kv_heads,
                              model_config.head_dim, dtype, device)
        self.graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self.graph_pool = None
        self.use_graphs = (device.type == "cuda" and not engine_config.enforce_eager
                           and (not model_config.is_moe or self.ops.name != "torch"))
        if device.type == "cuda":
            self._compile_kernels()

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Compiles the Triton kernel variants steps can launch, now rather than at their first launch, which
        runs on the engine thread while it serves: under load, a PD decode worker's engine thread spent 45% of a
        10 s window compiling decode-attention variants for split counts it had not met yet (py-spy, 2026-12-07).
        Decode attention: every variant its split heuristic can pick (`compile_decode`). The rest: decode steps
        of 1, 2 and 16 sequences and prefills of as many tokens, since Triton also compiles apart integer
        arguments equal to 1 or divisible by 16; MoE models also prefill 2^k and 2^k + 1 tokens, since the fused
        MoE autotunes (and routes) per power-of-two bucket of token-expert pairs. Padding slots (-1): nothing is
        written to the cache."""
        start = time.perf_counter()
        ecfg, bs = self.engine_config, self.block_size
        # graphs pass their tables' width in tokens as the bound, up to max_model_len rounded up to whole blocks
        launches = self.backend.compile_decode(self.config.num_heads, ecfg.max_num_seqs, self.max_blocks_per_seq * bs)
        for n in sorted({min(n, ecfg.max_num_seqs) for n in (1, 2, 16)}):
            meta = self._metadata([-1] * n, [], [(1, [0], 0)] * n)
            zeros = torch.zeros(n, dtype=torch.long, device=self.device)
            self.model.compute_logits(self.model(ForwardBatch(zeros, zeros, meta)))
        most = min(ecfg.max_num_batched_tokens, self.max_model_len)
        sizes = {1, 2, 16}
        if self.config.is_moe:
            sizes |= {n for k in range(most.bit_length()) for n in (1 << k, (1 << k) + 1)}
        for n in sorted({min(n, most) for n in sizes}):
            meta = self._metadata([-1] * n, [(0, n, n, [0] * -(-n // bs), 0)], [])
            hidden = self.model(ForwardBatch(torch.zeros(n, dtype=torch.long, device=self.device),
                                             torch.arange(n, device=self.device), meta))
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        log.info("kernels compiled in %.1f s (%d decode-attention launches)", time.perf_counter() - start,
                 launches)

    def _tune_linear_kernels(self) -> None:
        """Times small_m_linear's configs for every weight shape at every row count it serves (decode batches,
        short prefill steps; one timing per row tile, `tile_rows`), now, while the memory its timing borrows (a
        few weight copies) is still free of KV cache. Steps never time anything (`ops.linear` takes the cached
        config)."""
        if self.ops.name != "triton" or self.dtype not in (torch.float16, torch.bfloat16):
            return
        from partita.kernels.linear import MAX_M, use_small_m_linear, warmup
        from partita.workers.models.layers import Linear

        weights = {tuple(m.weight.shape): m.weight for m in self.model.modules() if isinstance(m, Linear)}
        for (n, k), weight in weights.items():
            for m in range(1, MAX_M + 1):
                if use_small_m_linear(m, n, k):
                    warmup(m, n, k, self.dtype, self.device, weight)  # times once per row tile

    # --- capacity -------------------------------------------------------------------------------------
    def _plan_num_blocks(self) -> int:
        cfg, ecfg = self.config, self.engine_config
        per_block = self.backend.bytes_per_block(self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        per_block *= cfg.num_layers
        fixed = cfg.num_layers * self.backend.fixed_bytes(self.block_size, cfg.num_kv_heads, cfg.head_dim,
                                                          self.dtype)
        if ecfg.num_kv_blocks is not None:
            num_blocks = ecfg.num_kv_blocks
        elif ecfg.kv_cache_memory_bytes is not None:
            num_blocks = max(0, ecfg.kv_cache_memory_bytes - fixed) // per_block
        elif self.device.type == "cuda":
            num_blocks = max(0, self._profile_free_bytes() - fixed) // per_block
        else:
            num_blocks = min(max(0, CPU_KV_CACHE_BYTES - fixed) // per_block,
                             ecfg.max_num_seqs * self.max_blocks_per_seq)
        if num_blocks * self.block_size < self.max_model_len:
            raise EngineCapacityError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens ({num_blocks * self.block_size} "
                f"tokens), fewer than max_model_len={self.max_model_len}; give it more memory or lower max_model_len")
        return int(num_blocks)

    @torch.inference_mode()
    def _profile_free_bytes(self) -> int:
        """Runs the largest prefill step once; returns this engine's share of the GPU (gpu_memory_utilization
        of its memory) less its weights and activation peak, bounded by what is actually free."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        cfg = self.config
        self.backend.allocate(cfg.num_layers, 1, self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype,
                              self.device)
        n = min(self.engine_config.max_num_batched_tokens, self.max_model_len)
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        # Every page of the table is block 0 of a one-block cache; slot -1 writes nothing.
        meta = self._metadata([-1] * n, [(0, n, n, [0] * -(-n // self.block_size), 0)], [])
        hidden = self.model(ForwardBatch(tokens, torch.arange(n, device=self.device), meta))
        self.model.compute_logits(hidden[-self.engine_config.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self._baseline_bytes
        self.backend.allocate(cfg.num_layers, 0, self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype,
                              self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        activations = peak - (torch.cuda.memory_allocated(self.device) - self._baseline_bytes)
        share = int(total * self.engine_config.gpu_memory_utilization) - peak
        # Keep the activation peak (and CUDA-graph pools) free beside the cache.
        return max(0, min(share, free - activations - 256 * 2**20))

    # --- steps ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, layer_hook: Callable[[int], None] | None = None) -> StepOutput:
        """layer_hook: see DecoderModel.forward; the engine passes one only for steps with prefills."""
        if not batch.prefills and self.use_graphs and len(batch.decodes) <= self._max_graph_batch():
            return self._run_decode_graph(batch.decodes)
        fb, sample_rows, sampled = self._prepare(batch)
        hidden = self.model(fb, layer_hook)
        return StepOutput(self.model.compute_logits(hidden[sample_rows]), sampled)

    def _prepare(self, batch: ScheduledBatch) -> tuple[ForwardBatch, torch.Tensor, list[Sequence]]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[tuple[int, int, int, list[int], int]] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for seq, n in batch.prefills:
            start = seq.num_computed_tokens
            prefills.append((len(tokens), n, start + n, seq.block_table, seq.kv_slot))
            tokens += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += self._slots(seq, start, start + n)
            if start + n == seq.num_tokens:
                sample_rows.append(len(tokens) - 1)
                sampled.append(seq)
        for seq in batch.decodes:
            pos = seq.num_computed_tokens
            tokens.append(seq.token_ids[pos])
            positions.append(pos)
            slots += self._slots(seq, pos, pos + 1)
            sample_rows.append(len(tokens) - 1)
            sampled.append(seq)
        decodes = [(s.num_computed_tokens + 1, s.block_table, s.kv_slot) for s in batch.decodes]
        meta = self._metadata(slots, prefills, decodes)
        fb = ForwardBatch(self._tensor(tokens, torch.long), self._tensor(positions, torch.long), meta)
        return fb, self._tensor(sample_rows, torch.long), sampled

    def _metadata(self, slots: list[int], prefills: list[tuple[int, int, int, list[int], int]],
                  decodes: list[tuple[int, list[int], int]]) -> AttentionMetadata:
        """prefills: (query_start, query_len, context_len, block_table, kv_slot); decodes: (context_len,
        block_table, kv_slot); both in the flat token order."""
        def table(rows: list[list[int]]) -> torch.Tensor:
            width = max((len(r) for r in rows), default=1)
            return self._tensor([r + [0] * (width - len(r)) for r in rows], torch.int32).reshape(len(rows), width)

        token_slots = [p[4] for p in prefills for _ in range(p[1])] + [d[2] for d in decodes]
        prefill_tables = table([p[3] for p in prefills])  # one copy; each PrefillSeq takes its (padded) row
        return AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.long), num_prefill_tokens=sum(p[1] for p in prefills),
            prefills=[PrefillSeq(p[0], p[1], p[2], prefill_tables[i]) for i, p in enumerate(prefills)],
            decode_block_tables=table([d[1] for d in decodes]),
            decode_context_lens=self._tensor([d[0] for d in decodes], torch.int32),
            max_decode_context_len=max((d[0] for d in decodes), default=0),
            prefill_cu_seqlens=self._tensor([0] + [p[0] + p[1] for p in prefills], torch.int32),
            prefill_context_lens=self._tensor([p[2] for p in prefills], torch.int32),
            prefill_block_tables=prefill_tables,
            max_prefill_query_len=max((p[1] for p in prefills), default=0),
            token_seq_slots=self._tensor(token_slots, torch.int32),
            prefill_seq_slots=self._tensor([p[4] for p in prefills], torch.int32),
            decode_seq_slots=self._tensor([d[2] for d in decodes], torch.int32))

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs, table = self.block_size, seq.block_table
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    # --- CUDA graphs ----------------------------------------------------------------------------------
    def _max_graph_batch(self) -> int:
        sizes = [b for b in self.engine_config.cuda_graph_batch_sizes if b <= self.engine_config.max_num_seqs]
        return sizes[-1] if sizes else 0

    def _run_decode_graph(self, decodes: list[Sequence]) -> StepOutput:
        n = len(decodes)
        padded = next(b for b in self.engine_config.cuda_graph_batch_sizes if b >= n)
        need = max(len(s.block_table) for s in decodes)
        width = min(self.max_blocks_per_seq, 1 << max(3, (need - 1).bit_length()))
        key = (padded, width)
        if key not in self.graphs:
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            self.graphs[key] = _DecodeGraph(self, padded, width)
        graph = self.graphs[key]
        logits = graph.replay(decodes)
        return StepOutput(logits[:n], decodes)


class _DecodeGraph:
    """A captured decode step for `batch_size` sequences with block tables `width` blocks wide.

    Static inputs are filled in place before each replay; padding rows write to the scratch slot (-1) and
    attend to one cached token, and their logits are dropped.
    """

    def __init__(self, runner: ModelRunner, batch_size: int, width: int):
        dev = runner.device
        self.runner = runner
        self.inputs = DecodeInputs(batch_size, width, dev)  # one pinned staging buffer, one copy per replay
        t = self.inputs.device
        meta = AttentionMetadata(t["slots"], 0, [], t["tables"], t["lens"], width * runner.block_size,
                                 token_seq_slots=t["seq_slots"], decode_seq_slots=t["seq_slots"])
        self.batch = ForwardBatch(t["token_ids"], t["positions"], meta, t["mask"])
        model = runner.model
        for _ in range(2):  # warm-up: kernels compile and autotune outside capture
            model.compute_logits(model(self.batch))
        torch.cuda.synchronize(dev)
        self.graph = torch.cuda.CUDAGraph()
        # Graphs are captured lazily, while the worker serves. A garbage collection inside the capture
        # runs finalizers there: one that frees a CUDA resource (a peer cache mapped over CUDA IPC, for
        # one) is illegal under capture and aborted a decode worker. So garbage goes first and none
        # is collected during the capture; thread_local keeps other threads' CUDA calls (the KV copy
        # thread, gRPC receivers) from invalidating it.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(self.graph, pool=runner.graph_pool, capture_error_mode="thread_local"):
                self.logits = model.compute_logits(model(self.batch))
        finally:
            if gc_was_enabled:
                gc.enable()

    def replay(self, decodes: list[Sequence]) -> torch.Tensor:
        self.inputs.stage(decodes, self.runner.block_size)
        self.inputs.upload()
        self.graph.replay()
        return self.logits
