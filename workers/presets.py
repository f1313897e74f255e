"""Model shapes that need no checkpoint: random weights drawn from a seed (demos, benchmarks, tests)."""
from __future__ import annotations

from partita.workers.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048,
        dtype="float32", eos_token_ids=(1,), bos_token_id=0, name="tiny-llama"),
    "tiny-moe": ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048,
        qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
        moe_layers=(0, 1), moe_style="qwen3_moe", dtype="float32", eos_token_ids=(1,), bos_token_id=0,
        name="tiny-moe"),
    "llama3-8b": ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=8192, dtype="bfloat16", eos_token_ids=(128001, 128009), bos_token_id=128000,
        name="llama3-8b"),
    "qwen3-30b-a3b": ModelConfig(
        architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, qk_norm=True, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, moe_layers=tuple(range(48)), moe_style="qwen3_moe",
        dtype="bfloat16", eos_token_ids=(151645, 151643), name="qwen3-30b-a3b"),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
