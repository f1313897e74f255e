"""Offline decode throughput of partita against Hugging Face transformers, on one GPU.

For each model shape (random bf16 weights) and batch size: partita's output tokens/s over a whole generate
call, its steady decode step time, that step time against the weight-streaming roofline (bytes a decode step
must read / the device copy bandwidth measured in this run), and HF transformers' `generate` tokens/s
measured in the same run. Prints a markdown table last.

    python benchmarks/offline_throughput.py --models llama3-8b qwen3-30b-a3b --batch-sizes 1 32 128
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from partita.workers import Engine, EngineConfig, SamplingParams
from partita.workers.presets import get_preset


def copy_bandwidth(device: torch.device, size_bytes: int = 2**30) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size_bytes / statistics.median(times)


def decode_bytes(engine: Engine, batch: int, context: int, experts_per_layer: float) -> int:
    """Bytes one decode step must read: every weight except the embedding table (batch rows of it), only the
    `experts_per_layer` routed experts of each MoE layer, and the KV cache of every sequence."""
    cfg = engine.model_config
    model = engine.runner.model
    total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("embed_tokens") and not cfg.tie_word_embeddings:
            nbytes = batch * cfg.hidden_size * p.element_size()
        elif ".experts." in name:
            nbytes = 0
        total += nbytes
    for block in model.moe_blocks():
        per_expert = (block.experts.w13[0].numel() + block.experts.w2[0].numel()) * block.experts.w13.element_size()
        total += int(experts_per_layer * per_expert)
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.runner.model.embed_tokens.weight.element_size()
    return total + batch * context * kv


def active_experts_per_step(engine: Engine, batch: int) -> float:
    """Expected distinct experts a decode step of `batch` tokens touches per MoE layer, routing uniformly."""
    cfg = engine.model_config
    if not cfg.is_moe:
        return 0.0
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch) if batch > 1 else k


def run_partita(engine: Engine, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(10, engine.model_config.vocab_size - 10, (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for warm in (True, False):
        for i, p in enumerate(prompts):
            engine.add_request(f"b{batch}-{warm}-{i}", p, params)
        step_times, num_out = [], 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if outs and all(o.num_output_tokens > 1 for o in outs) and len(outs) == batch:
                step_times.append(dt)
            num_out += sum(len(o.new_token_ids) for o in outs)
        elapsed = time.perf_counter() - start
    step = statistics.median(step_times)
    return {"tok_s": num_out / elapsed, "step_s": step, "decode_tok_s": batch / step}


def run_hf(config_name: str, batch: int, prompt_len: int, new_tokens: int, device: torch.device) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = get_preset(config_name)
    hf_cfg = _hf_config(cfg)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_cfg), dtype=torch.bfloat16).eval()
    ids = torch.randint(10, cfg.vocab_size - 10, (batch, prompt_len), device=device)
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids[:, :16], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    n = (out.shape[1] - prompt_len) * batch
    del model
    return n / elapsed


def _hf_config(cfg) -> dict:
    d = dict(model_type={"LlamaForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3_moe"}[cfg.architecture],
             vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
             max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    d["rope_parameters"] = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    if cfg.is_moe:
        d.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                 moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen3-30b-a3b"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-new-tokens", type=int, default=64, help="tokens per HF generate (HF is slow)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    args = ap.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = []
    for name in args.models:
        engine = Engine(name, device="cuda", dtype="bfloat16", config=EngineConfig(
            max_model_len=args.prompt_len + args.new_tokens + 16, max_num_seqs=max(args.batch_sizes),
            gpu_memory_utilization=0.85))
        for batch in args.batch_sizes:
            r = run_partita(engine, batch, args.prompt_len, args.new_tokens, seed=batch)
            context = args.prompt_len + args.new_tokens // 2
            nbytes = decode_bytes(engine, batch, context, active_experts_per_step(engine, batch))
            r.update(model=name, batch=batch, bytes=nbytes, roofline_s=nbytes / bandwidth)
            r["roofline_frac"] = r["roofline_s"] / r["step_s"]
            rows.append(r)
            print(json.dumps(r), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        if not args.skip_hf:
            for r in [r for r in rows if r["model"] == name]:
                r["hf_tok_s"] = run_hf(name, r["batch"], args.prompt_len, args.hf_new_tokens, device)
                r["vs_hf"] = r["tok_s"] / r["hf_tok_s"]
                print(json.dumps(r), flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": rows}, f, indent=1)
    print(f"\ndevice: {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"prompt {args.prompt_len}, output {args.new_tokens} tokens (HF: {args.hf_new_tokens})\n")
    print("| model | batch | partita tok/s | decode step ms | roofline ms | roofline frac | HF tok/s | x HF |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tok_s']:.0f} | {r['step_s'] * 1e3:.2f} | "
              f"{r['roofline_s'] * 1e3:.2f} | {r['roofline_frac']:.0%} | {r.get('hf_tok_s', float('nan')):.1f} | "
              f"{r.get('vs_hf', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
