"""Per-request timings of a serving run and the figures computed from them (vLLM's names and meanings).

    TTFT   time to first token: request sent -> first output token received
    TPOT   time per output token of one request: (E2E - TTFT) / (output tokens - 1), requests of > 1 token
    ITL    inter-token latency: gap between consecutive token-bearing chunks of a stream, all requests pooled
           (a chunk that carries k > 1 tokens counts once, as in vLLM's benchmark)
    E2E    end-to-end latency: request sent -> last byte of its stream
    goodput  completed requests per second that met every target given (TTFT, TPOT, E2E), over the run
    throughput  completed requests, output tokens and prompt + output tokens per second of the run

Times are seconds of `time.perf_counter()` relative to the run's start; summaries are in ms, keyed as
vLLM's `benchmark_serving` keys them (`mean_ttft_ms`, `p99_tpot_ms`, `request_goodput`, ...).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

# itl1, the gap from a request's first chunk to its second, is where a disaggregated (PD) deployment's KV transfer
# shows: the prefill worker streams the first token, the decode worker the second once the KV has moved
METRICS = ("ttft", "tpot", "itl", "itl1", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "itl1": "First Inter-token Latency (1st to 2nd chunk)",
                 "e2el": "End-to-end Latency"}
GOODPUT_TARGETS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What one request did, as the client saw it.

    index: the request's position in the run; prompt_len, max_tokens: what was asked.
    scheduled_s: when it was due (its arrival offset); start_s: when it was sent (later than scheduled_s
        when --max-concurrency held it back); end_s: when its stream ended (or failed).
    chunk_times_s: arrival time of each chunk that carried output tokens, in order.
    output_tokens: tokens generated (the server's usage count when it sends one, else the chunks' count).
    finish_reason: stop, length or abort; error: why it failed ("" when it succeeded).
    """

    index: int
    prompt_len: int
    max_tokens: int
    scheduled_s: float = 0.0
    start_s: float = 0.0
    end_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float:
        return self.chunk_times_s[0] - self.start_s

    @property
    def e2el_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        times = self.chunk_times_s
        return [b - a for a, b in zip(times, times[1:])]

    def to_json(self, detailed: bool) -> dict:
        out = asdict(self)
        out.pop("chunk_times_s")
        out["success"] = self.success
        if self.success:
            out.update(ttft_s=self.ttft_s, tpot_s=self.tpot_s, e2el_s=self.e2el_s,
                       num_chunks=len(self.chunk_times_s))
        if detailed:
            out["chunk_times_s"] = self.chunk_times_s
        return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    mean = sum(ms) / len(ms) if ms else math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms)) if ms else math.nan
    out = {f"mean_{name}_ms": mean, f"median_{name}_ms": percentile(ms, 50), f"std_{name}_ms": std}
    for q in percentiles:
        out[f"p{q:g}_{name}_ms"] = percentile(ms, q)
    return out


def metric_values_s(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Seconds per metric over the successful requests (ITL pooled over all their gaps; ITL1 the first gap of
    each request that streamed two chunks or more)."""
    done = [r for r in records if r.success]
    return {"ttft": [r.ttft_s for r in done], "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
            "itl": [gap for r in done for gap in r.itl_s], "itl1": [r.itl_s[0] for r in done if r.itl_s],
            "e2el": [r.e2el_s for r in done]}


def meets_targets(record: RequestRecord, targets_ms: dict[str, float]) -> bool:
    """vLLM's rule: every target given is met; a one-token request has TPOT 0."""
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s or 0.0, "e2el": record.e2el_s}
    return all(values[name] * 1e3 <= target for name, target in targets_ms.items())


def max_in_flight(records: list[RequestRecord]) -> int:
    """The most requests sent and not yet finished at any moment."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def summarize(records: list[RequestRecord], duration_s: float, goodput_targets_ms: dict[str, float] | None = None,
              percentiles: tuple[float, ...] = (90.0, 99.0)) -> dict:
    """The run's figures: counts, throughput, goodput and the latency statistics, in vLLM's keys."""
    done = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.output_tokens for r in done)
    summary: dict = {
        "num_requests": len(records), "completed": len(done), "failed": len(failed), "duration_s": duration_s,
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s if duration_s > 0 else math.nan,
        "output_throughput": total_output / duration_s if duration_s > 0 else math.nan,
        "total_token_throughput": (total_input + total_output) / duration_s if duration_s > 0 else math.nan,
        "max_concurrent_requests": max_in_flight(records),
        "goodput_targets_ms": dict(goodput_targets_ms or {}),
        "request_goodput": None,
    }
    if goodput_targets_ms:
        num_good = sum(meets_targets(r, goodput_targets_ms) for r in done)
        summary["num_good_requests"] = num_good
        summary["request_goodput"] = num_good / duration_s if duration_s > 0 else math.nan
    for name, values in metric_values_s(records).items():
        summary.update(_stats(name, values, percentiles))
    summary["errors"] = dict(Counter(r.error for r in failed).most_common(5))
    return summary


def format_summary(summary: dict, title: str = "Serving Benchmark Result", counters: dict | None = None) -> str:
    """The vLLM-style text block printed after a run; counters: the server's counts for the run
    (`SERVER_COUNTERS`), whose KV migrations, when there were any, get a section of their own."""
    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]

    def row(label: str, value, fmt: str = "{:.2f}") -> None:
        text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
        lines.append(f"{label:<40}{text:>10}")

    row("Successful requests:", summary["completed"], "{}")
    row("Failed requests:", summary["failed"], "{}")
    if summary.get("max_concurrency"):
        row("Maximum request concurrency:", summary["max_concurrency"], "{}")
    row("Benchmark duration (s):", summary["duration_s"])
    row("Total input tokens:", summary["total_input_tokens"], "{}")
    row("Total generated tokens:", summary["total_output_tokens"], "{}")
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary.get("request_goodput") is not None:
        row("Request goodput (req/s):", summary["request_goodput"])
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Total token throughput (tok/s):", summary["total_token_throughput"])
    for name in METRICS:
        lines.append(f"{' ' + METRIC_TITLES[name] + ' ':-^{width}}")
        for key in [k for k in summary if k.endswith(f"_{name}_ms") and not k.startswith("std_")]:
            stat = key.split("_")[0]
            label = {"mean": "Mean", "median": "Median"}.get(stat, stat.upper())
            row(f"{label} {name.upper()} (ms):", summary[key])
    if counters and counters.get("kv_migrations"):
        n = counters["kv_migrations"]
        lines.append(f"{' KV Migration (server counters) ':-^{width}}")
        row("Requests whose KV moved:", n, "{:.0f}")
        row("Mean KV bytes per request (MB):", counters["kv_migrated_bytes"] / n / 1e6)
        row("Mean first token to Commit (ms):", counters["kv_handoff_seconds"] / n * 1e3)
        row("  of which the transfer (ms):", counters["kv_transfer_seconds"] / n * 1e3)
        if counters.get("kv_stream_seconds"):  # servers before the counter have none
            row("    of which to the last ack (ms):", counters["kv_stream_seconds"] / n * 1e3)
    for error, count in summary.get("errors", {}).items():
        lines.append(f"failed x{count}: {error[:200]}")
    lines.append("=" * width)
    return "\n".join(lines)
