"""Offline batch generation: `LLM(model).generate(prompts, params)`, the engine driven to completion."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from partita.workers.config import EngineConfig, ModelConfig
from partita.workers.engine.engine import Engine
from partita.workers.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    """A finished request: the generated text and ids, why it stopped, and logprobs if asked for."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict] | None = None


class LLM:
    """A model and its engine for offline use.

    model: a checkpoint directory, a preset name ("tiny-llama", "tiny-moe", "llama3-8b", "qwen3-30b-a3b") or
    a ModelConfig (random weights). Engine limits go through `EngineConfig` fields as keyword arguments.
    """

    def __init__(self, model: str | ModelConfig = "tiny-llama", device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", kv_format: str = "auto", **engine_kwargs):
        self.engine = Engine(model, device=device, dtype=dtype, kv_format=kv_format,
                             config=EngineConfig(**engine_kwargs))
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Generates for every prompt (text or token ids) and returns the outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        results: dict[str, CompletionOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = f"llm-{self._counter}"
                self._counter += 1
                self.engine.add_request(request_id, prompt, p)
                ids = prompt if not isinstance(prompt, str) else self.engine.tokenizer.encode(prompt)
                results[request_id] = CompletionOutput(request_id, list(ids),
                                                       logprobs=[] if p.logprobs is not None else None)
                order.append(request_id)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    res = results[out.request_id]
                    res.token_ids += out.new_token_ids
                    res.text += out.text_delta
                    if out.logprobs is not None:
                        res.logprobs += out.logprobs
                    if out.finished:
                        res.finish_reason = out.finish_reason
        except BaseException:
            for request_id in order:
                self.engine.abort(request_id)
            self.engine.step()
            raise
        return [results[r] for r in order]
