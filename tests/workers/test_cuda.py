"""The CUDA path: graphs replay the same tokens as eager steps, and CUDA matches transformers."""
import pytest
import torch

from partita.workers import LLM, SamplingParams

from .hf_models import hf_greedy, make_checkpoint

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-moe"])
def test_cuda_graph_decode_equals_eager(model):
    prompts = [[5 + i] * (3 + 7 * i) for i in range(5)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    kw = dict(device="cuda", dtype="float32", max_model_len=256, gpu_memory_utilization=0.1)
    graphs = LLM(model, **kw).generate(prompts, params)
    eager = LLM(model, enforce_eager=True, **kw).generate(prompts, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_moe", "mixtral"])
def test_cuda_matches_transformers(family, tmp_path):
    path = make_checkpoint(family, str(tmp_path / family))
    prompts = [[7, 8, 9, 10, 11], list(range(20, 61))]
    ref = hf_greedy(path, prompts, 24)
    out = LLM(path, device="cuda", dtype="float32", max_model_len=128, gpu_memory_utilization=0.1).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
