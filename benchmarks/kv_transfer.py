"""KV migration cost per format: wire bytes per token, and gRPC KvTransfer throughput on loopback.

    python benchmarks/kv_transfer.py [--tokens 1024[,4096]] [--repeats 5] [--chunk-kib 4096] [--window 4]
        [--overlap-tokens 2048[,8192]] [--overlap-repeats 3] [--overlap-transports grpc[,same-gpu]]
        [--ceiling-sizes 2,4,8,16,32,64] [--decode-in-process] [--malloc retain|default] [--out FILE]

Bytes per token are those of the Llama-3-8B KV shape (32 layers, 8 kv heads, head_dim 128), from the formats'
block layouts (bf16: the unquantized cache). kivi2 also sends its residual, (tokens % 32) full-precision rows
per layer once per request, which is not per-token and is left out of the per-token column.

Throughput: two engines of that KV shape (the rest of the model is tiny, random weights, since only the cache
matters here), the decode one behind `start_kv_transfer_server` on 127.0.0.1 in a child process (this file run
with --decode-side: its own interpreter and GIL, as a decode worker is deployed; --decode-in-process puts it in
this process instead); one prompt of --tokens tokens is prefilled once, then its export is sent --repeats times
under new request ids through `send_kv` (Reserve, SendStream with acks, Commit, writes into the decode engine's
cache included). GB/s is wire payload bytes over the time from Reserve to Commit, the median over repeats, one
stream; Commit answers after the decode engine's first step, so the bytes alone are also timed from Reserve to
the last ack. Several prompt lengths (--tokens 2048,8192) give a row each and, per format, a line through the
times to the last ack: what a transfer of that format costs beyond its bytes (Reserve, the first chunk's trip, the
last ack, the receiver's checks and writes of the last chunks) and its rate per byte, which is what one stream
moves once a prompt is long enough for the fixed part not to count.

Overlap (--overlap-tokens N[,M...], 0 skips it): a random model (Llama-3-8B on CUDA; on CPU OVERLAP_SHAPE:
Llama-3-8B's attention and KV shape, fewer and narrower layers so that a 2k-token prefill runs in seconds)
prefills one prompt of N tokens per run, alternating two paths, the decode side placed as for the throughput
rows: export after the prefill (`migrate_or_resume`), which gives the prefill alone (admission to the first
token) and the transfer alone (first token to the last chunk's ack, the export included); and
`prefill_and_migrate` (layers streamed while later layers compute). Streaming may slow the prefill it hides
under (its copies and sends share the process), so the share of the transfer that ran before the first token
flatters it; the table's "hidden" is measured against the prefill alone instead: exposed = streamed last ack -
prefill alone, hidden = 1 - exposed / transfer alone (100%: the decode worker holds the KV when an unhindered
prefill ends; 0%: no better than sending after). Commit is shown too but left out of both: it waits for the
decode worker's first step, which follows any transfer. Transports (--overlap-transports): `grpc`, chunks over
KvTransfer; `same-gpu`, both engines on one GPU (semi-PD), the KV copied device to device into the decode side's
cache mapped over CUDA IPC (`workers/kv_ipc.py`: after the prefill, or layer by layer during it), where "last ack"
is the moment those copies are done.

Ceiling: the same chunks, built beforehand in the same wire form, streamed through SendStream to a servicer
that acknowledges each without checking it (no checksum, no cache write; `decode_chunk` only), on the same
loopback, the servicer in a child process as above: what gRPC alone moves per second here; the table reports
each format's throughput to the last ack as a share of it. Ceiling by stream size (--ceiling-sizes, chunk counts,
0 skips it): streams of n full chunks of random bytes the same way, and a line through their times: a fixed cost
per stream (what a stream costs beyond its bytes: at least the first chunk's trip and the last ack's) and a rate per
byte, which a prompt's transfer approaches as it grows; a short prompt's rate is held down by the fixed cost (kivi2
moves 44 MB for 2048 tokens).

Both ends keep freed chunk-sized buffers in their heaps (`cluster/host_memory.py`, as the prefill and decode
workers do, ceiling included); `--malloc default` leaves glibc's thresholds as they are, for comparison. Both
processes also freeze what they loaded out of garbage collection once their engines and servers are up, as
workers do (`cluster/gc_freeze.py`: a full collection of an unfrozen process stalls it for about 90 ms).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

import grpc
import torch

from partita.cluster.async_engine import AsyncEngine
from partita.cluster.gc_freeze import freeze_startup_objects
from partita.cluster.host_memory import retain_freed_buffers
from partita.cluster.kv_stream_client import prefill_and_migrate
from partita.cluster.kv_transfer_client import (build_chunks, migrate_or_resume, open_peer_cache, send_kv,
                                                stream_chunks)
from partita.cluster.kv_wire import crc32, encode_chunk
from partita.cluster.kv_transfer_server import KvTransferServicer, add_kv_transfer_servicer, start_kv_transfer_server
from partita.protos.partita.v1 import inference_pb2, kv_transfer_pb2 as pb
from partita.workers import Engine, EngineConfig, ModelConfig, SamplingParams
from partita.workers.presets import get_preset
from partita.workers.attention.selector import parse_kv_format
from partita.workers.kv_migration import export_request

FORMATS = ["bf16", "fp8", "int8", "int4", "kivi2", "kivi2:value_group_size=64"]
LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128
KV_SHAPE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=256,
                       num_layers=LAYERS, num_heads=KV_HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       max_position_embeddings=32768, dtype="bfloat16", eos_token_ids=(1,), bos_token_id=0,
                       name="llama3-8b-kv-shape")


OVERLAP_SHAPE = dataclasses.replace(KV_SHAPE, hidden_size=1024, intermediate_size=2816, num_layers=8,
                                    num_heads=32, name="llama3-8b-attention-8-layers")
DECODE_SIDE_FLAG = "--decode-side"  # the child's entry point: `python kv_transfer.py --decode-side SPEC_JSON`


def bytes_per_token(name: str) -> float:
    fmt = parse_kv_format("none" if name == "bf16" else name, HEAD_DIM)
    return LAYERS * fmt.bytes_per_token(KV_HEADS, HEAD_DIM)


def engine_config(name: str, tokens: int, prompts: int) -> EngineConfig:
    """One prompt of `tokens` tokens at a time, KV room for `prompts` of them (eager: decode is not timed)."""
    return EngineConfig(max_model_len=tokens + 64, max_num_seqs=2, max_num_batched_tokens=tokens + 64,
                        enforce_eager=True,
                        kv_cache_memory_bytes=prompts * (tokens + 64) * int(bytes_per_token(name) * 1.3 + 1) + 2**26)


def shape_named(name: str) -> ModelConfig:
    return {KV_SHAPE.name: KV_SHAPE, OVERLAP_SHAPE.name: OVERLAP_SHAPE}.get(name) or get_preset(name)


def make_engine(spec: "DecodeSpec") -> Engine:
    return Engine(shape_named(spec.shape), device=spec.device, dtype="bfloat16",
                  kv_format="none" if spec.format == "bf16" else spec.format,
                  config=engine_config(spec.format, spec.tokens, spec.prompts))


@dataclasses.dataclass
class DecodeSpec:
    """What the decode side serves: an engine of `shape` with `format`'s cache behind the KvTransfer server, or
    (ack_only) the ceiling's servicer and no engine."""

    format: str
    tokens: int
    prompts: int
    device: str
    max_chunk_bytes: int
    shape: str = KV_SHAPE.name
    ack_only: bool = False
    retain_buffers: bool = True


class _AckOnly(KvTransferServicer):
    """Acknowledges every chunk unread: the gRPC ceiling (module docstring)."""

    async def SendStream(self, request_iterator, context):
        async for chunk in request_iterator:
            yield pb.KvAck(transfer_id=chunk.transfer_id, seq=chunk.seq)


class DecodeSide:
    """The decode side in this process: `start` serves it on `port`, `idle` waits until its engine has no
    unfinished request (the previous transfer's decode steps must not overlap the next transfer)."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.engine: AsyncEngine | None = None
        self.port = 0

    async def start(self) -> None:
        if self.spec.ack_only:
            limit = self.spec.max_chunk_bytes + 2**20
            if self.spec.retain_buffers:
                retain_freed_buffers(limit)  # as start_kv_transfer_server does for the real servicer
            self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
            self.servicer = _AckOnly(None)
            add_kv_transfer_servicer(self.servicer, self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
            return
        self.engine = AsyncEngine(make_engine(self.spec))
        self.server, self.port, self.servicer = await start_kv_transfer_server(
            self.engine, max_chunk_bytes=self.spec.max_chunk_bytes, retain_buffers=self.spec.retain_buffers)

    async def idle(self) -> None:
        while self.engine is not None and await asyncio.wrap_future(self.engine.submit(lambda e: e.has_unfinished())):
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self.server.stop(None)
        self.servicer.close()
        if self.engine is not None:
            self.engine.shutdown()


class ChildDecodeSide:
    """DecodeSide in a child process (this file with DECODE_SIDE_FLAG), driven by lines on its stdin: each line
    asks it to answer once idle, end of input stops it. Only JSON crosses the pipe."""

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.port = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), DECODE_SIDE_FLAG, json.dumps(dataclasses.asdict(self.spec)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.port = (await self._answer())["port"]

    async def _answer(self) -> dict:
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the decode side exited ({await self.proc.wait()})")
        return json.loads(line)

    async def idle(self) -> None:
        self.proc.stdin.write(b"idle\n")
        await self.proc.stdin.drain()
        await self._answer()

    async def close(self) -> None:
        self.proc.stdin.close()
        await self.proc.wait()


async def serve_decode_side(spec: DecodeSpec) -> None:
    """The child's main: the port on stdout, then an answer per line of stdin once idle, until stdin closes."""
    side = DecodeSide(spec)
    await side.start()
    freeze_startup_objects()
    print(json.dumps({"port": side.port}), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        await side.idle()
        print(json.dumps({"idle": True}), flush=True)
    await side.close()


async def decode_side(spec: DecodeSpec, in_process: bool) -> DecodeSide | ChildDecodeSide:
    """A started decode side, here or in a child process."""
    side = DecodeSide(spec) if in_process else ChildDecodeSide(spec)
    await side.start()
    freeze_startup_objects()  # this process's engines are made by now
    return side


async def ack_only_seconds(streams: list[list[bytes]], repeats: int, chunk_bytes: int, window: int, device: str,
                           in_process: bool, retain_buffers: bool) -> list[list[float]]:
    """Seconds per stream of each list of prebuilt chunks through SendStream to `_AckOnly` on 127.0.0.1, `repeats`
    times after one warm-up."""
    spec = DecodeSpec("bf16", 0, 0, device, chunk_bytes, ack_only=True, retain_buffers=retain_buffers)
    side = await decode_side(spec, in_process)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{side.port}", options=[
        ("grpc.max_send_message_length", chunk_bytes + 2**20)])
    seconds = []
    try:
        for chunks in streams:
            times = []
            for i in range(repeats + 1):
                start = time.perf_counter()
                await stream_chunks(channel, "ceiling", iter(chunks), window, 60.0)
                if i:
                    times.append(time.perf_counter() - start)
            seconds.append(times)
    finally:
        await channel.close()
        await side.close()
    return seconds


async def ceiling(export, repeats: int, chunk_bytes: int, window: int, device: str, in_process: bool,
                  retain_buffers: bool) -> float:
    """Median GB/s of the export's chunks, prebuilt, through the ack-only servicer."""
    chunks = list(build_chunks("ceiling", export, chunk_bytes, True))
    [times] = await ack_only_seconds([chunks], repeats, chunk_bytes, window, device, in_process, retain_buffers)
    return statistics.median(export.total_bytes / t / 1e9 for t in times)


async def ceiling_by_size(counts: list[int], repeats: int, chunk_bytes: int, window: int, device: str,
                          in_process: bool, retain_buffers: bool) -> list[str]:
    """Streams of n full chunks of random bytes for each n in counts, through the ack-only servicer: table rows of
    the median time per stream, and a least-squares line through them (fixed ms per stream + ms per MB)."""
    data = memoryview(os.urandom(chunk_bytes))
    streams = [[encode_chunk("ceiling", i, [(0, i, 1, data)], i == n - 1) for i in range(n)] for n in counts]
    seconds = await ack_only_seconds(streams, repeats, chunk_bytes, window, device, in_process, retain_buffers)
    mbs = [n * chunk_bytes / 1e6 for n in counts]
    mss = [statistics.median(times) * 1e3 for times in seconds]
    rows = [f"| {n} | {mb:,.1f} | {ms:.2f} | {mb / ms:.2f} |" for n, mb, ms in zip(counts, mbs, mss)]
    if len(set(counts)) > 1:
        rows.append(f"| fit | | {fixed_and_rate(mbs, mss)} (per byte) |")
    return rows


def fixed_and_rate(mbs: list[float], mss: list[float]) -> str:
    """A least-squares line through (MB, ms) points, as table cells: "fixed ms + ms/MB | GB/s per byte"."""
    slope, fixed = statistics.linear_regression(mbs, mss)
    return f"{fixed:.2f} ms + {slope:.3f} ms/MB | {1 / slope:.2f}"


async def throughput(name: str, tokens: int, repeats: int, chunk_bytes: int, window: int, device: str,
                     in_process: bool, retain_buffers: bool) -> tuple[float, float, float, int]:
    """Median GB/s of payload bytes (Reserve to Commit; Reserve to the last ack), the ceiling's median GB/s,
    payload bytes per transfer."""
    spec = DecodeSpec(name, tokens, 2, device, chunk_bytes, retain_buffers=retain_buffers)
    prefill = make_engine(spec)
    prefill.add_request("p", [(7 * j) % 500 + 2 for j in range(tokens)],
                        SamplingParams(max_tokens=2, ignore_eos=True), prefill_only=True)
    while prefill.has_unfinished():
        prefill.step()
    export = export_request(prefill, "p")
    side = await decode_side(spec, in_process)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{side.port}", options=[
        ("grpc.max_send_message_length", chunk_bytes + 2**20)])
    rates, stream_rates = [], []
    try:
        for i in range(repeats + 1):  # the first one warms the connection and the engine thread
            result = await send_kv(channel, dataclasses.replace(export, request_id=f"b{i}"),
                                   inference_pb2.SamplingParams(max_tokens=2, ignore_eos=True),
                                   chunk_bytes=chunk_bytes, window=window)
            if i:
                rates.append(result.bytes_sent / result.seconds / 1e9)
                stream_rates.append(result.bytes_sent / result.stream_seconds / 1e9)
            await side.idle()
    finally:
        await channel.close()
        await side.close()
    top = await ceiling(export, repeats, chunk_bytes, window, device, in_process, retain_buffers)
    return statistics.median(rates), statistics.median(stream_rates), top, export.total_bytes


@dataclasses.dataclass
class PathTimes:
    """One prefill-and-migrate, in seconds from admission: the first token, the last chunk's ack (the decode
    worker holds the whole KV) and Commit (which also waits for the decode worker's first step); `during` is the
    share of the transfer (first chunk sent to last ack) that ran before the first token (streamed path only)."""

    first_token: float
    acked: float
    committed: float
    during: float = 0.0


async def overlap(name: str, tokens: int, repeats: int, chunk_bytes: int, window: int, device: str,
                  shape: ModelConfig, in_process: bool, transport: str, retain_buffers: bool) -> str:
    """The table row of one format, prompt length and transport: both paths, alternated `repeats` times after a
    warm-up of each, medians (module docstring)."""
    spec = DecodeSpec(name, tokens, 4, device, chunk_bytes, shape=shape.name, retain_buffers=retain_buffers)
    prefill = AsyncEngine(make_engine(spec))
    side = await decode_side(spec, in_process)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{side.port}")
    peer = None
    if transport == "same-gpu":
        peer = await open_peer_cache(prefill, channel)
        if peer is None:
            raise RuntimeError("the same-GPU path was refused (both engines must be on one CUDA GPU)")
    prompt = [(7 * j) % 500 + 2 for j in range(tokens)]
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    wire = inference_pb2.SamplingParams(max_tokens=2, ignore_eos=True)

    async def run_after(rid: str) -> PathTimes:
        admitted = time.perf_counter()
        outputs = prefill.adopt(rid, lambda e: e.add_request(rid, prompt, params, prefill_only=True))
        await anext(outputs)
        first_token = time.perf_counter()
        result = await migrate_or_resume(prefill, channel, rid, wire, chunk_bytes=chunk_bytes, window=window,
                                         peer=peer)
        committed = time.perf_counter() - admitted
        assert result is not None and result.in_place == (peer is not None), "the transfer after the prefill failed"
        await outputs.aclose()
        return PathTimes(first_token - admitted, committed - (result.seconds - result.stream_seconds), committed)

    async def run_streamed(rid: str) -> PathTimes:
        m = await prefill_and_migrate(prefill, channel, rid, prompt, params, wire, chunk_bytes=chunk_bytes,
                                      window=window, ttl_s=600.0, timeout_s=600.0, peer=peer)
        assert m.streamed and m.result.in_place == (peer is not None), "the streamed transfer failed"
        await m.prefill_outputs.aclose()
        t = m.times
        return PathTimes(t.first_token - t.admitted, t.last_ack - t.admitted, m.result.seconds, t.hidden_share)

    runs: dict[str, list[PathTimes]] = {"after": [], "streamed": []}
    try:
        for i in range(repeats + 1):
            for path, run in (("after", run_after), ("streamed", run_streamed)):
                times = await run(f"o{i}{path}")
                if i:
                    runs[path].append(times)
                await side.idle()
    finally:
        await channel.close()
        await side.close()
        prefill.shutdown()
    med = {path: PathTimes(*(statistics.median(getattr(t, f.name) for t in ts) for f in dataclasses.fields(PathTimes)))
           for path, ts in runs.items()}
    after, streamed = med["after"], med["streamed"]
    alone, transfer = after.first_token, after.acked - after.first_token
    exposed = streamed.acked - alone
    row = (f"| {transport} | {name} | {tokens} | {alone:.3f} | {transfer:.3f} | {after.committed:.3f} "
           f"| {streamed.first_token:.3f} | {streamed.acked:.3f} | {streamed.committed:.3f} | {streamed.during:.0%} "
           f"| {exposed:.3f} | {min(1.0, max(0.0, 1 - exposed / transfer)):.0%} |")
    print(row, flush=True)
    return row


def positive_ints(ap: argparse.ArgumentParser, flag: str, text: str, expected: str) -> list[int]:
    """text's comma-separated integers, each >= 1; otherwise the parser's error naming flag and what it expects."""
    items = text.split(",")
    if not all(n.isdigit() and int(n) > 0 for n in items):
        ap.error(f"{flag} {text!r}: {expected}")
    return [int(n) for n in items]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1024",
                    help="prompt lengths of the throughput rows, comma-separated; two or more add a line per format")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--overlap-tokens", default="2048", help="prompt lengths, comma-separated; 0 skips the overlap")
    ap.add_argument("--overlap-repeats", type=int, default=3)
    ap.add_argument("--overlap-formats", default="bf16,int4")
    ap.add_argument("--overlap-transports", default="grpc",
                    help="grpc (chunks over KvTransfer) and/or same-gpu (copies into the decode side's cache mapped "
                         "over CUDA IPC; CUDA only, decode side in a child process)")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where both engines run (the wire is loopback gRPC either way)")
    ap.add_argument("--decode-in-process", action="store_true",
                    help="run the decode side in this process (one GIL for both ends) instead of a child process")
    ap.add_argument("--overlap-model", default="auto",
                    help="a preset for the overlap rows; auto: llama3-8b on CUDA, OVERLAP_SHAPE on CPU")
    ap.add_argument("--ceiling-sizes", default="2,4,8,16,32,64",
                    help="chunk counts of the ceiling-by-size streams, comma-separated; 0 skips them")
    ap.add_argument("--malloc", choices=("retain", "default"), default="retain",
                    help="retain: both ends keep freed chunk-sized buffers (cluster/host_memory.py), as the prefill "
                         "and decode workers do; default: glibc's own thresholds, for comparison")
    args = ap.parse_args()
    sizes = [] if args.ceiling_sizes == "0" else positive_ints(ap, "--ceiling-sizes", args.ceiling_sizes,
                                                                "chunk counts >= 1, comma-separated, or 0 to skip")
    token_counts = positive_ints(ap, "--tokens", args.tokens, "prompt lengths >= 1, comma-separated")
    retain = args.malloc == "retain"
    if retain:
        retain_freed_buffers(args.chunk_kib * 1024)  # as PrefillSide does: each chunk sent is a new buffer
    unknown = set(args.overlap_transports.split(",")) - {"grpc", "same-gpu"}
    if unknown:
        ap.error(f"--overlap-transports: {', '.join(sorted(unknown))} unknown; use grpc and/or same-gpu")
    if args.overlap_model == "auto":
        shape = get_preset("llama3-8b") if args.device == "cuda" else OVERLAP_SHAPE
    else:
        shape = get_preset(args.overlap_model)
    bf16 = bytes_per_token("bf16")
    rows = ["| format | bytes/token (Llama-3-8B KV) | vs bf16 | prompt tokens | bytes moved for the prompt "
            "| loopback GB/s (1 stream) | GB/s to the last ack | gRPC ceiling GB/s | share of ceiling |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fits = []
    for name in filter(None, args.formats.split(",")):  # --formats '' skips the throughput rows
        per_token = bytes_per_token(name)
        mbs, mss = [], []  # MB moved, ms to the last ack, per prompt length
        for tokens in token_counts:
            rate, streamed, top, moved = await throughput(name, tokens, args.repeats, args.chunk_kib * 1024,
                                                          args.window, args.device, args.decode_in_process, retain)
            mbs.append(moved / 1e6)
            mss.append(moved / streamed / 1e6)
            rows.append(f"| {name} | {per_token:,.0f} | {bf16 / per_token:.2f}x fewer | {tokens} | {moved:,} "
                        f"| {rate:.2f} | {streamed:.2f} | {top:.2f} | {streamed / top:.0%} |")
            print(rows[-1], flush=True)
        if len(set(token_counts)) > 1:
            fits.append(f"| {name} | {fixed_and_rate(mbs, mss)} |")
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    device += f", engines on {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ", no GPU"
    device += "; decode side in this process" if args.decode_in_process else "; decode side in a child process"
    # zlib's crc32 is 4x slower than ISA-L's, and glibc's own malloc thresholds fault every chunk in: both show
    device += f"; crc32 from {crc32.__module__}; malloc thresholds: {args.malloc}"
    report = "\n".join([
        f"# KV transfer: bytes per token and gRPC loopback throughput ({datetime.date.today().isoformat()})", "",
        f"- device: {device}", f"- command: `python {' '.join(sys.argv)}`"])
    if len(rows) > 2:
        report += "\n".join([
            "", f"- prompt: {args.tokens} tokens, chunks of {args.chunk_kib} KiB, window {args.window}, "
            f"median of {args.repeats} transfers after one warm-up", "", *rows, ""])
    if fits:
        report += "\n".join([
            "", "Time to the last ack against bytes moved, a line through the prompt lengths of each format:", "",
            "| format | fixed ms per transfer + ms per MB | GB/s per byte |", "| --- | ---: | ---: |", *fits, ""])
    if sizes:
        sized = await ceiling_by_size(sizes, args.repeats, args.chunk_kib * 1024, args.window, args.device,
                                      args.decode_in_process, retain)
        report += "\n".join([
            f"\n\n## Ceiling by stream size ({args.chunk_kib} KiB chunks of random bytes, window {args.window}, "
            f"median of {args.repeats} streams after one warm-up)", "",
            "| chunks | MB | ms per stream | GB/s |", "| ---: | ---: | ---: | ---: |", *sized, ""])
    if args.overlap_tokens != "0":
        lines = ["| transport | format | prompt tokens | prefill alone s | transfer after it s (to the last ack) "
                 "| after: committed s | streamed: first token s | streamed: last ack s | streamed: committed s "
                 "| transfer before the first token | exposed s | hidden |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for transport in args.overlap_transports.split(","):
            for name in args.overlap_formats.split(","):
                for tokens in (int(n) for n in args.overlap_tokens.split(",")):
                    lines.append(await overlap(name, tokens, args.overlap_repeats, args.chunk_kib * 1024,
                                               args.window, args.device, shape, args.decode_in_process, transport,
                                               retain))
        report += "\n".join([f"\n\n## Transfer hidden under prefill ({shape.name}, {shape.num_layers} "
                             f"layers, hidden {shape.hidden_size}, random weights; median of "
                             f"{args.overlap_repeats} of each path)", "", *lines, ""])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    if sys.argv[1:2] == [DECODE_SIDE_FLAG]:
        asyncio.run(serve_decode_side(DecodeSpec(**json.loads(sys.argv[2]))))
    else:
        asyncio.run(main())
