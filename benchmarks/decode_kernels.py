"""Decode-step kernels on one GPU: small_m_linear vs cuBLAS, and the small fused kernels vs torch.

    python benchmarks/decode_kernels.py [--ms 1 2 4 8 16 32] [--shapes qkv o gate_up down lm_head]
                                        [--sweep] [--out DIR]

Order: device facts; correctness of every kernel against its reference on this GPU (failures are
reported and marked in the tables); device-to-device copy bandwidth (bytes read + written); then for each
Llama-3-8B weight shape and M, cuBLAS (F.linear) and small_m_linear (tuned by linear.benchmark_configs,
with and without programmatic dependent launch), each timed as a CUDA graph of >= 40 calls that rotate
among enough weight copies (>= 320 MB) that L2 never holds the weight being read; TB/s counts the
weight's bytes only. --sweep also prints every candidate config's time. Then rms_norm / silu_and_mul /
apply_rotary at T = 1 and 32 against their eager torch references, each as a CUDA graph of 100 calls
(per-call µs: the launch floor shows). Last, one decoder layer minus attention (8 kernels) as a graph of
8 layers over 4 weight sets, torch vs these kernels, against the layer's weight-streaming roofline.
A markdown table comes last; --out DIR also gets results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from partita.kernels import linear
from partita.kernels.activation import silu_and_mul, silu_and_mul_reference
from partita.kernels.linear import small_m_linear
from partita.kernels.rmsnorm import rms_norm, rms_norm_reference
from partita.kernels.rotary import apply_rotary, apply_rotary_reference

# Llama-3-8B weight shapes (N, K).
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
DTYPE = torch.bfloat16
ROTATE_BYTES = 320 << 20  # weight copies per shape add up to at least this (L2 is 50-60 MB)
MIN_CALLS = 40


def graph_us(fns, calls: int, replays: int = 10) -> float:
    """Median µs per call of a CUDA graph that calls fns round-robin `calls` times."""
    return linear.graph_time_us(fns, calls, replays)


def copy_bandwidth_tbs() -> float:
    src = torch.randn(1 << 29, device="cuda", dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e12


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_all(log, pdl: bool) -> bool:
    """Each kernel vs its reference on this GPU, at Llama shapes and awkward ones; True if all pass."""
    ok = True

    def report(name, err, tol):
        nonlocal ok
        passed = err < tol
        ok &= passed
        log(f"check {name}: rel err {err:.2e} (tol {tol:.0e}) {'ok' if passed else 'FAIL'}")

    dev = "cuda"
    for M in (1, 3, 16):
        x = torch.randn(M, 4096, device=dev, dtype=DTYPE)
        w = torch.randn(4096, 4096, device=dev, dtype=DTYPE) * 4096 ** -0.5
        ref = x.double() @ w.double().T
        for config in linear.configs(M, DTYPE):
            try:
                y = small_m_linear(x, w, config=config, pdl=pdl)
            except Exception as e:  # a config that cannot compile here is reported, not fatal
                log(f"check linear M={M} {config}: cannot run ({type(e).__name__}: {str(e)[:80]})")
                continue
            report(f"linear M={M} {config}", rel_err(y, ref), 1e-2)
    for M, N, K, dtype in ((1, 37, 100, torch.bfloat16), (3, 1000, 4100, torch.float16), (16, 77, 333, DTYPE),
                           (33, 64, 96, DTYPE), (5, 50, 70, torch.float32)):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
        b = torch.randn(N, device=dev, dtype=dtype)
        y = small_m_linear(x, w, b, config=linear.default_config(M, N, K, dtype), pdl=pdl)  # no tuning
        report(f"linear awkward M={M} N={N} K={K} {dtype}", rel_err(y, x.double() @ w.double().T + b.double()),
               1e-5 if dtype == torch.float32 else 1e-2)
    for T, H in ((1, 4096), (32, 4096), (7, 1000)):
        x = torch.randn(T, H, device=dev, dtype=DTYPE)
        r = torch.randn(T, H, device=dev, dtype=DTYPE)
        w = torch.randn(H, device=dev, dtype=DTYPE)
        out, res = rms_norm(x, w, 1e-5, r, pdl=pdl)
        ref_out, ref_res = rms_norm_reference(x, w, 1e-5, r)
        report(f"rms_norm T={T} H={H} (residual_out bit-exact: {torch.equal(res, ref_res)})",
               rel_err(out, ref_out) + (0 if torch.equal(res, ref_res) else 1), 2e-3)
        mismatched = (out != ref_out).float().mean().item()
        log(f"  rms_norm T={T}: fraction of elements not bit-identical to the reference {mismatched:.2e}")
    for T, I in ((1, 14336), (32, 14336), (5, 333)):
        x = torch.randn(T, 2 * I, device=dev, dtype=DTYPE) * 3
        out, ref = silu_and_mul(x, pdl=pdl), silu_and_mul_reference(x)
        report(f"silu_and_mul T={T} I={I}", rel_err(out, ref), 2e-3)
        log(f"  silu_and_mul T={T}: not bit-identical {(out != ref).float().mean().item():.2e}")
    cos_sin = torch.randn(8192, 128, device=dev)
    for T, dtype in ((1, DTYPE), (32, DTYPE), (5, DTYPE), (5, torch.float16), (5, torch.float32)):
        qkv = torch.randn(T, 6144, device=dev, dtype=dtype)
        qkv_ref = qkv.clone()
        pos = torch.randint(0, 8192, (T,), device=dev)
        views = [(t[:, :4096].view(T, 32, 128), t[:, 4096:5120].view(T, 8, 128)) for t in (qkv, qkv_ref)]
        x0 = qkv.clone()
        apply_rotary(*views[0], pos, cos_sin, pdl=pdl)
        apply_rotary_reference(*views[1], pos, cos_sin)
        exact = torch.equal(qkv, qkv_ref)
        report(f"apply_rotary T={T} {dtype} (bit-exact: {exact})", rel_err(qkv, qkv_ref), 1e-3)
        if not exact:  # which rounding differs? compare with emulations that skip one
            x = x0[:, :5120].view(T, 40, 128).float()
            for round_cs, round_prod in ((False, True), (True, False)):
                cs = cos_sin[pos][:, None, :]
                cs = cs.to(dtype).float() if round_cs else cs
                r = (lambda v: v.to(dtype).float()) if round_prod else (lambda v: v)
                c, s_, x1, x2 = cs[..., :64], cs[..., 64:], x[..., :64], x[..., 64:]
                emu = torch.cat(((r(x1 * c) - r(x2 * s_)).to(dtype), (r(x2 * c) + r(x1 * s_)).to(dtype)), -1)
                log(f"  rotary emulation round_cos={round_cs} round_products={round_prod}: "
                    f"equal to kernel {(emu == qkv[:, :5120].view(T, 40, 128)).float().mean().item():.3f}")
    return ok


def pdl_works(log) -> bool:
    """Programmatic dependent launch inside a captured graph, checked against the reference."""
    try:
        x = torch.randn(1, 4096, device="cuda", dtype=DTYPE)
        ws = [torch.randn(4096, 4096, device="cuda", dtype=DTYPE) * 0.02 for _ in range(2)]
        cfg = linear.default_config(1, 4096, 4096, DTYPE)
        graph = torch.cuda.CUDAGraph()
        small_m_linear(x, ws[0], config=cfg, pdl=True)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            y = small_m_linear(x, ws[0], config=cfg, pdl=True)
            z = small_m_linear(y, ws[1], config=cfg, pdl=True)
        graph.replay()
        torch.cuda.synchronize()
        err = rel_err(z, (x.double() @ ws[0].double().T).to(DTYPE).double() @ ws[1].double().T)
        log(f"PDL in a CUDA graph: works, chained rel err {err:.2e}")
        return err < 1e-2
    except Exception as e:  # noqa: BLE001 - report and time without PDL
        log(f"PDL in a CUDA graph FAILED: {type(e).__name__}: {e}")
        return False


def bench_linear(name, N, K, Ms, sweep, log, rows, pdl):
    nbytes = N * K * 2
    copies = max(2, math.ceil(ROTATE_BYTES / nbytes))
    weights = [torch.randn(N, K, device="cuda", dtype=DTYPE) * K ** -0.5 for _ in range(copies)]
    calls = copies * math.ceil(MIN_CALLS / copies)
    for M in Ms:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        cublas = graph_us([lambda w=w: F.linear(x, w) for w in weights], calls)
        row = {"shape": name, "N": N, "K": K, "M": M, "cublas_us": cublas, "cublas_tbs": nbytes / cublas / 1e6}
        if M <= linear.MAX_M:
            t0 = time.time()
            results = linear.benchmark_configs(M, N, K, DTYPE, "cuda", weight=weights[0], pdl=pdl)
            results.sort(key=lambda r: r[1])
            config = results[0][0]
            linear.set_config(M, N, K, DTYPE, "cuda", config, pdl=pdl)
            if sweep:
                for c, us in results:
                    log(f"  sweep {name} M={M} {c}: {us:.1f} us")
            err = rel_err(small_m_linear(x, weights[1], pdl=pdl), x.double() @ weights[1].double().T)
            ours = graph_us([lambda w=w: small_m_linear(x, w, pdl=pdl) for w in weights], calls)
            no_pdl = graph_us([lambda w=w: small_m_linear(x, w, config=config, pdl=False) for w in weights], calls)
            row.update(ours_us=ours, ours_tbs=nbytes / ours / 1e6, no_pdl_us=no_pdl, config=str(config), err=err,
                       tune_s=time.time() - t0)
        rows.append(row)
        log(f"{name} N={N} K={K} M={M}: " + ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k not in ("N", "K")))
    del weights
    torch.cuda.empty_cache()


def _layer_weights(n_sets):
    """n_sets of one Llama-3-8B decoder layer's weights (norm weights, qkv, o, gate_up, down)."""
    def w(n, k):
        return torch.randn(n, k, device="cuda", dtype=DTYPE) * k ** -0.5
    return [{"ln1": 1 + 0.1 * torch.randn(4096, device="cuda", dtype=DTYPE), "qkv": w(6144, 4096),
             "o": w(4096, 4096), "ln2": 1 + 0.1 * torch.randn(4096, device="cuda", dtype=DTYPE),
             "gate_up": w(28672, 4096), "down": w(4096, 14336)} for _ in range(n_sets)]


def layer_chain(ops, W, h, res, pos, cos_sin):
    """One decoder layer minus attention (o_proj reads q's slice in its place): 8 kernels."""
    T = h.shape[0]
    a, res = ops["rms_norm"](h, W["ln1"], 1e-5, res)
    qkv = ops["linear"](a, W["qkv"])
    q, k = qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128)
    ops["rotary"](q, k, pos, cos_sin)
    o = ops["linear"](qkv[:, :4096], W["o"])
    a, res = ops["rms_norm"](o, W["ln2"], 1e-5, res)
    return ops["linear"](ops["silu"](ops["linear"](a, W["gate_up"])), W["down"]), res


def chain_ops(kind):
    if kind == "torch":
        return {"rms_norm": rms_norm_reference, "linear": F.linear, "rotary": apply_rotary_reference,
                "silu": silu_and_mul_reference}
    pdl = kind == "triton+pdl"
    return {"rms_norm": lambda *a: rms_norm(*a, pdl=pdl), "linear": lambda x, w: small_m_linear(x, w, pdl=pdl),
            "rotary": lambda *a: apply_rotary(*a, pdl=pdl), "silu": lambda x: silu_and_mul(x, pdl=pdl)}


def bench_chain(Ts, log, rows, pdl):
    """µs per layer for a graph of 8 layer chains over 4 weight sets (1.7 GB: L2 holds none of it)."""
    sets = _layer_weights(4)
    layer_bytes = sum(v.nbytes for v in sets[0].values())
    cos_sin = torch.randn(8192, 128, device="cuda")
    for T in Ts:
        h0 = torch.randn(T, 4096, device="cuda", dtype=DTYPE)
        r0 = torch.randn(T, 4096, device="cuda", dtype=DTYPE)
        pos = torch.randint(0, 8192, (T,), device="cuda")
        for name, shape in (("qkv", (6144, 4096)), ("o", (4096, 4096)), ("gate_up", (28672, 4096)),
                            ("down", (4096, 14336))):
            config = linear.warmup(T, *shape, DTYPE, "cuda", weight=sets[0][name], pdl=pdl)
            linear.set_config(T, *shape, DTYPE, "cuda", config, pdl=False)  # same tiles without PDL
        outs = {}
        for kind in ("torch", "triton+pdl", "triton") if pdl else ("torch", "triton"):
            ops = chain_ops(kind)
            state = {}

            def run_layers(n, ops=ops, state=state):
                h, r = h0, r0
                for i in range(n):
                    h, r = layer_chain(ops, sets[i % len(sets)], h, r, pos, cos_sin)
                state["out"] = h
            us = graph_us([lambda: run_layers(8)], 1) / 8
            run_layers(2)  # eager
            outs[kind] = state["out"].clone()
            rows.append({"chain": kind, "T": T, "us_per_layer": us, "layer_bytes": layer_bytes})
            log(f"layer chain T={T} {kind}: {us:.1f} us/layer = {layer_bytes / us / 1e6:.2f} TB/s of weights")
        for kind in ("triton+pdl", "triton") if pdl else ("triton",):
            log(f"  chain check T={T} {kind} vs torch after 2 layers: rel err {rel_err(outs[kind], outs['torch']):.2e}")
    del sets
    torch.cuda.empty_cache()


def bench_small(log, rows, pdl):
    dev = "cuda"
    cos_sin = torch.randn(8192, 128, device=dev)
    for T in (1, 32):
        x = torch.randn(T, 4096, device=dev, dtype=DTYPE)
        r = torch.randn(T, 4096, device=dev, dtype=DTYPE)
        w = torch.randn(4096, device=dev, dtype=DTYPE)
        g = torch.randn(T, 2 * 14336, device=dev, dtype=DTYPE)
        qkv = torch.randn(T, 6144, device=dev, dtype=DTYPE)
        q, k = qkv[:, :4096].view(T, 32, 128), qkv[:, 4096:5120].view(T, 8, 128)
        pos = torch.randint(0, 8192, (T,), device=dev)
        cases = {
            "rms_norm+residual": (lambda: rms_norm(x, w, 1e-5, r, pdl=pdl),
                                  lambda: rms_norm_reference(x, w, 1e-5, r)),
            "silu_and_mul": (lambda: silu_and_mul(g, pdl=pdl), lambda: silu_and_mul_reference(g)),
            "apply_rotary": (lambda: apply_rotary(q, k, pos, cos_sin, pdl=pdl),
                             lambda: apply_rotary_reference(q, k, pos, cos_sin)),
        }
        for name, (kernel, reference) in cases.items():
            ours, ref = graph_us([kernel], 100), graph_us([reference], 100)
            rows.append({"kernel": name, "T": T, "ours_us": ours, "torch_us": ref})
            log(f"{name} T={T}: triton {ours:.2f} us, torch {ref:.2f} us (graph of 100)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", action="store_true", help="print every candidate config's time")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for results.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    def log(msg):
        print(msg, flush=True)

    props = torch.cuda.get_device_properties(0)
    os.system("nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,"
              "temperature.gpu --format=csv")
    log(f"device: {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; "
        f"torch {torch.__version__}, triton {__import__('triton').__version__}")
    pdl = pdl_works(log)
    if not args.skip_check:
        t0 = time.time()
        checks_ok = check_all(log, pdl)
        log(f"checks {'passed' if checks_ok else 'FAILED (timing anyway)'} in {time.time() - t0:.0f} s")
    copy_tbs = copy_bandwidth_tbs()
    log(f"device-to-device copy: {copy_tbs:.2f} TB/s (read + write)")
    linear_rows, small_rows = [], []
    for name in args.shapes:
        bench_linear(name, *SHAPES[name], args.ms, args.sweep, log, linear_rows, pdl)
    bench_small(log, small_rows, pdl)
    chain_rows = []
    bench_chain([1, 8], log, chain_rows, pdl)
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"device": props.name, "copy_tbs": copy_tbs, "linear": linear_rows, "small": small_rows,
                       "chain": chain_rows}, f,
                      indent=1)
    if not args.skip_check and not checks_ok:
        print("\n**CORRECTNESS CHECKS FAILED: see the log above**")
    print(f"\n### {props.name}: copy {copy_tbs:.2f} TB/s; weight TB/s = N*K*2 B / time (CUDA graph, L2-cold); "
          f"small_m with PDL: {pdl}\n")
    print("| shape (N, K) | M | cuBLAS µs | cuBLAS TB/s | small_m µs | small_m TB/s | /copy | speedup "
          "| no-PDL µs | config |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in linear_rows:
        if "ours_us" not in r:
            continue
        c = r["config"].replace("LinearConfig", "").replace("kernel=", "").replace("block_", "").replace("num_", "")
        print(f"| {r['shape']} ({r['N']}, {r['K']}) | {r['M']} | {r['cublas_us']:.1f} | {r['cublas_tbs']:.2f} | "
              f"{r['ours_us']:.1f} | {r['ours_tbs']:.2f} | {r['ours_tbs'] / copy_tbs:.2f} | "
              f"{r['cublas_us'] / r['ours_us']:.2f} | {r['no_pdl_us']:.1f} | {c} |")
    print("\n| kernel | T | Triton µs | torch eager µs | speedup |\n| --- | --- | --- | --- | --- |")
    for r in small_rows:
        print(f"| {r['kernel']} | {r['T']} | {r['ours_us']:.2f} | {r['torch_us']:.2f} | "
              f"{r['torch_us'] / r['ours_us']:.1f} |")
    roof_us = chain_rows[0]["layer_bytes"] / copy_tbs / 1e6 if chain_rows else 0
    print(f"\n| layer minus attention (8 kernels) | T | µs/layer | weight TB/s | roofline {roof_us:.1f} µs / this |")
    print("| --- | --- | --- | --- | --- |")
    for r in chain_rows:
        print(f"| {r['chain']} | {r['T']} | {r['us_per_layer']:.1f} | {r['layer_bytes'] / r['us_per_layer'] / 1e6:.2f} "
              f"| {roof_us / r['us_per_layer']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
