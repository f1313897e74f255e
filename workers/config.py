"""Validated configuration of a model and of the engine that serves it.

`ModelConfig` is read from a Hugging Face `config.json` (or built from a preset); `EngineConfig` holds the
scheduler and memory limits. Both are frozen: components take them in their constructors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from partita.workers.errors import ModelLoadError, UnsupportedModelError

# architecture name -> (family traits); every family is one decoder definition with switches.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"qkv_bias": None, "qk_norm": False, "moe": None},
    "MistralForCausalLM": {"qkv_bias": False, "qk_norm": False, "moe": None},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_norm": False, "moe": None},
    "Qwen3ForCausalLM": {"qkv_bias": None, "qk_norm": True, "moe": None},
    "MixtralForCausalLM": {"qkv_bias": False, "qk_norm": False, "moe": "mixtral"},
    "Qwen2MoeForCausalLM": {"qkv_bias": True, "qk_norm": False, "moe": "qwen2_moe"},
    "Qwen3MoeForCausalLM": {"qkv_bias": None, "qk_norm": True, "moe": "qwen3_moe"},
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of one decoder-only model.

    moe_layers: indices of the layers whose FFN is a mixture of experts (empty for dense models).
    moe_style: routing flavour: "mixtral" (softmax, top-k, renormalise), "qwen2_moe" (optional
        renormalisation, shared expert with a sigmoid gate) or "qwen3_moe".
    rope_scaling: the checkpoint's rope parameters beyond theta ({"rope_type": "llama3", ...}) or None.
    eos_token_ids: ids that end generation, from generation_config.json or config.json.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    dtype: str = "bfloat16"
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    moe_style: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ModelLoadError(f"config field {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                                 f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype {self.dtype!r} is not supported; use one of {DTYPES}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        if self.moe_layers:
            if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ModelLoadError(f"MoE config needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) "
                                     f"<= num_experts ({self.num_experts})")
            if self.moe_intermediate_size <= 0:
                raise ModelLoadError("MoE config needs a positive moe_intermediate_size")
        elif self.intermediate_size <= 0:
            raise ModelLoadError(f"intermediate_size must be positive, got {self.intermediate_size}")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def with_overrides(self, **kwargs: Any) -> "ModelConfig":
        return replace(self, **kwargs)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], name: str = "model") -> "ModelConfig":
        """Builds the config from a parsed Hugging Face config.json (transformers 4.x and 5.x spellings)."""
        archs = hf.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        traits = ARCHITECTURES[arch]
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            num_layers = int(hf["num_hidden_layers"])
            vocab = int(hf["vocab_size"])
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing required field {e.args[0]!r}") from None
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)) or 10000.0)
        legacy = hf.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        qkv_bias = traits["qkv_bias"] if traits["qkv_bias"] is not None else bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        if arch.startswith("Qwen"):
            if hf.get("use_sliding_window"):
                raise UnsupportedModelError(f"{arch} with use_sliding_window=true is not supported")
            sliding = None
        moe_style = traits["moe"]
        num_experts = int(hf.get("num_local_experts", hf.get("num_experts", 0)) or 0) if moe_style else 0
        moe_layers: tuple[int, ...] = ()
        if moe_style == "mixtral":
            moe_layers = tuple(range(num_layers))
        elif moe_style:
            step = int(hf.get("decoder_sparse_step", 1) or 1)
            dense_only = set(hf.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16").replace("torch.", "")
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(hf.get("intermediate_size", 0) or 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=traits["qk_norm"],
            sliding_window=int(sliding) if sliding else None,
            dtype=dtype if dtype in DTYPES else "bfloat16",
            num_experts=num_experts,
            num_experts_per_tok=int(hf.get("num_experts_per_tok", 0) or 0) if moe_style else 0,
            moe_intermediate_size=(int(hf.get("moe_intermediate_size") or hf.get("intermediate_size") or 0)
                                   if moe_style else 0),
            norm_topk_prob=True if moe_style == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=(int(hf.get("shared_expert_intermediate_size", 0) or 0)
                                             if moe_style == "qwen2_moe" else 0),
            moe_layers=moe_layers,
            moe_style=moe_style,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        """Reads `config.json` and, where present, the eos ids of `generation_config.json`."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ModelLoadError(f"model directory {path!r} does not exist")
        if not os.path.isfile(cfg_path):
            raise ModelLoadError(f"{path!r} has no config.json")
        hf = _read_json(cfg_path)
        config = cls.from_hf_dict(hf, name=os.path.basename(os.path.normpath(path)))
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            eos = _read_json(gen_path).get("eos_token_id")
            if eos is not None:
                config = replace(config, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
        return config


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class EngineConfig:
    """Scheduler and memory limits of one engine.

    block_size: tokens per KV-cache block.
    max_num_seqs: sequences in one batch at most.
    max_num_batched_tokens: token budget of one step (prefill chunks plus decodes), Sarathi-Serve style.
    max_model_len: prompt plus output tokens at most; defaults to the model's max_position_embeddings.
    enable_chunked_prefill: split long prompts across steps; when off, a prompt is prefilled whole.
    gpu_memory_utilization: share of the GPU's memory this engine may use (weights, activations, KV).
    kv_cache_memory_bytes: KV budget in bytes; overrides gpu_memory_utilization (the default on CPU: 1 GiB).
    num_kv_blocks: exact KV block count; overrides both budgets (tests use it to force preemption).
    enforce_eager: never capture CUDA graphs.
    cuda_graph_batch_sizes: decode batch sizes captured as CUDA graphs (larger batches run eagerly).
    seed: seed of the random weights of a preset model and of unseeded sampling.
    """

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_chunked_prefill: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_kv_blocks: int | None = None
    enforce_eager: bool = False
    cuda_graph_batch_sizes: tuple[int, ...] = field(
        default_factory=lambda: (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256))
    seed: int = 0

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "kv_cache_memory_bytes", "num_kv_blocks"):
            positive(name)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(self.cuda_graph_batch_sizes))))
