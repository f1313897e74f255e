"""The decode side's write of received KV chunks into its paged cache, alone: one Triton launch per chunk
against one indexed copy per layer and cache part, and the engine thread's share of it.

    python benchmarks/kv_write.py [--formats int4,kivi2,bf16] [--tokens 2048] [--chunk-kib 4096] [--rounds 8]
        [--device cuda|cpu] [--out FILE]
    (on the CPU: TRITON_INTERPRET=1 python benchmarks/kv_write.py --device cpu --tokens 64 --rounds 2)

A prompt of --tokens tokens of the Llama-3-8B KV shape (`kv_transfer.py`'s engines: tiny model, that cache) is
prefilled and exported, its payloads packed into chunks as `send_kv` packs them (`build_chunks`, runs of blocks
crossing layers) and decoded as the receiver decodes them, and each chunk is written into a reserved sequence of
two other engines on the same device as the receiver writes it (`workers/kv_import.py`: `stage_payloads`,
then the block write, which a receiver runs on its checksum thread too; here `write_staged`), one
engine per write path: impl='triton' (`kernels/scatter_copy.py`, what CUDA uses) and impl='torch' (one
`index_copy_` per layer and part on CUDA, numpy on the CPU: all of it in `write_staged`). Rounds alternate the
paths; each round times every chunk on the calling thread, nothing else running, the device synchronized
before and after. Reported: the median over rounds 2.. of each round's median ms per chunk, whole and its
launch part (`write_staged`, the engine thread's share before the receiver wrote off it), with the range over
rounds, and the median time of a whole round (all chunks, then a device synchronize). Both caches must end
byte-equal.

What this leaves out: under a live stream the write shares the GIL with the receiving event loop
(`kv_transfer.py` measures that transfer as a whole).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_transfer as kt  # noqa: E402  (the engines and KV shape of the transfer benchmark)

from partita.cluster.kv_transfer_client import build_chunks  # noqa: E402
from partita.cluster.kv_wire import decode_chunk  # noqa: E402
from partita.workers.kv_import import stage_payloads, write_staged  # noqa: E402
from partita.workers.kv_migration import cache_target, kv_layout, layer_byte_rows  # noqa: E402

IMPLS = ("torch", "triton")


def chunks_of(export, chunk_bytes: int) -> list[list[tuple[int, int, memoryview]]]:
    """Each chunk's payloads as the receiver gets them: `send_kv`'s chunks in wire form, decoded."""
    return [[(b.layer, b.block_index, b.data) for b in decode_chunk(raw).blocks]
            for raw in build_chunks("kv-write", export, chunk_bytes, True)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fmt: str, tokens: int, chunk_bytes: int, rounds: int, device: str) -> list[str]:
    spec = kt.DecodeSpec(fmt, tokens, 2, device, chunk_bytes)
    prefill = kt.make_engine(spec)
    prompt = [(7 * j) % 500 + 2 for j in range(tokens)]
    prefill.add_request("p", prompt, kt.SamplingParams(max_tokens=2, ignore_eos=True), prefill_only=True)
    while prefill.has_unfinished():
        prefill.step()
    export = kt.export_request(prefill, "p")
    layout = kv_layout(prefill)
    chunks = chunks_of(export, chunk_bytes)
    engines = {impl: kt.make_engine(spec) for impl in IMPLS}
    seqs = {impl: engine.reserve_migrated("r", prompt) for impl, engine in engines.items()}
    targets = {impl: cache_target(engine) for impl, engine in engines.items()}
    per_chunk: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    on_engine: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    whole: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        for impl in IMPLS:
            times, engine_times = [], []
            sync(device)
            start = time.perf_counter()
            for pieces in chunks:
                t = time.perf_counter()
                staged = stage_payloads(targets[impl], seqs[impl].block_table, tokens, pieces, layout, impl)
                t_staged = time.perf_counter()
                write_staged(engines[impl], seqs[impl], staged)
                t_end = time.perf_counter()
                times.append(t_end - t)
                engine_times.append(t_end - t_staged)
            sync(device)
            if r:  # the first round compiles and warms the allocators
                per_chunk[impl].append(statistics.median(times) * 1e3)
                on_engine[impl].append(statistics.median(engine_times) * 1e3)
                whole[impl].append((time.perf_counter() - start) * 1e3)
    equal = all(torch.equal(a, b) for layer in range(layout.num_layers)
                for a, b in zip(*(layer_byte_rows(engines[impl], layer) for impl in IMPLS)))
    if not equal:
        raise AssertionError(f"{fmt}: the two write paths left different caches")
    pieces = statistics.median(len(c) for c in chunks)
    rows = []
    for impl in IMPLS:
        xs, es = per_chunk[impl], on_engine[impl]
        rows.append(f"| {fmt} | {impl} | {len(chunks)} | {pieces:g} | {statistics.median(xs):.3f} "
                    f"({min(xs):.3f}-{max(xs):.3f}) | {statistics.median(es):.3f} ({min(es):.3f}-{max(es):.3f}) | "
                    f"{statistics.median(whole[impl]):.1f} |")
    del prefill, engines
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="int4,kivi2,bf16")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args()
    if args.rounds < 2 or args.tokens < 1 or args.chunk_kib < 1:
        ap.error("--rounds must be >= 2, --tokens and --chunk-kib >= 1")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("on the CPU the Triton path runs only in Triton's interpreter: set TRITON_INTERPRET=1 (slow: "
                 "use a small --tokens)")
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (numpy path; Triton interpreted)"
    lines = [f"# KV write per received chunk ({datetime.date.today()})", "",
             f"- device: {device}", f"- command: `python {' '.join(sys.argv)}`",
             f"- prompt {args.tokens} tokens, chunks of {args.chunk_kib} KiB, rounds {args.rounds} (first left out)",
             "", "| format | impl | chunks | pieces per chunk | ms per chunk, median (range over rounds) | "
             "of which on the engine thread | ms per round |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for fmt in args.formats.split(","):
        lines += measure(fmt, args.tokens, args.chunk_kib * 1024, args.rounds, args.device)
        print("\n".join(lines[-2:]), flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
