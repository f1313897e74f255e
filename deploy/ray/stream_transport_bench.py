"""Token streams from a worker actor to the gateway process: Ray streaming generators vs gRPC, measured.

The router (cluster/router.py) receives each request's tokens from its worker actor. Two ways are possible:
a Ray streaming generator (`num_returns="streaming"`, what partita uses) or a gRPC server-streaming call to
a server inside the worker actor (partita.v1.Inference/Generate messages). This measures the transport
alone: one async actor produces token outputs as fast as asked (no model), and this process (standing
for the gateway) consumes them both ways, with the same payload: one token id, a short text, counts.

    python deploy/ray/stream_transport_bench.py                       # a private local Ray
    ray job submit --working-dir . -- python deploy/ray/stream_transport_bench.py --json out.json

Transports: `ray` (a streaming generator per request, partita's router today), `grpc` (a server-streaming
call per request), `ray-steps` (one streaming generator per worker whose items are whole engine steps: the
outputs of every request in the step, demultiplexed here).

Scenarios: one unpaced stream (per-token cost at the limit), many unpaced concurrent streams (aggregate
rate), and many paced streams (a decode batch: every stream one token per --interval-ms) where the figure
is the latency the transport adds to each token (receive time minus send time, same host clock) and the
gateway-side CPU per token. (Unpaced, "added latency" is mostly queueing behind a faster producer.)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import grpc
import ray

from partita.protos.partita.v1 import inference_pb2 as pb
from partita.protos.partita.v1 import inference_pb2_grpc
from partita.workers import RequestOutput

INTERVAL_KEY = "x-interval-us"
TRANSPORTS = ("ray", "grpc", "ray-steps")


class _Servicer(inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request, context):
        interval_s = int(dict(context.invocation_metadata()).get(INTERVAL_KEY, "0")) / 1e6
        n = request.sampling.max_tokens
        for i in range(n):
            if interval_s:
                await asyncio.sleep(interval_s)
            chunk = pb.GenerateChunk(token_ids=[i], text=repr(time.monotonic()))
            yield pb.GenerateResponse(request_id=request.request_id, chunk=chunk)
        yield pb.GenerateResponse(request_id=request.request_id, complete=pb.GenerateComplete(
            finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(prompt_tokens=5, completion_tokens=n)))


@ray.remote(num_cpus=1, max_concurrency=10_000)
class TokenSource:
    """Produces token outputs as a worker actor would, through both transports."""

    def __init__(self):
        self._server = None

    async def start_grpc(self) -> int:
        self._server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(_Servicer(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    async def cpu_s(self) -> float:
        return time.process_time()

    async def stream(self, request_id: str, n: int, interval_s: float):
        for i in range(n):
            if interval_s:
                await asyncio.sleep(interval_s)
            yield RequestOutput(request_id, [i], repr(time.monotonic()), i == n - 1, "length" if i == n - 1 else None,
                                5, i + 1)

    async def stream_steps(self, request_ids: list[str], n: int, interval_s: float):
        """One stream for many requests: each item is one engine step's outputs, one per request."""
        for i in range(n):
            if interval_s:
                await asyncio.sleep(interval_s)
            sent = repr(time.monotonic())
            yield [RequestOutput(rid, [i], sent, i == n - 1, "length" if i == n - 1 else None, 5, i + 1)
                   for rid in request_ids]


async def _ray_stream(source, request_id: str, n: int, interval_s: float, lags: list[float]) -> int:
    received = 0
    async for ref in source.stream.options(num_returns="streaming").remote(request_id, n, interval_s):
        out = await ref
        lags.append(time.monotonic() - float(out.text_delta))
        received += len(out.new_token_ids)
    return received


async def _ray_steps(source, request_ids: list[str], n: int, interval_s: float, lags: list[float]) -> int:
    received = 0
    async for ref in source.stream_steps.options(num_returns="streaming").remote(request_ids, n, interval_s):
        outs = await ref
        now = time.monotonic()
        for out in outs:
            lags.append(now - float(out.text_delta))
            received += len(out.new_token_ids)
    return received


async def _grpc_stream(stub, request_id: str, n: int, interval_s: float, lags: list[float]) -> int:
    request = pb.GenerateRequest(request_id=request_id, text="x", sampling=pb.SamplingParams(max_tokens=n))
    received = 0
    async for response in stub.Generate(request, metadata=((INTERVAL_KEY, str(int(interval_s * 1e6))),)):
        if response.WhichOneof("response") == "chunk":
            lags.append(time.monotonic() - float(response.chunk.text))
            received += len(response.chunk.token_ids)
    return received


async def _scenario(name: str, transport: str, source, stub, num_streams: int, n: int, interval_s: float) -> dict:
    lags: list[float] = []
    worker_cpu0, cpu0, t0 = await source.cpu_s.remote(), time.process_time(), time.perf_counter()
    if transport == "ray":
        runs = [_ray_stream(source, f"{name}-{i}", n, interval_s, lags) for i in range(num_streams)]
    elif transport == "ray-steps":
        runs = [_ray_steps(source, [f"{name}-{i}" for i in range(num_streams)], n, interval_s, lags)]
    else:
        runs = [_grpc_stream(stub, f"{name}-{i}", n, interval_s, lags) for i in range(num_streams)]
    tokens = sum(await asyncio.gather(*runs))
    wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    worker_cpu_s = await source.cpu_s.remote() - worker_cpu0
    assert tokens == num_streams * n
    lags.sort()
    return {"scenario": name, "transport": transport, "streams": num_streams, "tokens_per_stream": n,
            "interval_ms": interval_s * 1e3, "tokens_per_s": round(tokens / wall_s),
            "gateway_cpu_us_per_token": round(cpu_s / tokens * 1e6, 1),
            "worker_cpu_us_per_token": round(worker_cpu_s / tokens * 1e6, 1),
            "added_latency_p50_ms": round(lags[len(lags) // 2] * 1e3, 3),
            "added_latency_p99_ms": round(lags[int(len(lags) * 0.99)] * 1e3, 3),
            "added_latency_mean_ms": round(statistics.fmean(lags) * 1e3, 3)}


async def main(args) -> list[dict]:
    source = TokenSource.remote()
    port = await source.start_grpc.remote()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    scenarios = [("one-stream", 1, args.tokens, 0.0),
                 ("concurrent", args.streams, args.tokens // 4, 0.0),
                 ("paced", args.streams, args.paced_tokens, args.interval_ms / 1e3)]
    for transport in TRANSPORTS:  # warm-up: worker processes, channels, code paths
        await _scenario("warmup", transport, source, stub, 4, 50, 0.0)
    results = []
    for repeat in range(args.repeats):
        for name, streams, n, interval_s in scenarios:
            order = TRANSPORTS if repeat % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                result = await _scenario(name, transport, source, stub, streams, n, interval_s)
                result["repeat"] = repeat
                results.append(result)
                print(json.dumps(result), flush=True)
    await channel.close()
    return results


def summarize(results: list[dict]) -> str:
    keys = ("tokens_per_s", "gateway_cpu_us_per_token", "worker_cpu_us_per_token", "added_latency_p50_ms",
            "added_latency_p99_ms")
    lines = [f"{'scenario':<12}{'transport':<10}" + "".join(f"{k:>27}" for k in keys)]
    for name in dict.fromkeys(r["scenario"] for r in results):
        for transport in TRANSPORTS:
            rows = [r for r in results if r["scenario"] == name and r["transport"] == transport]
            lines.append(f"{name:<12}{transport:<10}" + "".join(
                f"{statistics.median(r[k] for r in rows):>27}" for k in keys))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="tokens of the one-stream scenario")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--paced-tokens", type=int, default=100, help="tokens per paced stream")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="time between tokens of a paced stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write every measurement here")
    args = parser.parse_args()
    ray.init(logging_level="WARNING", log_to_driver=False)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = asyncio.run(main(args))
    print(f"\nmedians of {args.repeats} repeats; {platform.node()}, {ray.cluster_resources().get('CPU')} CPUs, "
          f"ray {ray.__version__}, grpcio {grpc.__version__}, {started}")
    print(summarize(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "args": vars(args), "results": results}, f, indent=1)
