"""The engine over every KV format (`LLM(..., kv_format=F)`), on CPU through the kernels' torch references.

Per format, greedy output must not depend on scheduling: whole prompts, chunked prefill (8-token budget)
and forced preemption (a cache too small for the batch) give the same tokens, since each token's K/V is
quantized once, on write, and prefill reads its own tokens back from the pages as decode later does.
kivi2 is the exception by design: a unit of R tokens is quantized when it fills, so a prompt prefilled
whole sees its own completed units quantized where token-by-token decode saw them in full precision.
Greedy agreement with the unquantized (float32 model, float32 cache) run is printed per format, up to the
first difference of each sequence (random tiny models have near-tied logits, so it is informative, not a
claim about trained models); only none and int8 have floors.
"""
import pytest
import torch

from partita.workers import LLM, SamplingParams
from partita.workers.attention.selector import make_backend, parse_kv_format
from partita.workers.presets import PRESETS

FORMATS = ["none", "fp8", "int8", "int4", "int4:group_size=32", "kivi2"]
PROMPTS = [[(7 * i + 3 * j) % 500 + 2 for j in range(5 + 9 * i)] for i in range(5)]  # 5..41 tokens
GREEDY = SamplingParams(max_tokens=36, temperature=0.0, ignore_eos=True)


def _generate(model: str, kv_format: str, **engine_kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(model, device="cpu", kv_format=kv_format, max_model_len=96, **engine_kwargs)
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)], llm


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions equal up to each pair's first difference (later tokens follow other contexts)."""
    same = 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / sum(len(x) for x in a)


@pytest.fixture(scope="module")
def bf16_reference() -> dict[str, list[list[int]]]:
    return {m: _generate(m, "auto")[0] for m in ("tiny-llama", "tiny-moe")}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-moe"])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_format_is_schedule_invariant(model, kv_format, bf16_reference):
    whole, llm = _generate(model, kv_format, enable_chunked_prefill=False, max_num_batched_tokens=256)
    chunked, _ = _generate(model, kv_format, max_num_batched_tokens=8)
    preempted, small = _generate(model, kv_format, num_kv_blocks=6)
    assert small.engine.scheduler.num_preemptions > 0
    if kv_format == "kivi2":  # which tokens a query sees quantized depends on chunking, by design (module doc)
        print(f"kivi2 agreement: chunked {_agreement(chunked, whole):.3f}, preempted {_agreement(preempted, whole):.3f}")
    else:
        assert chunked == whole
        assert preempted == whole
    for engine in (llm.engine, small.engine):  # every block and sequence slot returned
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        assert len(engine.blocks.free_seq_slots) == engine.config.max_num_seqs
    agree = _agreement(whole, bf16_reference[model])
    print(f"\n{model} kv_format={kv_format}: greedy agreement with the bf16 cache {agree:.3f}")
    assert all(len(t) == GREEDY.max_tokens for t in whole)
    if kv_format in ("none", "int8"):
        assert agree >= (1.0 if kv_format == "none" else 0.5)


def test_backend_choice():
    cfg = PRESETS["tiny-llama"]
    cpu = torch.device("cpu")
    assert make_backend(parse_kv_format("auto", 64), cfg, cpu, torch.float32, 16, 128, 4).name == "torch"
    assert make_backend(parse_kv_format("int4", 64), cfg, cpu, torch.float32, 16, 128, 4).name == "kernel"
    assert parse_kv_format("int4", 64).group_size == 64  # default groups never span heads
    assert parse_kv_format("int4:group_size=32", 64).group_size == 32


@pytest.mark.parametrize("kv_format, words", [
    ("int3", "kv_format='int3': unknown"),
    ("int4:group_size=48", "group_size=48"),
    ("int4:bits", "is not key=value"),
    (4, "kv_format must be a string"),
])
def test_bad_kv_format_is_named(kv_format, words):
    with pytest.raises(ValueError, match="kv_format") as err:
        LLM("tiny-llama", device="cpu", kv_format=kv_format)
    assert words in str(err.value)


def test_quantized_formats_refuse_sliding_window():
    cfg = PRESETS["tiny-llama"].__class__(**{**PRESETS["tiny-llama"].__dict__, "sliding_window": 64,
                                             "architecture": "MistralForCausalLM"})
    with pytest.raises(ValueError, match="sliding-window"):
        LLM(cfg, device="cpu", kv_format="int8", max_model_len=256)
    LLM(cfg, device="cpu", kv_format="int8", max_model_len=64)  # the window covers the whole context
    LLM(cfg, device="cpu", kv_format="none", max_model_len=256)  # torch backend: windows work


def test_kivi2_rounds_block_size_up():
    llm = LLM("tiny-llama", device="cpu", kv_format="kivi2", block_size=16)
    assert llm.engine.config.block_size == 32
