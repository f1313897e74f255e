"""Paged attention benchmark: decode per KV format against copy bandwidth and torch SDPA.

    python benchmarks/attention.py --md benchmarks/results/<date>-attention-h200.md [--sweep]

Shape: Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128, bf16), pages of 16 tokens
(kivi2: 32, its residual unit), sequences on shuffled pages, K/V written through `fmt.write`.
Each case is timed as a CUDA graph of 20 calls (which also proves the decode path capturable),
median of 5 replays; caches smaller than 256 MB are replicated and rotated so L2 (50 MB on H200)
cannot serve them.

Columns: time per call; bytes the call must read (KV pages per `fmt.bytes_per_token` plus the
kivi2 residual, queries and outputs) over time, also as a share of the copy bandwidth measured in
the same run (read + write bytes of a 2 GiB device copy, the DESIGN.md convention); speedup over
torch SDPA on a contiguous bf16 cache [B, 8, ctx, 128] (enable_gqa) and over the bf16 paged kernel.
int4 and kivi2 also run through the query-rows decode kernel (`AttentionConfig(token_rows=False)`),
the one they took before the token-rows kernels. `--sweep` adds the tiling sweeps used to choose
`attention_config` and the split heuristic.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

from partita.kernels.kv_formats import get_kv_format
from partita.kernels.kv_testing import make_paged_batch, outlier_kv, output_errors
from partita.kernels.linear import graph_time_us
from partita.kernels.paged_attention import (AttentionConfig, attention_config,
                                             choose_num_splits, decode_num_splits,
                                             paged_decode_attention, paged_prefill_attention)
from partita.kernels.paged_attention_common import combine_splits

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
SHAPES = [(1, 4096), (1, 32768), (32, 4096), (64, 8192)]  # (batch, context)
FORMATS = ["none", "fp8", "int8", "int4", "int4:group_size=64", "kivi2",
           "kivi2:value_group_size=64"]
L2_BYTES = 256 << 20


def time_graph(fn, iters: int = 20, reps: int = 5) -> float:
    """Seconds per call of `fn`, captured `iters` times in one CUDA graph (median of `reps` replays)."""
    return graph_time_us([fn], iters, reps) * 1e-6


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy, counting read + write (decode_kernels' probe: eager copies; a copy
    captured in a CUDA graph became a memcpy node that ran at only ~2.7 TB/s on the H200)."""
    from decode_kernels import copy_bandwidth_tbs  # a sibling script: benchmarks/ is sys.path[0]
    return copy_bandwidth_tbs() * 1e12


_BUILT: dict = {}


def build_cache(spec: str, batch_size: int, ctx: int, seed: int = 0):
    """A filled cache, its batch and queries for `batch_size` sequences of `ctx` tokens."""
    key = (spec, batch_size, ctx, seed)
    if key not in _BUILT:
        _BUILT[key] = _build_cache(spec, batch_size, ctx, seed)
    return _BUILT[key]


def _build_cache(spec: str, batch_size: int, ctx: int, seed: int):
    fmt = get_kv_format(spec)
    block_size = 32 if fmt.name == "kivi2" else 16
    g = torch.Generator().manual_seed(seed)
    batch = make_paged_batch([ctx] * batch_size, block_size, max_num_seqs=batch_size,
                             device="cuda", generator=g)
    g = torch.Generator(device="cuda").manual_seed(seed)
    cache = fmt.allocate(int(batch.block_tables.max()) + 1, block_size, HKV, D, DTYPE, "cuda",
                         max_num_seqs=batch_size)
    slots, seqs, _ = batch.write_plan([0] * batch_size)
    chunk = 1 << 16
    for i in range(0, len(slots), chunk):
        k, v = outlier_kv(min(chunk, len(slots) - i), HKV, D, dtype=DTYPE, device="cuda",
                          generator=g)
        if fmt.name == "fp8" and i == 0:
            fmt.calibrate(cache, k, v)
        fmt.write(cache, k, v, slots[i:i + chunk], seqs[i:i + chunk])
    q = torch.randn(batch_size, HQ, D, generator=g, device="cuda").to(DTYPE)
    return cache, batch, q


def read_bytes(cache, batch_size: int, ctx: int) -> int:
    fmt = cache.fmt
    residual = ctx % fmt.r if fmt.name == "kivi2" else 0  # full-precision rows outside pages
    kv = batch_size * ((ctx - residual) * fmt.bytes_per_token(HKV, D) + residual * HKV * D * 4)
    return int(kv + 2 * batch_size * HQ * D * 2)


def cfg_str(c: AttentionConfig) -> str:
    return (f"n{c.block_n} m{c.block_m}/{c.decode_block_m} w{c.num_warps} s{c.num_stages}"
            + (" k8" if c.k_int8 else "") + (" v8" if c.v_int8 else "")
            + ("" if c.token_rows else " query-rows") + (" pairs" if c.key_group_pairs else "")
            + (" halves" if c.tile_halves else "")
            + ("" if c.maxnreg is None else f" r{c.maxnreg}"))


def bench_decode(spec: str, batch_size: int, ctx: int, *, num_splits=None, config=None) -> dict:
    cache, batch, q = build_cache(spec, batch_size, ctx)
    nbytes = read_bytes(cache, batch_size, ctx)
    copies = [cache] + [build_cache(spec, batch_size, ctx, seed)[0]
                        for seed in range(1, math.ceil(L2_BYTES / nbytes))]
    state = {"i": 0}

    def call():
        c = copies[state["i"] % len(copies)]
        state["i"] += 1
        paged_decode_attention(q, c, batch.block_tables, batch.context_lens, D ** -0.5,
                               max_context_len=ctx, seq_slots=batch.seq_slots,
                               num_splits=num_splits, config=config)
    t = time_graph(call, iters=max(20, len(copies)))
    splits = num_splits or decode_num_splits(cache, batch_size, ctx)
    return {"kind": "decode", "format": spec, "batch": batch_size, "ctx": ctx, "time_s": t,
            "bytes": nbytes, "splits": splits,
            "config": cfg_str(config or attention_config(cache.fmt.name, D, True, splits,
                                                         -(-ctx // splits)))}


def bench_sdpa(batch_size: int, ctx: int) -> dict:
    nbytes = 2 * batch_size * HKV * ctx * D * 2
    copies = max(1, math.ceil(L2_BYTES / nbytes))
    ks = [torch.randn(batch_size, HKV, ctx, D, device="cuda", dtype=DTYPE) for _ in range(copies)]
    vs = [torch.randn_like(ks[0]) for _ in range(copies)]
    q = torch.randn(batch_size, HQ, 1, D, device="cuda", dtype=DTYPE)
    state = {"i": 0}

    def call():
        i = state["i"] % copies
        state["i"] += 1
        F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
    t = time_graph(call, iters=max(20, copies))
    return {"kind": "sdpa", "format": "sdpa-contiguous", "batch": batch_size, "ctx": ctx,
            "time_s": t, "bytes": nbytes + 2 * batch_size * HQ * D * 2}


def bench_prefill(spec: str, num_seqs: int, cached: int, new: int, *,
                  config: AttentionConfig | None = None) -> list[dict]:
    """Chunked prefill: `new` tokens per sequence over `cached` ones; Triton vs SDPA (bf16)."""
    ctx = cached + new
    cache, batch, _ = build_cache(spec, num_seqs, ctx)
    q = torch.randn(num_seqs * new, HQ, D, device="cuda", dtype=DTYPE)
    cu = torch.arange(0, num_seqs + 1, device="cuda", dtype=torch.int32) * new
    flops = 4 * num_seqs * HQ * D * (new * cached + new * (new + 1) / 2)
    t = time_graph(lambda: paged_prefill_attention(q, cache, cu, batch.context_lens,
                                                   batch.block_tables, D ** -0.5,
                                                   max_query_len=new, seq_slots=batch.seq_slots,
                                                   config=config),
                   iters=5)
    rows = [{"kind": "prefill", "format": spec, "batch": num_seqs, "ctx": ctx, "new": new,
             "time_s": t, "tflops": flops / t / 1e12,
             "config": cfg_str(config or attention_config(cache.fmt.name, D, False))}]
    if spec == "none" and config is None:
        from torch.nn.attention.bias import causal_lower_right
        qs = torch.randn(num_seqs, HQ, new, D, device="cuda", dtype=DTYPE)
        k = torch.randn(num_seqs, HQ, ctx, D, device="cuda", dtype=DTYPE)  # MHA: flash path
        v = torch.randn_like(k)
        mask = causal_lower_right(new, ctx) if cached else None
        t = time_graph(lambda: F.scaled_dot_product_attention(qs, k, v, attn_mask=mask,
                                                              is_causal=not cached), iters=5)
        rows.append({"kind": "prefill", "format": "sdpa-contiguous", "batch": num_seqs,
                     "ctx": ctx, "new": new, "time_s": t, "tflops": flops / t / 1e12})
    return rows


def query_rows_case(spec: str, batch_size: int, ctx: int) -> dict:
    """bench_decode kwargs of the query-rows kernel as int4/kivi2 decode took it before the
    token-rows kernels (2026-11-25): int4's tiling and splits, kivi2's two-warp tiles and the
    plain split heuristic."""
    if spec == "kivi2":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return {"config": AttentionConfig(num_warps=2, num_stages=3, token_rows=False),
                "num_splits": choose_num_splits(batch_size, HKV, ctx, sms)}
    splits = decode_num_splits(build_cache(spec, batch_size, ctx)[0], batch_size, ctx)
    cfg = attention_config("int4", D, True, splits, -(-ctx // splits))
    return {"config": dataclasses.replace(cfg, token_rows=False, tile_halves=False),
            "num_splits": splits}


def sweep_cases() -> list[tuple[str, int, int, dict]]:
    """(format, batch, context, bench_decode kwargs) of the tiling and split sweeps."""
    cases = []
    int8_modes = ((False, False), (True, False), (True, True))
    for bn in (32, 64, 128):
        for warps in (1, 2, 4):
            for splits in (1, 2, 4):
                cfg = AttentionConfig(block_n=bn, num_warps=warps, num_stages=3)
                cases.append(("int4", 64, 8192, {"config": cfg, "num_splits": splits}))
    for ki, vi in int8_modes[1:]:
        cfg = AttentionConfig(block_n=32, num_warps=1, num_stages=3, k_int8=ki, v_int8=vi)
        cases.append(("int4", 64, 8192, {"config": cfg, "num_splits": 2}))
    for spec in ("int4:group_size=64", "fp8", "int8"):
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    cfg = AttentionConfig(block_n=bn, num_warps=warps, num_stages=stages)
                    cases.append((spec, 64, 8192, {"config": cfg}))
    for spec, modes in (("kivi2:value_group_size=64", ((False, False), (True, False))),
                        ("kivi2", int8_modes)):
        for warps in (1, 2, 4):
            for splits in (1, 2, 4, 8):
                for ki, vi in modes:
                    cfg = AttentionConfig(num_warps=warps, num_stages=3, k_int8=ki, v_int8=vi)
                    cases.append((spec, 64, 8192, {"config": cfg, "num_splits": splits}))
    for splits in (32, 64, 128, 256):  # token-rows kivi2 at batch 1
        cfg = AttentionConfig(num_warps=1, num_stages=3, maxnreg=128)
        cases.append(("kivi2", 1, 32768, {"config": cfg, "num_splits": splits}))
    for b, ctx, splits in ((64, 8192, 4), (128, 4096, 2), (32, 4096, 8), (1, 32768, 256),
                           (1, 4096, 32)):  # kivi2 key groups one or two per loop step
        for pairs, stages in ((False, 3), (True, 2)):
            for maxnreg in (128, None):
                cfg = AttentionConfig(num_warps=1, num_stages=stages, key_group_pairs=pairs,
                                      maxnreg=maxnreg)
                cases.append(("kivi2", b, ctx, {"config": cfg, "num_splits": splits}))
    for b, ctx, splits in ((1, 4096, 16), (1, 8192, 32), (1, 32768, 64), (4, 4096, 16),
                           (8, 4096, 16)):  # int4 small batches: one or four warps, splits x1, x2
        for bn, warps in ((64, 1), (128, 4)):
            for sp in (splits, 2 * splits):
                cfg = AttentionConfig(block_n=bn, num_warps=warps, num_stages=3)
                cases.append(("int4", b, ctx, {"config": cfg, "num_splits": sp}))
    for b, ctx, splits in ((64, 8192, 2), (128, 4096, 1), (32, 4096, 4), (1, 32768, 128)):
        for halves in (False, True):  # int4 tiles whole or in two halves
            cfg = AttentionConfig(block_n=64, num_warps=1, num_stages=3, tile_halves=halves)
            cases.append(("int4", b, ctx, {"config": cfg, "num_splits": splits}))
    for b, ctx, splits in ((1, 4096, 32), (1, 8192, 64), (4, 4096, 32), (8, 4096, 32)):
        for sp in (splits // 2, splits, 2 * splits):  # kivi2 small batches: splits of 64 tokens
            cases.append(("kivi2", b, ctx, {"num_splits": sp}))
    for bn, warps in ((64, 4), (128, 4), (128, 8)):
        for splits in (16, 32, 64):
            cfg = AttentionConfig(block_n=bn, num_warps=warps, num_stages=3)
            cases.append(("none", 1, 32768, {"num_splits": splits, "config": cfg}))
    for bn, warps, stages in ((64, 4, 2), (128, 8, 3)):
        cfg = AttentionConfig(block_n=bn, num_warps=warps, num_stages=stages)
        for b, ctx in ((32, 4096), (64, 8192), (32, 8192), (128, 4096)):
            cases.append(("none", b, ctx, {"config": cfg}))
    return cases


def bench_merge(batch_size: int, splits: int) -> dict:
    """The split merge alone (`combine_splits`) on random partials of a decode launch's shape."""
    out = torch.empty(batch_size, HQ, D, device="cuda", dtype=DTYPE)
    acc = torch.randn(batch_size, HQ, splits, D, device="cuda")
    ml = torch.rand(batch_size, HQ, splits, 2, device="cuda")
    t = time_graph(lambda: combine_splits(out, acc, ml))
    return {"kind": "merge", "format": "merge", "batch": batch_size, "ctx": 0, "splits": splits,
            "time_s": t, "bytes": (acc.numel() + ml.numel()) * 4 + out.numel() * 2, "config": "-"}


def sweeps(match: str = "") -> list[dict]:
    """Run the sweep cases whose format starts with `match` (and the split merge alone, as
    `merge`); a config that fails is reported."""
    rows = []
    if "merge".startswith(match):
        rows += [bench_merge(b, splits) for b, splits in ((1, 64), (1, 128), (1, 256), (64, 2),
                                                          (64, 4), (64, 8))]
    for spec in ("none", "int4", "kivi2"):
        if not spec.startswith(match):
            continue
        for bm, bn, warps, stages in ((64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2),
                                      (128, 32, 8, 2), (64, 64, 4, 3)):
            cfg = AttentionConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            try:
                rows.extend(bench_prefill(spec, 1, 0, 4096, config=cfg))
            except Exception as e:  # see below
                print(f"failed prefill {spec} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for spec, b, ctx, kw in sweep_cases():
        if not spec.startswith(match):
            continue
        try:
            rows.append(bench_decode(spec, b, ctx, **kw))
        except Exception as e:  # a tiling the compiler refuses is a sweep result, not a crash
            print(f"failed {spec} {b}x{ctx} {kw}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return rows


def accuracy() -> str:
    """Relative attention-output error per format on keys with outlier channels."""
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = outlier_kv(4096, HKV, D, dtype=DTYPE, device="cuda", generator=g)
    q = torch.randn(1, HQ, D, generator=g, device="cuda").to(DTYPE)
    out = ["| format | decode kernel | keys only | values only |", "|---|---|---|---|"]
    for spec in ("none", "fp8", "int8", "int4:group_size=32", "int4:group_size=64", "int4",
                 "kivi2", "kivi2:value_group_size=64"):
        e = output_errors(spec, k, v, q)
        out.append(f"| {spec} | {e['kernel']:.4f} | {e['keys']:.4f} | {e['values']:.4f} |")
    return "\n".join(out)


def table(rows: list[dict], copy_bw: float) -> str:
    sdpa = {(r["batch"], r["ctx"]): r["time_s"] for r in rows if r["kind"] == "sdpa"}
    bf16 = {(r["batch"], r["ctx"]): r["time_s"] for r in rows
            if r["kind"] == "decode" and r["format"] == "none" and "sweep" not in r}
    out = ["| format | batch | context | splits | time (us) | read (MB) | TB/s | % of copy BW "
           "| x SDPA | x bf16 paged |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] not in ("decode", "sdpa") or "sweep" in r:
            continue
        key = (r["batch"], r["ctx"])
        bw = r["bytes"] / r["time_s"]
        out.append(f"| {r['format']} | {r['batch']} | {r['ctx']} | {r.get('splits', '-')} | "
                   f"{r['time_s'] * 1e6:.1f} | {r['bytes'] / 1e6:.1f} | {bw / 1e12:.2f} | "
                   f"{100 * bw / copy_bw:.0f}% | {sdpa.get(key, float('nan')) / r['time_s']:.2f} | "
                   f"{bf16.get(key, float('nan')) / r['time_s']:.2f} |")
    return "\n".join(out)


def sweep_table(rows: list[dict], copy_bw: float) -> str:
    out = ["| format | batch | context | splits | config | time (us) | % of copy BW |",
           "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["format"], r["batch"], r["ctx"], r["time_s"])):
        if r["kind"] == "prefill":
            out.append(f"| prefill {r['format']} | {r['batch']} | {r['ctx']} | - | {r['config']} | "
                       f"{r['time_s'] * 1e6:.1f} | {r['tflops']:.0f} TFLOP/s |")
            continue
        out.append(f"| {r['format']} | {r['batch']} | {r['ctx']} | {r['splits']} | {r['config']} | "
                   f"{r['time_s'] * 1e6:.1f} | {100 * r['bytes'] / r['time_s'] / copy_bw:.0f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", help="write the markdown report here")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--sweep", action="store_true", help="also run the tiling/split sweeps")
    ap.add_argument("--sweep-only", action="store_true", help="run only the sweeps")
    ap.add_argument("--sweep-match", default="", help="sweep only formats starting with this")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args(argv)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []

    def add(new_rows):
        for r in new_rows if isinstance(new_rows, list) else [new_rows]:
            rows.append(r)
            print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"copy_bw": copy_bw, "rows": rows}, f, indent=1)
    if args.sweep_only:
        for r in sweeps(args.sweep_match):
            r["sweep"] = True
            add(r)
        print(sweep_table(rows, copy_bw))
        if args.md:
            with open(args.md, "w") as f:
                f.write(sweep_table(rows, copy_bw) + "\n")
        return
    for b, ctx in SHAPES:
        add(bench_sdpa(b, ctx))
        for spec in args.formats.split(","):
            add(bench_decode(spec, b, ctx))
            if spec in ("int4", "kivi2"):  # the decode kernel before tokens became the dots' rows
                add(dict(bench_decode(spec, b, ctx, **query_rows_case(spec, b, ctx)),
                         format=f"{spec} (query rows)"))
    for spec in ("none", "int4", "kivi2"):
        add(bench_prefill(spec, 1, 0, 4096))
        add(bench_prefill(spec, 4, 3584, 512))
    report = table(rows, copy_bw)
    prefill = ["| prefill | seqs | context | new tokens | time (us) | TFLOP/s |", "|---|---|---|---|---|---|"]
    prefill += [f"| {r['format']} | {r['batch']} | {r['ctx']} | {r['new']} | "
                f"{r['time_s'] * 1e6:.1f} | {r['tflops']:.1f} |" for r in rows if r["kind"] == "prefill"]
    report += "\n\n" + "\n".join(prefill)
    report += ("\n\nRelative attention-output error, 4096 tokens, keys with outlier channels "
               "(kv_testing.outlier_kv):\n\n" + accuracy())
    print(report)
    if args.md:
        dev = torch.cuda.get_device_name(0)
        cmd = "python " + " ".join(sys.argv)
        with open(args.md, "w") as f:
            f.write(f"# Paged decode attention, {dev}, {datetime.date.today()}\n\n"
                    f"Command: `{cmd}`  \nCopy bandwidth (read+write, same run): "
                    f"{copy_bw / 1e12:.2f} TB/s\n\n{report}\n")
    if args.sweep:
        for r in sweeps():
            r["sweep"] = True
            add(r)


if __name__ == "__main__":
    main()
