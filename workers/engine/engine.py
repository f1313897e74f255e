"""The engine: requests in, tokens out, one scheduler step at a time.

`add_request` validates and queues; `step` schedules a batch, runs the model, samples, applies stop rules
and returns the outputs of that step; `abort` drops a request and frees its blocks at once. The engine is
synchronous and not thread-safe: serving layers drive it from one thread.

Prefill/decode disaggregation (issue 9) adds two sides. Prefill: `add_request(..., prefill_only=True)`
prefills as usual and samples the first token, then parks the sequence with its blocks (`Status.HELD`)
instead of decoding it, until `release_prefilled` (the KV moved elsewhere) or `resume_prefilled` (colocated
decode as the fallback); `stream_kv` lets the migration code export each layer's KV during the step that
completes such a prefill, right after that layer's attention wrote it. Decode: `reserve_migrated` allocates blocks and a sequence slot for a prompt
without computing it, the migration code writes the KV into them, and `commit_migrated` appends the first
token and lets the scheduler decode from there; `abort_reserved` frees them. `workers/kv_migration.py`
moves the bytes.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from partita.workers.attention.selector import make_backend, parse_kv_format
from partita.workers.config import EngineConfig, ModelConfig
from partita.workers.engine.block_manager import BlockManager
from partita.workers.engine.model_runner import ModelRunner
from partita.workers.engine.outputs import EngineStats, RequestOutput
from partita.workers.engine.sampler import SampleRequest, sample
from partita.workers.engine.scheduler import Scheduler
from partita.workers.engine.sequence import Sequence, Status
from partita.workers.errors import InvalidRequestError, KvCapacityError, ModelLoadError
from partita.workers.presets import PRESETS
from partita.workers.sampling_params import SamplingParams
from partita.workers.tokenizer import IncrementalDetokenizer, Tokenizer, byte_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    emitted_chars: int = 0
    pending_logprobs: list[dict] | None = None
    prefill_only: bool = False


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's dtype on CUDA and float32 on CPU (where bf16 matmuls are slow)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        return _DTYPES[config.dtype] if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def resolve_model(model: str | ModelConfig) -> tuple[ModelConfig, str | None]:
    """A preset name, a ModelConfig (random weights) or a checkpoint directory -> (config, checkpoint dir)."""
    if isinstance(model, ModelConfig):
        return model, None
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a checkpoint directory, a preset name or a ModelConfig, got {model!r}")
    if model in PRESETS:
        return PRESETS[model], None
    if os.path.isdir(model):
        return ModelConfig.from_dir(model), model
    raise ModelLoadError(f"model {model!r} is neither a directory nor a preset ({', '.join(PRESETS)})")


class Engine:
    def __init__(self, model: str | ModelConfig = "tiny-llama", device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", kv_format: str = "auto", config: EngineConfig | None = None,
                 tokenizer: Tokenizer | None = None):
        self.config = config or EngineConfig()
        model_config, checkpoint = resolve_model(model)
        fmt = parse_kv_format(kv_format, model_config.head_dim)
        if self.config.block_size % fmt.block_multiple():
            log.info("kv_format %s stores blocks of a multiple of %d tokens: block_size %d -> %d", fmt.name,
                     fmt.block_multiple(), self.config.block_size, fmt.block_multiple())
            self.config = dataclasses.replace(self.config, block_size=fmt.block_multiple())
        self.kv_format = fmt
        self.model_config = model_config
        self.model_name = model if isinstance(model, str) else model_config.name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, model_config, self.device)
        self.max_model_len = self.config.max_model_len or model_config.max_position_embeddings
        if self.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{model_config.max_position_embeddings}")
        if tokenizer is None:
            tokenizer = (Tokenizer.from_dir(checkpoint, model_config.eos_token_ids) if checkpoint
                         else byte_tokenizer(model_config.eos_token_ids))
        self.tokenizer = tokenizer
        self.eos_token_ids = set(model_config.eos_token_ids or tokenizer.eos_token_ids)
        backend = make_backend(fmt, model_config, self.device, self.dtype, self.config.block_size, self.max_model_len,
                               self.config.max_num_seqs)
        self.runner = ModelRunner(model_config, self.config, self.device, self.dtype, checkpoint, self.max_model_len,
                                  backend)
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill:
            budget = max(budget, self.max_model_len)
        self.blocks = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.max_num_seqs)
        self.scheduler = Scheduler(self.blocks, self.config.max_num_seqs, budget, self.config.enable_chunked_prefill)
        self.requests: dict[str, _Request] = {}
        self._reserved: dict[str, Sequence] = {}  # reservations awaiting migrated KV (decode side)
        self._kv_streams: dict[str, Callable[[Sequence, int], None]] = {}  # stream_kv observers (prefill side)
        self._on_held: dict[str, Callable[[Sequence], None]] = {}  # on_held observers (prefill side)
        self._on_scheduled: dict[str, Callable[[Sequence], None]] = {}  # on_scheduled observers (prefill side)
        self._aborted: list[RequestOutput] = []
        self._arrival = itertools.count()
        self._generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, kv_format %s (%s attention)",
                 self.model_name, self.device, self.dtype, self.runner.num_blocks, self.config.block_size, fmt.name,
                 backend.name)

    # --- requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    prefill_only: bool = False) -> None:
        """Queues a request; raises InvalidRequestError naming the bad field, leaving the engine unchanged.

        prefill_only: after the first token the request is held with its KV instead of decoded (module doc);
        a first token that already finishes it (stop, max_tokens=1) finishes it as usual."""
        params = SamplingParams() if params is None else params
        seq = self._new_sequence(request_id, prompt, params)
        self.requests[request_id] = self._new_request(seq)
        self.requests[request_id].prefill_only = prefill_only
        self.scheduler.add(seq)

    def _new_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id", f"must be a non-empty string, got {request_id!r}")
        if request_id in self.requests or request_id in self._reserved:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"must be SamplingParams, got {type(params).__name__}")
        token_ids = self._prompt_ids(prompt)
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{len(token_ids)} tokens leave no room to generate within "
                                                f"max_model_len={self.max_model_len}")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError("max_tokens", f"prompt ({len(token_ids)} tokens) + max_tokens "
                                                    f"({params.max_tokens}) exceeds max_model_len={self.max_model_len}")
        return Sequence(request_id, list(token_ids), len(token_ids), params, next(self._arrival))

    def _new_request(self, seq: Sequence) -> _Request:
        params = seq.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        detok = IncrementalDetokenizer.start(self.tokenizer, seq.token_ids[:seq.num_prompt_tokens],
                                             params.skip_special_tokens)
        return _Request(seq, detok, generator)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            vocab = self.model_config.vocab_size
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise InvalidRequestError("prompt", f"token id at index {i} ({t!r}) is not in [0, {vocab})")
            ids = list(prompt)
        else:
            raise InvalidRequestError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        return ids

    def abort(self, request_id: str) -> bool:
        """Drops a request and frees its blocks now; its final output (finish_reason 'abort') comes from the
        next step(). Returns False for an unknown or finished request."""
        req = self.requests.pop(request_id, None)
        self._kv_streams.pop(request_id, None)
        self._on_held.pop(request_id, None)
        self._on_scheduled.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req.seq, "abort")
        self._aborted.append(RequestOutput(request_id, [], "", True, "abort", req.seq.num_prompt_tokens,
                                           req.seq.num_output_tokens))
        return True

    # --- prefill/decode disaggregation ----------------------------------------------------------------
    def prefilled_sequence(self, request_id: str) -> Sequence:
        """The held sequence of a prefill-only request whose first token was sampled (its KV is exportable)."""
        req = self.requests.get(request_id)
        if req is None or req.seq.status is not Status.HELD:
            raise InvalidRequestError("request_id", f"{request_id!r} is not a prefilled request held for migration")
        return req.seq

    def stream_kv(self, request_id: str, on_layer: Callable[[Sequence, int], None]) -> None:
        """Calls on_layer(seq, layer) on this thread right after each layer's attention wrote its KV, in the
        step that completes the prefill of `request_id` (a queued prefill-only request): then the whole
        prompt's KV of that layer is in the cache while later layers still compute."""
        self._check_queued_prefill_only(request_id)
        self._kv_streams[request_id] = on_layer

    def on_held(self, request_id: str, observer: Callable[[Sequence], None]) -> None:
        """Calls observer(seq) on this thread in the step that samples the first token of `request_id` (a queued
        prefill-only request) and holds it, before that step returns its outputs: the migration can start on the
        held KV there, rather than once the first token has reached the event loop and a call queued from there
        has waited for the next step to end. Not called when the first token ends the request, nor after an
        abort. The observer must not raise."""
        self._check_queued_prefill_only(request_id)
        self._on_held[request_id] = observer

    def on_scheduled(self, request_id: str, observer: Callable[[Sequence], None]) -> None:
        """Calls observer(seq) on this thread in the step that first schedules the prefill of `request_id` (a
        queued prefill-only request), before its forward pass: work that the prefill's end waits for (the
        decode worker's reservation) can start then and run beside it, for requests about to be computed only,
        not for every queued one. Not called after an abort. The observer must not raise."""
        self._check_queued_prefill_only(request_id)
        self._on_scheduled[request_id] = observer

    def _check_queued_prefill_only(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or not req.prefill_only or req.seq.num_computed_tokens:
            raise InvalidRequestError("request_id", f"{request_id!r} is not a queued prefill-only request")

    def _layer_hook(self, batch) -> Callable[[int], None] | None:
        """The hook of this step's stream_kv observers whose prefill it completes (None: the usual step)."""
        done = [(seq, self._kv_streams.pop(seq.request_id)) for seq, n in batch.prefills
                if seq.request_id in self._kv_streams and seq.num_computed_tokens + n == seq.num_prompt_tokens]
        if not done:
            return None
        return lambda layer: [on_layer(seq, layer) for seq, on_layer in done]

    def release_prefilled(self, request_id: str) -> None:
        """Drops a held prefilled request (its KV now lives elsewhere) and frees its blocks; no output follows."""
        seq = self.prefilled_sequence(request_id)
        del self.requests[request_id]
        self.scheduler.finish(seq, "migrated")

    def resume_prefilled(self, request_id: str) -> None:
        """Decodes a held prefilled request here after all (the fallback when its migration failed)."""
        seq = self.prefilled_sequence(request_id)
        self.requests[request_id].prefill_only = False
        self.scheduler.resume(seq)

    def reserve_migrated(self, request_id: str, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        """Allocates blocks and a sequence slot for a prompt whose KV will be written by migration; nothing is
        computed. Raises InvalidRequestError for bad input, KvCapacityError when there is no room now."""
        params = SamplingParams() if params is None else params
        seq = self._new_sequence(request_id, prompt, params)
        n = seq.num_prompt_tokens
        if not self.scheduler.has_seq_room():
            raise KvCapacityError(f"no free sequence slot for {request_id!r}: {len(self.scheduler.running)} "
                                  f"running and {len(self.scheduler.held)} held of max_num_seqs="
                                  f"{self.config.max_num_seqs}")
        if not self.blocks.can_allocate(seq, n):
            raise KvCapacityError(f"{request_id!r} needs {self.blocks.blocks_needed(seq, n)} KV blocks for {n} "
                                  f"tokens, {self.blocks.num_free_blocks} free")
        self.blocks.allocate(seq, n)
        self.scheduler.hold(seq)
        self._reserved[request_id] = seq
        return seq

    def commit_migrated(self, request_id: str, first_token: int, params: SamplingParams | None = None) -> None:
        """Starts decoding a reservation whose KV is in place: its prompt counts as computed and
        `first_token` (sampled by the prefill side) is appended, so the next step decodes after it.
        Raises InvalidRequestError when there is no such reservation or the first token ends the request
        (the prefill side finishes such requests itself)."""
        seq = self._reserved.get(request_id)
        if seq is None:
            raise InvalidRequestError("request_id", f"{request_id!r} has no reservation")
        if params is not None:
            seq.params = params
        if isinstance(first_token, bool) or not isinstance(first_token, int) \
                or not 0 <= first_token < self.model_config.vocab_size:
            raise InvalidRequestError("first_token_id", f"{first_token!r} is not in [0, {self.model_config.vocab_size})")
        p = seq.params
        if (not p.ignore_eos and first_token in self.eos_token_ids) or first_token in p.stop_token_ids \
                or p.max_tokens <= 1 or seq.num_prompt_tokens + p.max_tokens > self.max_model_len:
            raise InvalidRequestError("first_token_id", f"{request_id!r} has nothing left to decode after its first "
                                                        f"token (stop token, max_tokens or max_model_len)")
        del self._reserved[request_id]
        seq.token_ids.append(first_token)
        seq.num_computed_tokens = seq.num_prompt_tokens
        req = self._new_request(seq)
        req.detok.add([first_token])
        hold = max(len(s) for s in p.stop) - 1 if p.stop else 0
        req.emitted_chars = max(0, len(req.detok.text) - hold)  # what the prefill side showed already
        self.requests[request_id] = req
        self.scheduler.resume(seq)

    def abort_reserved(self, request_id: str) -> bool:
        """Frees a reservation's blocks and slot; False when there is none (committed, aborted or unknown)."""
        seq = self._reserved.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.num_free_blocks,
                           self.blocks.num_blocks, self.blocks.usage, self.scheduler.num_preemptions)

    # --- steps ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return outputs
        if self._on_scheduled:
            for seq, _ in batch.prefills:
                observer = self._on_scheduled.pop(seq.request_id, None)
                if observer is not None:
                    observer(seq)
        step = self.runner.run(batch, self._layer_hook(batch) if self._kv_streams else None)
        for seq, n in batch.prefills:
            seq.num_computed_tokens += n
        for seq in batch.decodes:
            seq.num_computed_tokens += 1
        if not step.sampled:
            return outputs
        rows = [SampleRequest(s.params, self.requests[s.request_id].generator, s.token_ids) for s in step.sampled]
        results = sample(step.logits, rows, self._generator)
        for seq, result in zip(step.sampled, results):
            outputs.append(self._append_token(seq, result))
        if self._on_held:
            for seq in step.sampled:
                observer = self._on_held.pop(seq.request_id, None)
                if observer is not None and seq.status is Status.HELD:
                    observer(seq)
        return outputs

    def _append_token(self, seq: Sequence, result) -> RequestOutput:
        req = self.requests[seq.request_id]
        token = result.token_id
        seq.token_ids.append(token)
        params = seq.params
        req.detok.add([token])
        reason = None
        if not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            req.detok.flush()
        text = req.detok.text
        stop_at = _find_stop(text, params.stop, req.emitted_chars)
        if stop_at is not None:
            text, reason = text[:stop_at], "stop"
        hold = 0 if reason or not params.stop else max(len(s) for s in params.stop) - 1
        visible = max(req.emitted_chars, len(text) - hold)
        delta = text[req.emitted_chars:visible]
        req.emitted_chars = visible
        logprobs = None
        if params.logprobs is not None:
            logprobs = [{"token_id": token, "logprob": result.logprob, "top": result.top_logprobs or {}}]
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        elif req.prefill_only:
            self.scheduler.hold(seq)
        return RequestOutput(seq.request_id, [token], delta, reason is not None, reason, seq.num_prompt_tokens,
                             seq.num_output_tokens, logprobs)


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop string starts in the not-yet-final tail of text, or None."""
    if not stops:
        return None
    start = max(0, emitted - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
