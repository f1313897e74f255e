"""Picks the next token of each sampled row from float32 logits.

Greedy rows take the argmax. Other rows apply repetition penalty, temperature, top-k, top-p and min-p, then
draw by the exponential-race trick (argmax of p / q with q ~ Exp(1)), each seeded request drawing its noise
from its own generator so that its tokens do not depend on the batch it ran in. Logprobs are those of the
model's distribution after the repetition penalty and before temperature and truncation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from partita.workers.sampling_params import SamplingParams


@dataclass
class SampleRequest:
    """One row to sample: its parameters, its generator (seeded requests) and the ids it has seen."""

    params: SamplingParams
    generator: torch.Generator | None
    seen_token_ids: list[int]


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


def sample(logits: torch.Tensor, rows: list[SampleRequest], generator: torch.Generator | None = None
           ) -> list[SampleResult]:
    """logits: [N, V] float32, one row per entry of `rows` -> one result per row."""
    if all(r.params.is_greedy and r.params.logprobs is None and r.params.repetition_penalty == 1.0 for r in rows):
        return [SampleResult(t) for t in logits.argmax(dim=-1).tolist()]
    logits = _apply_repetition_penalty(logits, rows)
    logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
    greedy = torch.tensor([r.params.is_greedy for r in rows], device=logits.device)
    temperature = torch.tensor([1.0 if r.params.is_greedy else r.params.temperature for r in rows],
                               device=logits.device, dtype=torch.float32)
    scaled = _truncate(logits / temperature[:, None], rows)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    drawn = (probs / noise).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn).tolist()
    results = [SampleResult(t) for t in tokens]
    if logprobs is not None:
        for i, r in enumerate(rows):
            if r.params.logprobs is None:
                continue
            results[i].logprob = float(logprobs[i, tokens[i]])
            if r.params.logprobs:
                top = torch.topk(logprobs[i], r.params.logprobs)
                results[i].top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist()))
    return results


def _apply_repetition_penalty(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    if all(r.params.repetition_penalty == 1.0 for r in rows):
        return logits
    logits = logits.clone()
    for i, r in enumerate(rows):
        penalty = r.params.repetition_penalty
        if penalty == 1.0 or not r.seen_token_ids:
            continue
        ids = torch.tensor(sorted(set(r.seen_token_ids)), device=logits.device)
        seen = logits[i, ids]
        logits[i, ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _truncate(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    """Masks tokens outside each row's top-k, top-p nucleus and min-p floor to -inf."""
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    min_p = [r.params.min_p for r in rows]
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p) and all(m <= 0.0 for m in min_p):
        return logits
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)[None, :]
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)[:, None]
    drop = ranks >= k
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
    floor = torch.tensor(min_p, device=device)[:, None] * sorted_probs[:, :1]
    drop |= sorted_probs < floor
    drop[:, 0] = False  # the most likely token always survives
    mask = torch.zeros_like(drop).scatter(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))
