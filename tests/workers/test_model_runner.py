"""ModelRunner's start-up compile pass (`_compile_kernels`): its dummy steps write nothing a request can see.

The pass runs on CUDA only (it exists to compile Triton kernels); here its steps run on the CPU through the
same model, attention backends and metadata, in the middle of serving, where a stray write into a block or a
kivi2 residual would change the tokens that follow.
"""
import pytest
import torch

from partita.workers import Engine, EngineConfig, SamplingParams

PROMPTS = [[(3 * i + 5 * j) % 400 + 2 for j in range(n)] for i, n in enumerate((5, 40, 77))]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def run(engine: Engine, compile_after: int | None) -> dict[str, list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        if steps == compile_after:
            engine.runner._compile_kernels()
    return tokens


@pytest.mark.parametrize("model,kv_format", [("tiny-llama", "none"), ("tiny-moe", "int4"), ("tiny-llama", "kivi2")])
def test_compile_pass_leaves_requests_alone(model, kv_format, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    config = EngineConfig(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=48)
    expected = run(Engine(model, device="cpu", kv_format=kv_format, config=config), None)
    for after in (2, 5):  # mid-prefill (chunks of 48 tokens), then while decoding
        assert run(Engine(model, device="cpu", kv_format=kv_format, config=config), after) == expected
