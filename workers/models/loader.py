"""Fills a DecoderModel from a Hugging Face checkpoint directory, or with seeded random weights.

Checkpoint names are mapped onto partita's fused parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj,
per-expert matrices -> the stacked expert slots) and handed to each parameter's shard-aware weight_loader.
Every parameter must be covered exactly once; anything else is a ModelLoadError naming the tensor.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any, Iterator

import torch
from safetensors import safe_open
from torch import nn

from partita.workers.errors import ModelLoadError
from partita.workers.models.decoder import DecoderModel

# Tensors that some checkpoints carry but the model recomputes.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attn\.bias)$")
_EXPERT = re.compile(r"^(layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_PART = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
                "down_proj": ("w2", None), "w2": ("w2", None)}
_FUSED = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
          ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint: those of `model.safetensors.index.json`, or the lone file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: {e!r}") from None
        files = sorted({os.path.join(path, name) for name in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {', '.join(map(os.path.basename, missing))}")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{path!r} has no *.safetensors weights (only safetensors checkpoints are loaded)")
    return files


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot read {file}: {e}") from None


def _target(name: str) -> tuple[str, Any]:
    """Checkpoint tensor name -> (partita parameter name, shard id)."""
    name = name.removeprefix("model.")
    m = _EXPERT.match(name)
    if m:
        layer, expert, part = m.group(1), int(m.group(2)), m.group(3)
        if part not in _EXPERT_PART:
            raise ModelLoadError(f"unexpected expert tensor {name}")
        param, half = _EXPERT_PART[part]
        return f"{layer}.mlp.experts.{param}", (expert if half is None else (expert, half))
    name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
    for src, dst, shard_id in _FUSED:
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard_id
    return name, None


def load_checkpoint(model: DecoderModel, path: str) -> None:
    """Loads every tensor of the checkpoint at `path` into `model` (on the model's device and dtype)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = _expected_pieces(model)
    seen: set[tuple[str, Any]] = set()
    for name, tensor in iter_checkpoint(path):
        if _IGNORED.search(name):
            continue
        target, shard_id = _target(name)
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {name} has no place in {model.config.architecture}")
        param = params[target]
        param.hf_name = name
        with torch.no_grad():
            param.weight_loader(param, tensor.to(param.dtype), shard_id)
        seen.add((target, shard_id))
    if model.config.tie_word_embeddings:
        seen.add(("lm_head.weight", None))
    elif ("lm_head.weight", None) not in seen and ("embed_tokens.weight", None) in seen:
        raise ModelLoadError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
    missing = sorted(f"{n}{'' if s is None else f'[{s}]'}" for n, s in expected - seen)
    if missing:
        raise ModelLoadError(f"checkpoint {path!r} lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}")


def _expected_pieces(model: DecoderModel) -> set[tuple[str, Any]]:
    """Every (parameter, shard id) a complete checkpoint provides."""
    config = model.config
    pieces: set[tuple[str, Any]] = set()
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.endswith("experts.w13"):
            pieces |= {(name, (e, h)) for e in range(config.num_experts) for h in (0, 1)}
        elif name.endswith("experts.w2"):
            pieces |= {(name, e) for e in range(config.num_experts)}
        elif ".qkv_proj." in name:
            pieces |= {(name, s) for s in ("q", "k", "v")}
        elif ".gate_up_proj." in name:
            pieces |= {(name, s) for s in (0, 1)}
        else:
            pieces.add((name, None))
    return pieces


def init_random(model: DecoderModel, seed: int, std: float = 0.02) -> None:
    """Seeded random weights: normal(0, std) matrices, unit norms; the same seed gives the same model."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.device.type == "cpu":
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            else:
                # Drawing on the GPU keeps start-up fast for 8B-30B benchmark models.
                gpu_gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                param.normal_(0.0, std, generator=gpu_gen)


def count_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
