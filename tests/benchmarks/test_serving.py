"""The serving benchmark against a real gateway and engine (tiny-llama on CPU, in this process): `partita bench`
over HTTP and over gRPC, figures consistent with each other and with the server's own counters, arrivals on
schedule, the concurrency cap held, goodput targets applied, failures counted, files and plots written."""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math

import pytest

from partita.cluster.bench_cli import add_bench_parser, run_bench
from tests.benchmarks.harness import assert_consistent, backends, metrics, serving

pytestmark = pytest.mark.timeout(120)
SMALL = ["--num-requests", "10", "--input-len", "24", "--output-len", "8", "--no-progress",
         "--request-timeout-s", "30"]


def bench(argv: list[str]) -> int:
    """`partita bench ARGV` as cluster/cli.py will run it."""
    parser = argparse.ArgumentParser(prog="partita")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return run_bench(parser.parse_args(["bench", *argv]))


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_http_rate_sweep_is_consistent_and_matches_the_server(gateway, tmp_path):
    rc = bench(["--url", gateway.http_url, *SMALL, "--request-rate", "20", "inf", "--length-dist", "uniform",
                "--range-ratio", "0.5", "--prefix-len", "8", "--goodput", "ttft:60000", "tpot:60000",
                "--output-dir", str(tmp_path), "--label", "http", "--save-detailed"])
    assert rc == 0
    result = load(tmp_path / "http.json")
    assert result["endpoint"]["backend"] == "http" and result["traffic"]["vocab_size"] == 512  # tiny-llama's
    assert [run["request_rate"] for run in result["runs"]] == [20.0, "inf"]
    for run in result["runs"]:
        assert_consistent(run, 10)
        s = run["summary"]
        assert s["failed"] == 0 and s["request_goodput"] == pytest.approx(s["request_throughput"])
        assert run["server_counters"] is not None  # read from the gateway's /metrics
    paced = result["runs"][0]["requests"]
    assert max(r["scheduled_s"] for r in paced) > 0.1  # Poisson gaps at 20 req/s
    assert all(r["start_s"] - r["scheduled_s"] < 0.5 for r in paced)  # sent when due
    assert all(r["scheduled_s"] == 0.0 for r in result["runs"][1]["requests"])
    # the same requests at both rates (seeded): same prompt and output lengths
    assert [(r["prompt_len"], r["max_tokens"]) for r in paced] == \
           [(r["prompt_len"], r["max_tokens"]) for r in result["runs"][1]["requests"]]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "http-latency-cdf.png").stat().st_size > 10_000
        assert (tmp_path / "http-rate-sweep.png").stat().st_size > 10_000


def test_grpc_with_a_concurrency_cap(gateway, tmp_path):
    rc = bench(["--url", f"grpc://{gateway.grpc_target}", *SMALL, "--max-concurrency", "2", "--output-dir",
                str(tmp_path), "--label", "grpc", "--no-plots", "--metrics-url", gateway.http_url + "/metrics"])
    assert rc == 0
    result = load(tmp_path / "grpc.json")
    run = result["runs"][0]
    assert result["endpoint"]["backend"] == "grpc" and run["summary"]["max_concurrent_requests"] <= 2
    assert_consistent(run, 10)
    assert run["server_counters"]["generation_tokens"] == 80
    assert not list(tmp_path.glob("*.png"))


def test_same_seed_same_traffic_over_both_transports(gateway, tmp_path):
    for url, label in ((gateway.http_url, "a"), (f"grpc://{gateway.grpc_target}", "b")):
        assert bench(["--url", url, *SMALL, "--length-dist", "lognormal", "--seed", "3", "--num-warmups", "0",
                      "--output-dir", str(tmp_path), "--label", label, "--no-plots"]) == 0
    a, b = (load(tmp_path / f"{x}.json")["runs"][0]["requests"] for x in "ab")
    assert [(r["prompt_len"], r["output_tokens"]) for r in a] == [(r["prompt_len"], r["output_tokens"]) for r in b]
    assert len({r["prompt_len"] for r in a}) > 3  # lognormal lengths vary


def test_tight_targets_make_goodput_zero(gateway, tmp_path, capsys):
    assert bench(["--url", gateway.http_url, *SMALL, "--goodput", "ttft:0.001", "--output-dir", str(tmp_path),
                  "--label", "tight", "--no-plots"]) == 0
    run = load(tmp_path / "tight.json")["runs"][0]
    assert run["summary"]["request_goodput"] == 0.0 < run["summary"]["request_throughput"]
    assert "Request goodput (req/s):" in capsys.readouterr().out


def test_failures_are_counted_not_raised(gateway, tmp_path):
    # ids beyond tiny-llama's 512-token vocabulary: the gateway answers 400 to each request
    assert bench(["--url", gateway.http_url, *SMALL, "--vocab-size", "100000", "--min-token-id", "50000",
                  "--num-warmups", "0", "--output-dir", str(tmp_path), "--label", "bad", "--no-plots"]) == 1
    run = load(tmp_path / "bad.json")["runs"][0]
    assert (run["summary"]["completed"], run["summary"]["failed"]) == (0, 10)
    assert all(r["error"].startswith("HTTP 400") for r in run["requests"])
    assert_consistent(run, 10)


def test_a_failing_warm_up_stops_the_run(gateway, capsys):
    assert bench(["--url", gateway.http_url, *SMALL, "--vocab-size", "100000", "--min-token-id", "50000"]) == 1
    assert "warm-up request failed" in capsys.readouterr().err


def test_unusable_flags_name_the_flag(capsys):
    assert bench(["--goodput", "latency:5"]) == 2
    assert "--goodput 'latency:5'" in capsys.readouterr().err
    assert bench(["--url", "ftp://x:1"]) == 2
    assert bench(["--num-requests", "0"]) == 2
    assert "--num-requests: must be >= 1" in capsys.readouterr().err


def test_unreachable_endpoint_fails_cleanly(capsys):
    assert bench(["--url", "http://127.0.0.1:9", "--request-timeout-s", "5", "--no-progress"]) == 1
    assert "serving benchmark: error" in capsys.readouterr().err


def test_url_forms():
    assert backends.parse_url("http://h:8000/v1/") == ("http", "http://h:8000")
    assert backends.parse_url("grpc://h:50051") == ("grpc", "h:50051")
    assert backends.parse_url("h:50051", "grpc") == ("grpc", "h:50051")
    with pytest.raises(ValueError, match="is a grpc address"):
        backends.parse_url("grpc://h:1", "http")


def test_progress_bar_without_a_terminal_prints_tenths():
    stream = io.StringIO()
    bar = serving.ProgressBar(20, "run", True, stream)
    for i in range(20):
        bar.update(metrics.RequestRecord(i, 1, 1, chunk_times_s=[0.1] if i % 5 else [], error="" if i % 5 else "x"))
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("run: 20/20") and "4 failed" in lines[-1]


def test_server_counters_parse():
    text = ('# HELP x\npartita:generation_tokens_total{model_name="m"} 12.0\n'
            'partita:request_success_total{model_name="m",finished_reason="length"} 3.0\n'
            'partita:request_success_total{model_name="m",finished_reason="stop"} 1.0\n'
            'partita:generation_tokens_created{model_name="m"} 1.7e9\n'
            'partita:kv_migrations_total{model_name="m",kv_format="int4"} 3.0\n'
            'partita:kv_migrations_total{model_name="m",kv_format="none"} 2.0\n'
            'partita:kv_transfer_seconds_total{model_name="m",kv_format="int4"} 0.25\n'
            'partita:kv_stream_seconds_total{model_name="m",kv_format="int4"} 0.125\n'
            'partita:kv_handoff_seconds_total{model_name="m",kv_format="int4"} 0.5\n')
    counters = backends.parse_counters(text)
    assert counters["generation_tokens"] == 12.0 and counters["request_success"] == 4.0
    assert counters["prompt_tokens"] == 0.0 and not math.isnan(counters["num_preemptions"])
    assert (counters["kv_migrations"], counters["kv_transfer_seconds"], counters["kv_migrated_bytes"]) == (5, 0.25, 0)
    assert (counters["kv_handoff_seconds"], counters["kv_stream_seconds"]) == (0.5, 0.125)
