"""Gateway overhead: output tokens/s through the gRPC stream and the HTTP SSE stream, against the engine
driven in-process, in the same run, at 1 and 64 concurrent streams.

    python benchmarks/gateway.py                       # tiny-llama on CPU, streams 1 and 64
    python benchmarks/gateway.py --streams 64 --max-tokens 256 --repeats 5 --output result.json

Modes, each a closed loop of N streams, each stream sending `--requests-per-stream` requests one after
another (prompt `--prompt`, `--max-tokens` tokens, ignore_eos so every request runs to its length):
    engine   the synchronous Engine stepped in this process, no asyncio, no wire (the baseline)
    async    AsyncEngine (engine thread + event loop), consumed on the gateway's loop, no wire
    grpc     partita.client.AsyncClient streams through the gateway's gRPC server
    http     aiohttp SSE streams of /v1/completions through the gateway's HTTP server
The clients of grpc and http run in a separate process, so that their own parsing does not count as
gateway overhead; the gateway and its engine share this process (and its GIL), as in production.
Rounds interleave the modes; tok/s is the best of `--repeats` rounds, `cpu us/tok` the least CPU time this
process (engine + gateway, never the clients) spent per output token: on a shared or oversubscribed host
the second figure is steadier. `gateway us/tok` is the CPU of every thread but the engine's (event loop,
gRPC and HTTP machinery) per token, and `gateway/engine` that CPU over the engine thread's: the direct
measure of what the gateway costs, which other load on the host barely moves.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama",
                   help="a preset, a checkpoint directory, or 'small-llama' (tiny-llama widened: heavier steps "
                        "that spend their time in torch, with the GIL released, like a GPU engine waiting)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=16,
                   help="at few streams, each stream sends more requests so that a run has at least this many")
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["engine", "async", "grpc", "http"],
                   choices=["engine", "async", "grpc", "http"])
    p.add_argument("--stream-intervals", type=float, nargs="+", default=[0.0],
                   help="AsyncEngine stream_interval_s values to run the gateway modes with (0: every step)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the engine (1 leaves the other core of a 2-core machine to clients)")
    p.add_argument("--output", help="write the results as JSON here")
    return p.parse_args(argv)


def model(args):
    if args.model != "small-llama":
        return args.model
    import dataclasses

    from partita.workers.presets import PRESETS

    return dataclasses.replace(PRESETS["tiny-llama"], hidden_size=512, intermediate_size=1408, num_layers=4,
                               num_heads=8, num_kv_heads=4, head_dim=64, name="small-llama")


def engine_config(args):
    from partita.workers import EngineConfig

    max_len = len(args.prompt.encode()) + args.max_tokens + 8
    return EngineConfig(max_num_seqs=max(args.streams), max_model_len=max(256, max_len),
                        num_kv_blocks=max(args.streams) * (max_len // 16 + 2))


def requests_per_stream(args, num_streams: int) -> int:
    return max(args.requests_per_stream, -(-args.min_requests // num_streams))


# --- the baseline: the engine alone -----------------------------------------------------------------------
def run_engine(engine, args, num_streams: int) -> tuple[int, float]:
    from partita.workers import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    left = {s: requests_per_stream(args, num_streams) for s in range(num_streams)}
    owner, serial = {}, iter(range(1 << 30))

    def add(stream: int) -> None:
        request_id = f"e{next(serial)}"
        owner[request_id] = stream
        left[stream] -= 1
        engine.add_request(request_id, args.prompt, params)

    start = time.perf_counter()
    for stream in left:
        add(stream)
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished and left[owner[out.request_id]]:
                add(owner[out.request_id])
    return tokens, time.perf_counter() - start


# --- AsyncEngine on the gateway's loop ----------------------------------------------------------------
async def run_async(engine, args, num_streams: int) -> tuple[int, float]:
    from partita.workers import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)

    async def stream(s: int) -> int:
        tokens = 0
        for r in range(requests_per_stream(args, num_streams)):
            async for out in engine.generate(f"a{s}-{r}-{time.monotonic_ns()}", args.prompt, params):
                tokens += len(out.new_token_ids)
        return tokens

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(stream(s) for s in range(num_streams))))
    return tokens, time.perf_counter() - start


# --- clients, in their own process --------------------------------------------------------------------
async def grpc_load(target: str, args, num_streams: int) -> tuple[int, float]:
    from partita.client import AsyncClient

    async with AsyncClient(target, timeout_s=600.0) as client:
        await client.generate(args.prompt, max_tokens=4)  # connect and warm up

        async def stream() -> int:
            tokens = 0
            for _ in range(requests_per_stream(args, num_streams)):
                async for chunk in client.stream(args.prompt, max_tokens=args.max_tokens, ignore_eos=True):
                    tokens += len(chunk.token_ids)
            return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(stream() for _ in range(num_streams))))
        return tokens, time.perf_counter() - start


async def http_load(url: str, args, num_streams: int) -> tuple[int, float]:
    import aiohttp

    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one() -> int:
            async with session.post(url + "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                tokens = 0
                async for line in resp.content:
                    if line.startswith(b'data: {') and b'"usage"' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                return tokens

        await session.post(url + "/v1/completions", json={**body, "max_tokens": 4, "stream": False})

        async def stream() -> int:
            return sum([await one() for _ in range(requests_per_stream(args, num_streams))])

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(stream() for _ in range(num_streams))))
        return tokens, time.perf_counter() - start


def client_process(mode: str, address: str, args, num_streams: int, results) -> None:
    load = grpc_load if mode == "grpc" else http_load
    results.put(asyncio.run(load(address, args, num_streams)))


def run_client(mode: str, address: str, args, num_streams: int) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=client_process, args=(mode, address, args, num_streams, results))
    process.start()
    result = results.get(timeout=900)
    process.join(60)
    return result


# --- the run ------------------------------------------------------------------------------------------
def thread_cpu_s() -> dict[int, float]:
    """CPU seconds of each thread of this process, by OS thread id (Linux /proc; empty elsewhere)."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    result = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return result
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        result[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return result


def timed(run, engine_tid: int | None) -> dict:
    """One run: tokens, wall seconds, CPU seconds of this process (engine + gateway, never the clients) and of
    its engine thread (None when the engine runs in the calling thread)."""
    cpu, threads = time.process_time(), thread_cpu_s()
    tokens, wall_s = run()
    cpu, after = time.process_time() - cpu, thread_cpu_s()
    engine_cpu = None
    if engine_tid is not None and engine_tid in after:
        engine_cpu = after[engine_tid] - threads.get(engine_tid, 0.0)
    return {"tokens": tokens, "wall_s": wall_s, "cpu_s": cpu, "engine_cpu_s": engine_cpu}


def summarize(runs: list[dict]) -> dict:
    rates = [r["tokens"] / r["wall_s"] for r in runs]
    cpu_us = [r["cpu_s"] / r["tokens"] * 1e6 for r in runs]
    summary = {"tokens_per_s": max(rates), "median_tokens_per_s": statistics.median(rates),
               "cpu_us_per_token": min(cpu_us), "tokens": runs[-1]["tokens"],
               "runs_tokens_per_s": [round(x) for x in rates], "runs_cpu_us_per_token": [round(x, 1) for x in cpu_us]}
    if all(r["engine_cpu_s"] is not None for r in runs):
        # the gateway's own work (event loop, gRPC/HTTP threads) per token, and as a share of the engine's
        gateway = [(r["cpu_s"] - r["engine_cpu_s"]) / r["engine_cpu_s"] for r in runs]
        summary["gateway_cpu_us_per_token"] = statistics.median(
            [(r["cpu_s"] - r["engine_cpu_s"]) / r["tokens"] * 1e6 for r in runs])
        summary["gateway_cpu_share"] = statistics.median(gateway)
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    import contextlib

    import torch

    from partita.cluster.async_engine import AsyncEngine
    from partita.cluster.gateway_config import GatewayConfig
    from partita.cluster.gateway_thread import GatewayThread
    from partita.workers import Engine

    torch.set_num_threads(args.torch_threads)
    config = engine_config(args)
    runners: dict = {}
    if "engine" in args.modes:
        engine = Engine(model(args), device=args.device, config=config)
        run_engine(engine, args, 1)  # warm up
        for n in args.streams:
            runners[f"engine/{n}"] = (lambda n=n: run_engine(engine, args, n), None)
    with contextlib.ExitStack() as stack:
        for interval in args.stream_intervals:
            tag = "" if interval == 0 else f"@{interval:g}s"
            server = stack.enter_context(GatewayThread(
                lambda interval=interval: AsyncEngine.from_model(model(args), device=args.device, config=config,
                                                                 stream_interval_s=interval),
                GatewayConfig(grpc_port=0, http_port=0, max_queued_requests=None)))
            for n in args.streams:
                tid = server.gateway.engine.native_thread_id
                if "async" in args.modes:
                    runners[f"async{tag}/{n}"] = (
                        lambda n=n, s=server: s.call(run_async(s.gateway.engine, args, n), None), tid)
                if "grpc" in args.modes:
                    runners[f"grpc{tag}/{n}"] = (lambda n=n, s=server: run_client("grpc", s.grpc_target, args, n), tid)
                if "http" in args.modes:
                    runners[f"http{tag}/{n}"] = (lambda n=n, s=server: run_client("http", s.http_url, args, n), tid)
        samples: dict[str, list[dict]] = {key: [] for key in runners}
        for _ in range(args.repeats):  # rounds interleave the modes, so that drifting load hits all alike
            for key, (run, engine_tid) in runners.items():
                samples[key].append(timed(run, engine_tid))
    results = {"model": args.model, "device": args.device, "max_tokens": args.max_tokens,
               "min_requests": args.min_requests, "torch_threads": args.torch_threads, "repeats": args.repeats,
               "date": time.strftime("%Y-%m-%d"), "modes": {key: summarize(runs) for key, runs in samples.items()}}
    report(results, args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


def report(results: dict, args) -> None:
    modes = results["modes"]
    print(f"{args.model} on {args.device}, {args.max_tokens} tokens per request, >= {args.min_requests} requests "
          f"per run, best of {args.repeats} interleaved rounds, torch threads {args.torch_threads}")
    print(f"{'mode':<14}{'streams':>8}{'tok/s':>10}{'median':>10}{'vs engine':>11}{'cpu us/tok':>12}{'vs engine':>11}"
          f"{'gateway us/tok':>16}{'gateway/engine':>16}")
    for key in sorted(modes, key=lambda k: (int(k.split("/")[1]), k.split("/")[0] != "engine", k)):
        m = modes[key]
        mode, n = key.split("/")
        base = modes.get(f"engine/{n}")
        rate = cpu = ""
        if base and mode != "engine":
            rate = f"{m['tokens_per_s'] / base['tokens_per_s'] - 1:+.1%}"
            cpu = f"{m['cpu_us_per_token'] / base['cpu_us_per_token'] - 1:+.1%}"
        gateway = share = ""
        if "gateway_cpu_share" in m:
            gateway, share = f"{m['gateway_cpu_us_per_token']:.1f}", f"{m['gateway_cpu_share']:.1%}"
        print(f"{mode:<14}{n:>8}{m['tokens_per_s']:>10.0f}{m['median_tokens_per_s']:>10.0f}{rate:>11}"
              f"{m['cpu_us_per_token']:>12.1f}{cpu:>11}{gateway:>16}{share:>16}")


if __name__ == "__main__":
    main()
