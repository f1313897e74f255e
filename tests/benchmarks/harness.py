"""The serving benchmark's modules (benchmarks/serving*.py, sweep.py), imported the way `partita bench`
imports them, and the consistency checks every test run of the harness must pass."""
from __future__ import annotations

import importlib
import math

from partita.cluster.bench_cli import load_harness

serving = load_harness()
traffic = importlib.import_module("_partita_benchmarks.serving_traffic")
metrics = importlib.import_module("_partita_benchmarks.serving_metrics")
backends = importlib.import_module("_partita_benchmarks.serving_backends")
sweep = importlib.import_module("_partita_benchmarks.sweep")


def assert_consistent(run: dict, num_requests: int, exact_output: bool = True) -> None:
    """One rate's run (as LABEL.json holds it): counts add up, every request's timestamps are in order,
    the figures agree with the records, goodput <= throughput, and the server counted what the client did."""
    s, requests = run["summary"], run["requests"]
    assert len(requests) == s["num_requests"] == num_requests
    assert s["completed"] + s["failed"] == num_requests
    done = [r for r in requests if r["success"]]
    assert len(done) == s["completed"]
    for r in requests:
        assert 0.0 <= r["scheduled_s"] <= r["start_s"] + 1e-3 and r["start_s"] <= r["end_s"] <= s["duration_s"]
    for r in done:
        assert 0.0 < r["ttft_s"] <= r["e2el_s"] and r["finish_reason"] in ("length", "stop")
        assert 1 <= r["num_chunks"] <= r["output_tokens"] <= r["max_tokens"]
        if exact_output:
            assert r["output_tokens"] == r["max_tokens"] and r["finish_reason"] == "length"
        if r["output_tokens"] > 1:
            assert math.isclose(r["tpot_s"], (r["e2el_s"] - r["ttft_s"]) / (r["output_tokens"] - 1))
        if "chunk_times_s" in r:
            times = [r["start_s"], *r["chunk_times_s"], r["end_s"]]
            assert times == sorted(times) and len(r["chunk_times_s"]) == r["num_chunks"]
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in done)
    assert s["total_input_tokens"] == sum(r["prompt_len"] for r in done)
    assert math.isclose(s["request_throughput"], s["completed"] / s["duration_s"])
    assert math.isclose(s["output_throughput"], s["total_output_tokens"] / s["duration_s"])
    if s["request_goodput"] is not None:
        assert 0.0 <= s["request_goodput"] <= s["request_throughput"] + 1e-9
    if done:
        assert s["median_ttft_ms"] <= s["p99_ttft_ms"] and s["p90_e2el_ms"] <= s["p99_e2el_ms"]
        assert math.isclose(s["mean_ttft_ms"], 1e3 * sum(r["ttft_s"] for r in done) / len(done))
        assert 1 <= s["max_concurrent_requests"] <= num_requests
    server = run.get("server_counters")
    if server is not None and s["failed"] == 0:
        assert server["generation_tokens"] == s["total_output_tokens"]
        assert server["prompt_tokens"] == s["total_input_tokens"]
        assert server["request_success"] == s["completed"]
