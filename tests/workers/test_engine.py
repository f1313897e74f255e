"""Engine behaviour on CPU with the tiny presets: errors, aborts, stop rules, seeds, checkpoint problems."""
import json
import os
import shutil

import pytest
import torch

from partita.workers import (LLM, Engine, EngineConfig, InvalidRequestError, ModelLoadError, SamplingParams,
                             UnsupportedModelError)

from .hf_models import make_checkpoint


@pytest.fixture(scope="module")
def engine():
    return Engine("tiny-llama", device="cpu", config=EngineConfig(max_model_len=128, block_size=8))


def drain(engine, limit=500):
    outs = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert not engine.has_unfinished()
    return outs


@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt"),
    ("", SamplingParams(), "prompt"),
    ([1, 2, 10_000], SamplingParams(), "prompt"),
    ([1, "x"], SamplingParams(), "prompt"),
    (3.5, SamplingParams(), "prompt"),
    ([5] * 128, SamplingParams(), "prompt"),
    ([5] * 100, SamplingParams(max_tokens=40), "max_tokens"),
    ([5, 6], {"max_tokens": 3}, "sampling_params"),
])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine, prompt, params, field):
    engine.add_request("ok", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0))
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("bad", prompt, params)
    assert e.value.field == field
    outs = drain(engine)
    assert list(outs) == ["ok"] and outs["ok"][-1].finish_reason == "length"
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_duplicate_request_id_is_refused(engine):
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    assert e.value.field == "request_id"
    drain(engine)


def test_abort_frees_blocks_at_once_and_reports_abort(engine):
    engine.add_request("a", list(range(2, 60)), SamplingParams(max_tokens=50))
    engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()
    used = engine.stats().num_total_blocks - engine.stats().num_free_blocks
    assert engine.abort("a") and not engine.abort("a") and not engine.abort("nope")
    assert engine.stats().num_total_blocks - engine.stats().num_free_blocks < used
    outs = drain(engine)
    assert outs["a"][-1].finish_reason == "abort" and outs["b"][-1].finish_reason == "length"
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_stop_token_ids_eos_and_stop_strings(engine):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.add_request("free", [9, 10, 11], greedy)
    free = drain(engine)["free"]
    ids = [t for o in free for t in o.new_token_ids]
    text = "".join(o.text_delta for o in free)
    engine.add_request("tok", [9, 10, 11], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[ids[3]]))
    tok = drain(engine)["tok"]
    got = [t for o in tok for t in o.new_token_ids]
    assert got == ids[:ids.index(ids[3]) + 1] and tok[-1].finish_reason == "stop"
    visible = text.replace("\ufffd", "")
    if len(visible) >= 6:
        stop = visible[2:4]
        engine.add_request("str", [9, 10, 11], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                               stop=[stop]))
        out = drain(engine)["str"]
        streamed = "".join(o.text_delta for o in out)
        assert stop not in streamed and out[-1].finish_reason == "stop"
        assert text.startswith(streamed)


def test_eos_ends_generation():
    llm = LLM("tiny-llama", device="cpu", max_model_len=64)
    free = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    eos = free.token_ids[2]
    engine = Engine("tiny-llama", device="cpu", config=EngineConfig(max_model_len=64))
    engine.eos_token_ids = {eos}
    engine.add_request("e", [9, 10, 11], SamplingParams(max_tokens=10, temperature=0.0))
    out = [t for o in drain(engine)["e"] for t in o.new_token_ids]
    assert out == free.token_ids[:free.token_ids.index(eos) + 1]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    llm = LLM("tiny-moe", device="cpu", max_model_len=64)
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    alone = llm.generate([[3, 4, 5]], p)[0].token_ids
    batched = llm.generate([[8, 8, 8, 8], [3, 4, 5], [9]], [SamplingParams(max_tokens=12), p,
                                                            SamplingParams(max_tokens=5)])[1].token_ids
    assert alone == batched


def test_text_prompts_and_streamed_text_round_trip():
    llm = LLM("tiny-llama", device="cpu", max_model_len=64)
    out = llm.generate("héllo", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("héllo")
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_kv_capacity_is_checked_against_max_model_len():
    with pytest.raises(Exception, match="max_model_len"):
        Engine("tiny-llama", device="cpu", config=EngineConfig(max_model_len=256, block_size=8, num_kv_blocks=4))


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="kv_format"):
        Engine("tiny-llama", device="cpu", kv_format="int3")
    with pytest.raises(ValueError, match="dtype"):
        Engine("tiny-llama", device="cpu", dtype="int8")
    with pytest.raises(ModelLoadError, match="neither a directory nor a preset"):
        Engine("/no/such/model", device="cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint("llama", str(tmp_path_factory.mktemp("ck") / "llama"))


def broken_copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture_is_named(llama_dir, tmp_path):
    d = broken_copy(llama_dir, tmp_path, "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        Engine(str(d), device="cpu")


def test_malformed_config_and_missing_pieces(llama_dir, tmp_path):
    d = broken_copy(llama_dir, tmp_path, "bad-json")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine(str(d), device="cpu")
    d = broken_copy(llama_dir, tmp_path, "no-hidden")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        Engine(str(d), device="cpu")
    d = broken_copy(llama_dir, tmp_path, "missing-shard")
    shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]
    os.remove(d / shard)
    with pytest.raises(ModelLoadError, match="missing"):
        Engine(str(d), device="cpu")
    d = broken_copy(llama_dir, tmp_path, "no-tokenizer")
    os.remove(d / "tokenizer.json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Engine(str(d), device="cpu")


def test_wrong_shapes_and_missing_tensors_are_named(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = broken_copy(llama_dir, tmp_path, "wrong-shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape"):
        Engine(str(d), device="cpu")
    d = broken_copy(llama_dir, tmp_path, "dropped")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.k_proj.weight"
    file = d / index["weight_map"][name]
    tensors = load_file(str(file))
    del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="qkv_proj"):
        Engine(str(d), device="cpu")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(llama_dir, dtype):
    ref = LLM(llama_dir, device="cpu", dtype="float32", max_model_len=64)
    low = LLM(llama_dir, device="cpu", dtype=dtype, max_model_len=64)
    assert low.engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = ref.generate([[5, 9, 13, 40]], p)[0].token_ids
    b = low.generate([[5, 9, 13, 40]], p)[0].token_ids
    assert a[0] == b[0]  # later tokens may drift at half precision on a random model
