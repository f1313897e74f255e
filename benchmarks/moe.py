"""Fused MoE benchmark: partita.kernels.fused_moe against torch, on one CUDA GPU.

For each expert shape (Qwen3-30B-A3B: E=128, K=8, H=2048, I=768; Mixtral-8x7B: E=8, K=2,
H=4096, I=14336) and token count T, with random top-k routing (distinct experts per token):
  - checks fused_moe against fused_moe_reference (relative Frobenius error),
  - times with triton.testing.do_bench (median; L2 flushed between runs): fused_moe called
    eagerly, fused_moe replayed from a CUDA graph (what the engine's decode runs), the torch
    reference (loop over experts in fp32: the CPU path, upcasts each used expert's weights) and a
    plain bf16 torch loop over experts (the usual eager baseline),
  - reports GB/s of expert weights read (distinct experts used x bytes per expert, over the graph
    time) against a device-to-device copy measured in the same run (bytes read + written, the
    convention of DESIGN.md's ceilings), and TFLOP/s (6 * T * K * H * I).
Prints a markdown table. Usage: python benchmarks/moe.py [--tokens 1 8 32 128 1024] [--shapes ...]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import triton
import triton.testing

import partita.kernels.fused_moe as fm

# name -> (num_experts, top_k, hidden_size, inter_size)
SHAPES = {
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}


def copy_bandwidth_gbs(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second, in GB/s."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * num_bytes / ms / 1e6


def torch_bf16_loop(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Eager baseline in the input dtype: one pass per used expert, like Hugging Face's MoE blocks."""
    inter_size = w2.shape[2]
    out = torch.zeros_like(hidden)
    token_of_pair = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(topk_ids.shape[1])
    flat_ids, flat_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    for expert in flat_ids.unique().tolist():
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = token_of_pair[pairs]
        gate_up = hidden[tokens] @ w13[expert].t()
        act = torch.nn.functional.silu(gate_up[:, :inter_size]) * gate_up[:, inter_size:]
        out.index_add_(0, tokens, (act @ w2[expert].t()) * flat_weights[pairs, None].to(hidden.dtype))
    return out


def make_weights(shape: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H], w2 [E, H, I], scaled so that activations stay of order one."""
    num_experts, _, hidden_size, inter_size = SHAPES[shape]
    w13 = torch.randn(num_experts, 2 * inter_size, hidden_size, device="cuda", dtype=dtype) / hidden_size**0.5
    w2 = torch.randn(num_experts, hidden_size, inter_size, device="cuda", dtype=dtype) / inter_size**0.5
    return w13, w2


def make_inputs(shape: str, num_tokens: int, weights: tuple[torch.Tensor, torch.Tensor]) -> tuple:
    """(hidden, w13, w2, topk_weights, topk_ids) with softmax top-k routing, renormalised."""
    num_experts, top_k, hidden_size, _ = SHAPES[shape]
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", dtype=weights[0].dtype)
    scores = torch.randn(num_tokens, num_experts, device="cuda")
    topk_weights, topk_ids = scores.softmax(dim=-1).topk(top_k, dim=-1)
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return (hidden, *weights, topk_weights, topk_ids.to(torch.int32))


def graph_of(fn) -> tuple:
    """Capture fn() (already warmed up) in a CUDA graph; return (replay, the captured output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def tuning_log(kernel) -> list[str]:
    """The autotuner's timings of its last tuning run, best first (empty if none was kept)."""
    timings = getattr(kernel, "configs_timings", None) or {}
    ranked = sorted(timings.items(), key=lambda item: item[1][0] if isinstance(item[1], list) else item[1])
    return [f"    {config}: {t}" for config, t in ranked]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_case(shape: str, num_tokens: int, weights, args) -> tuple[dict, list[str]]:
    """One table row, and the autotuner's log for it."""
    inputs = make_inputs(shape, num_tokens, weights)
    hidden, w13, w2, topk_weights, topk_ids = inputs
    num_experts, top_k, hidden_size, inter_size = SHAPES[shape]
    start = time.time()
    out = fm.fused_moe(*inputs)  # autotunes on the first call per key
    torch.cuda.synchronize()
    tune_s = time.time() - start
    log = [f"  {shape} T={num_tokens}: first call {tune_s:.1f} s",
           f"   gate_up best {fm._gate_up_kernel.best_config}", *tuning_log(fm._gate_up_kernel),
           f"   down best {fm._down_kernel.best_config}", *tuning_log(fm._down_kernel)]
    ref = fm.fused_moe_reference(*inputs)
    replay, graph_out = graph_of(lambda: fm.fused_moe(*inputs))
    replay()
    torch.cuda.synchronize()
    err = max(rel_error(out, ref), rel_error(graph_out, ref))
    bench = lambda fn: triton.testing.do_bench(fn, return_mode="median") * 1e3  # noqa: E731 (us)
    row = {"shape": shape, "T": num_tokens, "err": err,
           "eager_us": bench(lambda: fm.fused_moe(*inputs)), "graph_us": bench(replay)}
    if not args.skip_torch:
        row["ref_us"] = bench(lambda: fm.fused_moe_reference(*inputs))
        row["loop_us"] = bench(lambda: torch_bf16_loop(*inputs))
    used = topk_ids.unique().numel()
    expert_bytes = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    row["used"] = used
    row["weight_mb"] = used * expert_bytes / 1e6
    row["gbs"] = used * expert_bytes / row["graph_us"] / 1e3
    row["tflops"] = 6 * num_tokens * top_k * hidden_size * inter_size / row["graph_us"] / 1e6
    return row, log


def table_header(copy_gbs: float, device: str) -> str:
    return "\n".join([
        f"device: {device}; D2D copy {copy_gbs:.0f} GB/s (read+write); torch {torch.__version__}, "
        f"triton {triton.__version__}; times are do_bench medians in us", "",
        "| shape | T | experts used | weights MB | err | eager | graph | torch ref (fp32) | torch bf16 loop "
        "| graph GB/s | % copy BW | TFLOP/s | loop / graph |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"])


def table_row(r: dict, copy_gbs: float) -> str:
    ref = f"{r['ref_us']:.1f}" if "ref_us" in r else "-"
    loop = f"{r['loop_us']:.1f}" if "loop_us" in r else "-"
    speedup = f"{r['loop_us'] / r['graph_us']:.1f}x" if "loop_us" in r else "-"
    return (f"| {r['shape']} | {r['T']} | {r['used']} | {r['weight_mb']:.0f} | {r['err']:.1e} "
            f"| {r['eager_us']:.1f} | {r['graph_us']:.1f} | {ref} | {loop} | {r['gbs']:.0f} "
            f"| {100 * r['gbs'] / copy_gbs:.0f}% | {r['tflops']:.1f} | {speedup} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 128, 1024])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--skip-torch", action="store_true", help="time fused_moe only")
    parser.add_argument("--max-err", type=float, default=2e-2, help="fail above this relative error")
    parser.add_argument("--tuning-log", help="write the autotuner's per-config timings to this file")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/moe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    print(table_header(copy_gbs, device), flush=True)
    for shape in args.shapes:
        weights = make_weights(shape, dtype)
        for num_tokens in args.tokens:
            row, log = bench_case(shape, num_tokens, weights, args)
            rows.append(row)
            print(table_row(row, copy_gbs), flush=True)
            if args.tuning_log:  # appended as we go: a run cut short still leaves its log
                with open(args.tuning_log, "a") as f:
                    f.write("\n".join(log) + "\n")
        del weights
        torch.cuda.empty_cache()
    table = "\n".join([table_header(copy_gbs, device)] + [table_row(r, copy_gbs) for r in rows])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    bad = [r for r in rows if not r["err"] < args.max_err]
    for r in bad:
        print(f"FAIL {r['shape']} T={r['T']}: relative error {r['err']:.2e} > {args.max_err}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
