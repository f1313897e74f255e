"""Serving benchmark: drive a running partita endpoint with synthetic traffic and measure what users feel.

    python benchmarks/serving.py --url http://127.0.0.1:8000 --num-requests 200 --request-rate 4 \
        --goodput ttft:500 tpot:50 --output-dir results/          # or: partita bench (same flags)
    python benchmarks/serving.py --url grpc://127.0.0.1:50051 --request-rate 1 2 4 8 inf \
        --input-len 512 --output-len 128 --length-dist lognormal --prefix-len 256 --output-dir sweep/

Order of a run: ask the endpoint what it serves (model, max_model_len; a preset name gives the vocabulary);
draw every request up front from --seed (serving_traffic.py); send --num-warmups requests; read the server's
counters (/metrics); then, for each --request-rate, send the requests at their arrival offsets (gamma gaps,
Poisson by default), at most --max-concurrency in flight, with a progress bar; read the counters again;
print the vLLM-style summary (serving_metrics.py). With --output-dir: LABEL.json (config, per-rate summaries,
server counter deltas, per-request records) and plots (serving_plots.py, needs matplotlib): LABEL-latency-cdf.png
and, for several rates, LABEL-rate-sweep.png. Flags: cluster/bench_cli.py (shared with `partita bench`).

Prompts are token ids and requests set ignore_eos, so prompt and output lengths are exact.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

from partita.cluster.bench_cli import DEFAULT_URL, add_bench_arguments

if __package__:
    from . import serving_backends as backends
    from . import serving_metrics as metrics
    from . import serving_traffic as traffic
else:  # run as a script: benchmarks/ is on sys.path
    import serving_backends as backends
    import serving_metrics as metrics
    import serving_traffic as traffic


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark invocation (flags: cluster/bench_cli.py).

    url, backend, api_key, model, metrics_url: the endpoint and how to reach it (model None: the served one).
    num_requests, request_rates, burstiness, max_concurrency: the load; one run per rate, same requests.
    input_len, output_len, prefix_len, vocab_size, tokenizer, min_token_id, seed: the traffic.
    sampling: fields sent with every request (temperature, ignore_eos, --extra-body).
    num_warmups, request_timeout_s: before and during the runs.
    goodput_ms: targets (ttft / tpot / e2el -> ms); percentiles: reported besides the median.
    output_dir, label, save_detailed, plots, progress: what is written and shown.
    """

    url: str
    backend: str | None = None
    api_key: str | None = None
    model: str | None = None
    metrics_url: str | None = None
    num_requests: int = 100
    request_rates: tuple[float, ...] = (math.inf,)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: traffic.LengthDist = traffic.LengthDist("fixed", 256)
    output_len: traffic.LengthDist = traffic.LengthDist("fixed", 128)
    prefix_len: int = 0
    vocab_size: int | None = None
    tokenizer: str | None = None
    min_token_id: int = 0
    seed: int = 0
    sampling: dict = field(default_factory=lambda: {"temperature": 0.0, "ignore_eos": True})
    num_warmups: int = 1
    request_timeout_s: float = 600.0
    goodput_ms: dict = field(default_factory=dict)
    percentiles: tuple[float, ...] = (90.0, 99.0)
    output_dir: str | None = None
    label: str | None = None
    save_detailed: bool = False
    plots: bool = True
    progress: bool = True


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    targets: dict[str, float] = {}
    for item in items or ():
        key, _, value = item.partition(":")
        key = {"e2e": "e2el"}.get(key.strip().lower(), key.strip().lower())
        if key not in metrics.GOODPUT_TARGETS:
            raise ValueError(f"--goodput {item!r}: the key must be one of {', '.join(metrics.GOODPUT_TARGETS)}")
        try:
            targets[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: expected KEY:MILLISECONDS, e.g. ttft:500") from None
        if not targets[key] > 0:
            raise ValueError(f"--goodput {item!r}: the target must be > 0 ms")
    return targets


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """A BenchConfig from parsed flags; ValueError names the flag that cannot be used."""
    kind = args.length_dist or ("uniform" if args.range_ratio > 0 else "fixed")
    lengths = {}
    for flag in ("input_len", "output_len"):
        try:
            lengths[flag] = traffic.LengthDist(kind, getattr(args, flag), args.range_ratio, args.lognormal_sigma)
        except ValueError as e:
            raise ValueError(f"--{flag.replace('_', '-')}: {e}") from None
    sampling = {"temperature": args.temperature, "ignore_eos": args.ignore_eos}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except ValueError as e:
            raise ValueError(f"--extra-body is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        sampling.update(extra)
    try:
        percentiles = tuple(float(q) for q in args.percentiles.split(",") if q.strip())
    except ValueError:
        raise ValueError(f"--percentiles {args.percentiles!r}: expected numbers separated by commas") from None
    checks = [("--num-requests", args.num_requests >= 1, ">= 1"), ("--num-warmups", args.num_warmups >= 0, ">= 0"),
              ("--max-concurrency", args.max_concurrency is None or args.max_concurrency >= 1, ">= 1"),
              ("--prefix-len", args.prefix_len >= 0, ">= 0"), ("--burstiness", args.burstiness > 0, "> 0"),
              ("--request-timeout-s", args.request_timeout_s > 0, "> 0"),
              ("--percentiles", all(0 < q < 100 for q in percentiles), "in (0, 100)")]
    for flag, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag}: must be {allowed}, got {getattr(args, flag[2:].replace('-', '_'))}")
    url = getattr(args, "url", None) or DEFAULT_URL  # benchmarks/sweep.py has no --url
    backends.parse_url(url, args.backend)  # raises on a bad scheme
    return BenchConfig(
        url=url, backend=args.backend, api_key=args.api_key, model=args.model, metrics_url=args.metrics_url,
        num_requests=args.num_requests, request_rates=tuple(args.request_rate), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, input_len=lengths["input_len"], output_len=lengths["output_len"],
        prefix_len=args.prefix_len, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        min_token_id=args.min_token_id, seed=args.seed, sampling=sampling, num_warmups=args.num_warmups,
        request_timeout_s=args.request_timeout_s, goodput_ms=parse_goodput(args.goodput), percentiles=percentiles,
        output_dir=args.output_dir, label=args.label, save_detailed=args.save_detailed, plots=args.plots,
        progress=args.progress)


def vocab_size_of(config: BenchConfig, info: backends.ServerInfo) -> int:
    """Where prompt ids come from: --vocab-size, else --tokenizer's, else the served preset's or checkpoint's."""
    if config.vocab_size is not None:
        return config.vocab_size
    for path in filter(None, (config.tokenizer, info.root)):
        if os.path.isdir(path):
            size = _vocab_size_in(path)
            if size:
                return size
    from partita.workers.presets import PRESETS

    if info.root in PRESETS:
        return PRESETS[info.root].vocab_size
    raise ValueError(f"cannot tell the vocabulary of {info.root!r}: pass --vocab-size or --tokenizer DIR")


def _vocab_size_in(path: str) -> int | None:
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
        size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        if size:
            return int(size)
    tokenizer_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_path):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(tokenizer_path).get_vocab_size(with_added_tokens=True)
    return None


class ProgressBar:
    """Completed / total on stderr: a redrawn bar on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, title: str, enabled: bool, stream=sys.stderr):
        self._total, self._title, self._enabled, self._stream = total, title, enabled, stream
        self._done = self._failed = 0
        self._tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self._start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, record: metrics.RequestRecord) -> None:
        self._done += 1
        self._failed += not record.success
        if not self._enabled:
            return
        now = time.perf_counter()
        decile = 10 * self._done // self._total
        if self._tty and (now - self._last_draw > 0.1 or self._done == self._total):
            self._last_draw = now
            filled = 30 * self._done // self._total
            self._stream.write(f"\r{self._title} [{'#' * filled}{'.' * (30 - filled)}] {self._line(now)}")
            self._stream.flush()
        elif not self._tty and decile > self._last_decile:
            self._last_decile = decile
            self._stream.write(f"{self._title}: {self._line(now)}\n")

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        failed = f", {self._failed} failed" if self._failed else ""
        return f"{self._done}/{self._total} ({elapsed:.1f} s, {self._done / max(elapsed, 1e-9):.2f} req/s{failed})"

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


async def send_all(backend, requests: list[traffic.RequestSpec], max_concurrency: int | None,
                   progress: ProgressBar) -> tuple[list[metrics.RequestRecord], float]:
    """Sends each request at its arrival offset (later if max_concurrency are in flight); returns the records
    and the run's duration (first arrival to last completion). Every request ends by its own timeout."""
    start = time.perf_counter()
    clock = backends.monotonic_clock(start)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(spec: traffic.RequestSpec) -> metrics.RequestRecord:
        delay = spec.arrival_s - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        record = metrics.RequestRecord(spec.index, spec.prompt_len, spec.output_len, scheduled_s=spec.arrival_s)
        if limit is None:
            await backend.send(spec, record, clock)
        else:
            async with limit:
                await backend.send(spec, record, clock)
        progress.update(record)
        return record

    records = await asyncio.gather(*(one(spec) for spec in requests))
    return list(records), clock()


async def warm_up(backend, requests: list[traffic.RequestSpec], count: int) -> None:
    """Sends `count` of the run's requests (at once) and awaits them; the first must succeed."""
    if count == 0:
        return
    clock = backends.monotonic_clock(time.perf_counter())
    specs = [requests[i % len(requests)] for i in range(count)]
    records = [metrics.RequestRecord(s.index, s.prompt_len, s.output_len) for s in specs]
    await asyncio.gather(*(backend.send(s, r, clock) for s, r in zip(specs, records)))
    if not records[0].success:
        raise RuntimeError(f"the warm-up request failed: {records[0].error or 'no output'}")


def _delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    return {key: after[key] - before[key] for key in after}


async def _counters(backend, config: BenchConfig) -> dict | None:
    if config.metrics_url:
        return await backends.scrape_counters(config.metrics_url)
    return await backend.counters()


async def benchmark(config: BenchConfig) -> dict:
    """Every rate of the config against its endpoint; the result that LABEL.json holds."""
    backend = backends.make_backend(config.url, config.backend, api_key=config.api_key,
                                    timeout_s=config.request_timeout_s, sampling=config.sampling, model=config.model)
    async with backend:
        info = await backend.info()
        backend.model = config.model or info.model
        label = config.label or re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(info.root.rstrip("/")) or "run")
        traffic_config = traffic.TrafficConfig(
            config.num_requests, config.input_len, config.output_len, vocab_size_of(config, info),
            prefix_len=config.prefix_len, min_token_id=config.min_token_id, max_model_len=info.max_model_len,
            burstiness=config.burstiness, seed=config.seed)
        requests, num_cut = traffic.build_requests(traffic_config)
        await warm_up(backend, requests, config.num_warmups)
        runs = []
        for rate in config.request_rates:
            specs, _ = traffic.build_requests(dataclasses.replace(traffic_config, request_rate=rate))
            before = await _counters(backend, config)
            progress = ProgressBar(len(specs), f"{label} @ {rate:g} req/s", config.progress)
            records, duration_s = await send_all(backend, specs, config.max_concurrency, progress)
            progress.close()
            summary = metrics.summarize(records, duration_s, config.goodput_ms, config.percentiles)
            summary.update(request_rate=rate, burstiness=config.burstiness, max_concurrency=config.max_concurrency)
            counters = _delta(before, await _counters(backend, config))
            print(metrics.format_summary(summary, f"{label} @ {rate:g} req/s", counters), flush=True)
            runs.append({"request_rate": rate, "summary": summary, "server_counters": counters,
                         "requests": [r.to_json(config.save_detailed) for r in records], "_records": records})
    return {"label": label, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "endpoint": {"url": config.url, "backend": backends.parse_url(config.url, config.backend)[0],
                         "model": backend.model, "root": info.root, "max_model_len": info.max_model_len},
            "traffic": {**_jsonable({k: v for k, v in dataclasses.asdict(traffic_config).items()
                                     if k != "request_rate"}), "num_prompts_cut": num_cut},
            "config": _jsonable({k: v for k, v in dataclasses.asdict(config).items() if k != "api_key"}),
            "runs": runs}


def _jsonable(value):
    """inf -> "inf" and NaN (a figure with no samples) -> null, recursively: JSON has neither."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(result: dict, output_dir: str, plots: bool) -> list[str]:
    """LABEL.json and, when matplotlib is there, the plots; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    label = result["label"]
    path = os.path.join(output_dir, f"{label}.json")
    with open(path, "w") as f:
        json.dump(_jsonable({**result, "runs": [{k: v for k, v in run.items() if k != "_records"}
                                                for run in result["runs"]]}), f, indent=1)
    written = [path]
    if plots:
        if __package__:
            from . import serving_plots as plotting
        else:
            import serving_plots as plotting
        if not plotting.matplotlib_available():
            print("serving: matplotlib is not installed (pip install -e '.[bench]'): no plots", file=sys.stderr)
            return written
        runs = result["runs"]
        written.append(plotting.plot_latency_cdfs(
            [(f"{run['request_rate']:g} req/s", run["_records"]) for run in runs],
            os.path.join(output_dir, f"{label}-latency-cdf.png"), title=label))
        if len(runs) > 1:
            written.append(plotting.plot_rate_sweep(
                {label: [(run["request_rate"], run["summary"]) for run in runs]},
                os.path.join(output_dir, f"{label}-rate-sweep.png")))
    return written


def run(config: BenchConfig) -> int:
    """The blocking benchmark: 0 when every run completed at least one request, else 1."""
    try:
        result = asyncio.run(benchmark(config))
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, failed warm-up, unknown vocabulary, ...
        print(f"serving benchmark: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if config.output_dir:
        for path in write_outputs(result, config.output_dir, config.plots):
            print(f"wrote {path}")
    return 0 if all(run["summary"]["completed"] > 0 for run in result["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
