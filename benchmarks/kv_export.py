"""The prefill side's export of a request's KV to host memory, alone: the planned gather of the whole request
(`begin_export`: one launch and one copy per `EXPORT_STAGING_BYTES`) against a gather and a copy per layer (what
it did before 2026-12-07, and what layer streaming still does), and the engine thread's share of each.

    python benchmarks/kv_export.py [--formats bf16,int4,kivi2] [--tokens 1024,4096] [--rounds 12] [--busy]
        [--device cuda] [--out FILE]
    (on the CPU: TRITON_INTERPRET=1 python benchmarks/kv_export.py --device cpu --tokens 64 --rounds 2)

A prompt of each --tokens length is prefilled into an engine of the Llama-3-8B KV shape (`kv_transfer.py`'s:
tiny model, that cache) and held; each round exports it by both paths, alternating which goes first, and times
on the calling thread (the engine thread's part: until the call returns) and until the export is in host memory
(the future's result). The per-layer path: `_gather_layer` and `_DeviceToHost.submit` per layer, the future
completed from the copy thread once the last layer has arrived. Both exports must be byte-equal. --busy runs a
thread beside them that copies 4 MiB `bytes` objects in a loop, holding the GIL as grpcio's copies of received
and sent chunks do in a worker's event loop. Reported: the median over rounds 2.. and the range.

On the CPU there is no copy thread: the planned gather runs under Triton's interpreter into a CPU buffer
(`export_plan`, `gather_in_pieces`) and the per-layer path is `export_layer`; the figures only check the script.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_transfer as kt  # noqa: E402  (the engines and KV shape of the transfer benchmark)

from partita.workers import SamplingParams  # noqa: E402
from partita.workers import kv_migration as km  # noqa: E402


def per_layer_export(engine, request_id: str) -> Future:
    """The export as a gather and a host copy per layer (the path before one gather; `stream_layers`' copies)."""
    seq = engine.prefilled_sequence(request_id)
    n = seq.num_prompt_tokens
    rows = km.request_rows(engine, seq, n)
    done: Future = Future()
    if engine.device.type != "cuda":
        done.set_result([p for layer in range(rows.layout.num_layers) for p in km.export_layer(engine, rows, layer)])
        return done
    payloads: list = []

    def deliver(layer: int, hosts: list[torch.Tensor]) -> None:
        payloads.extend(km._payloads(layer, hosts))
        if layer == rows.layout.num_layers - 1:
            done.set_result(payloads)

    copier = km._DeviceToHost(engine.device, rows.layout.num_layers, deliver, done.set_exception)
    for layer in range(rows.layout.num_layers):
        copier.submit(layer, km._gather_layer(engine, rows, layer))
    return done


def planned_export(engine, request_id: str, target: km.CacheTarget) -> Future:
    if engine.device.type == "cuda":
        return km.begin_export(engine, request_id, target)
    seq = engine.prefilled_sequence(request_id)  # the CUDA path's plan and gather, synchronously
    n = seq.num_prompt_tokens
    layout = target.layout
    plan = km.export_plan(target, seq.block_table[:layout.num_blocks(n)], n, seq.kv_slot)
    host = torch.empty(plan.total_bytes, dtype=torch.uint8)
    km.gather_in_pieces(plan, engine.device, host, km.EXPORT_STAGING_BYTES)
    view = memoryview(host.numpy())
    done: Future = Future()
    done.set_result(km.KvExport(request_id, seq.token_ids[:n], seq.token_ids[n], layout,
                                [(layer, index, view[a:b]) for layer, index, a, b in plan.spans]))
    return done


def timed(fn) -> tuple[float, float, list]:
    """(ms until fn returned, ms until its future's result, the payloads as (layer, index, bytes))."""
    start = time.perf_counter()
    future = fn()
    returned = time.perf_counter()
    result = future.result(timeout=120)
    ready = time.perf_counter()
    payloads = result.payloads if isinstance(result, km.KvExport) else result
    return (returned - start) * 1e3, (ready - start) * 1e3, [(la, i, bytes(d)) for la, i, d in payloads]


def busy_thread(stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        view = memoryview(bytearray(4 << 20))
        while not stop.is_set():
            bytes(view)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def bench(fmt: str, tokens: int, rounds: int, device: str, busy: bool) -> dict:
    engine = kt.make_engine(kt.DecodeSpec(fmt, tokens, 2, device, 4 << 20))
    engine.add_request("p", [(7 * j) % 500 + 2 for j in range(tokens)], SamplingParams(max_tokens=2,
                       ignore_eos=True), prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    target = km.cache_target(engine)
    km.prepare_exports(target)
    paths = {"per layer": lambda: per_layer_export(engine, "p"),
             "planned": lambda: planned_export(engine, "p", target)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    stop = threading.Event()
    # Only around the rounds: beside the engine's start-up it would slow the kernels' compiles, not what is timed.
    thread = busy_thread(stop) if busy else None
    try:
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(paths)[::-1]
            got = {}
            for name in order:
                if device == "cuda":
                    torch.cuda.synchronize()
                thread_ms, ready_ms, got[name] = timed(paths[name])
                times[name].append((thread_ms, ready_ms))
            if got["per layer"] != got["planned"]:
                raise AssertionError(f"{fmt} {tokens}: the two exports differ")
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    mb = sum(len(d) for _, _, d in got["planned"]) / 1e6
    engine.release_prefilled("p")
    return {"format": fmt, "tokens": tokens, "mb": mb, "times": times}


def summary(values: list[float]) -> str:
    rest = values[1:] or values
    return f"{statistics.median(rest):.2f} ({min(rest):.2f}-{max(rest):.2f})"


def table(rows: list[dict]) -> str:
    out = ["| format | tokens | MB | engine thread, per layer | engine thread, planned | in host memory, per layer "
           "| in host memory, planned |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        t = r["times"]
        out.append(f"| {r['format']} | {r['tokens']} | {r['mb']:.0f} | "
                   f"{summary([a for a, _ in t['per layer']])} | {summary([a for a, _ in t['planned']])} | "
                   f"{summary([b for _, b in t['per layer']])} | {summary([b for _, b in t['planned']])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="bf16,int4,kivi2")
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--busy", action="store_true", help="a thread copying 4 MiB bytes objects in a loop beside")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="append the markdown report here")
    args = ap.parse_args(argv)
    rows = []
    for fmt in args.formats.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            rows.append(bench(fmt, tokens, max(2, args.rounds), args.device, args.busy))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    report = (f"# KV export to host memory, {dev}, {datetime.date.today()}\n\nCommand: `python "
              f"{' '.join(sys.argv)}`{' (busy thread beside)' if args.busy else ''}\n\nms, median over rounds 2.. "
              f"(range)\n\n{table(rows)}\n")
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
