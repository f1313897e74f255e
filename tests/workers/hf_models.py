"""Tiny random checkpoints of every supported family, written with transformers' save_pretrained."""
from __future__ import annotations

import os

import torch

FAMILIES = {
    "llama": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-tied": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=48),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=24),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, head_dim=16),
}


def make_checkpoint(family: str, path: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    """Saves a 2-layer random model of `family` (safetensors, sharded) plus a byte-level tokenizer.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from partita.workers.tokenizer import byte_tokenizer

    kwargs = dict(FAMILIES[family])
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(
        model_type, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=0, eos_token_id=1, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size="100KB")
    byte_tokenizer()._tok.save(os.path.join(path, "tokenizer.json"))
    return path


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from transformers' forward pass and its own KV cache, one prompt at a time.

    A plain argmax loop rather than `generate`, whose logits processors (min_new_tokens masks eos) would
    make the reference something other than the model's argmax.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            out = model(torch.tensor([p]), use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for _ in range(max_new_tokens - 1):
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
            outs.append(tokens)
    return outs
