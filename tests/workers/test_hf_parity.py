"""Greedy generation of every family matches Hugging Face transformers token for token.

The reference is transformers' own implementation of each architecture, on a tiny random checkpoint that
transformers saved; partita loads the checkpoint from disk like any other.
"""
import random

import pytest

from partita.workers import LLM, SamplingParams

from .hf_models import FAMILIES, hf_greedy, make_checkpoint

NEW_TOKENS = 32
MODES = {
    "chunked": dict(max_num_batched_tokens=24, enable_chunked_prefill=True),
    "whole-prompts": dict(enable_chunked_prefill=False),
    # 14 blocks of 8 tokens cannot hold four sequences of up to 110 tokens at once: preemption must happen.
    "preemption": dict(block_size=8, num_kv_blocks=14, max_num_batched_tokens=64, max_model_len=112),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {f: make_checkpoint(f, str(root / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random()
    return [[rng.randrange(2, 320) for _ in range(n)] for n in (5, 17, 40, 77)]


@pytest.fixture(scope="module")
def references(checkpoints, prompts):
    return {f: hf_greedy(path, prompts, NEW_TOKENS) for f, path in checkpoints.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, mode, checkpoints, prompts, references):
    llm = LLM(checkpoints[family], device="cpu", dtype="float32", **{"max_model_len": 256, **MODES[mode]})
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out, ref in zip(prompts, outs, references[family]):
        assert out.token_ids == ref, f"{family}/{mode}: prompt of {len(prompt)} tokens diverged"
        assert out.finish_reason == "length"
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked"
    if mode == "preemption":
        assert stats.num_preemptions > 0
