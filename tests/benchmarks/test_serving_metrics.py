"""The figures from hand-built records: TTFT, TPOT, ITL, E2E, throughput, vLLM's goodput rule, failures,
peak concurrency, percentiles as numpy computes them, and the printed summary."""
from __future__ import annotations

import math

import pytest

from tests.benchmarks.harness import metrics

Record = metrics.RequestRecord


def record(index, start, chunks, end, tokens, error="") -> Record:
    return Record(index, prompt_len=10, max_tokens=tokens, scheduled_s=start, start_s=start,
                  end_s=end, chunk_times_s=list(chunks), output_tokens=tokens, finish_reason="length", error=error)


RECORDS = [record(0, 0.0, [0.1, 0.2, 0.3], 0.3, 3),       # TTFT 100 ms, TPOT 100 ms, ITL 100, 100
           record(1, 0.5, [0.55, 0.56], 0.56, 2),          # TTFT 50 ms, TPOT 10 ms, ITL 10
           record(2, 1.0, [1.4], 1.4, 1),                  # TTFT 400 ms, one token: no TPOT, no ITL
           record(3, 1.0, [], 1.2, 0, error="HTTP 400: bad prompt")]


def test_per_request_figures():
    r = RECORDS[0]
    assert (r.ttft_s, r.e2el_s) == pytest.approx((0.1, 0.3))
    assert r.tpot_s == pytest.approx(0.1) and r.itl_s == pytest.approx([0.1, 0.1])
    assert RECORDS[2].tpot_s is None and RECORDS[2].itl_s == []
    assert not RECORDS[3].success and RECORDS[3].to_json(False)["success"] is False


def test_summary():
    s = metrics.summarize(RECORDS, duration_s=2.0, goodput_targets_ms={"ttft": 200, "tpot": 50})
    assert (s["completed"], s["failed"], s["num_requests"]) == (3, 1, 4)
    assert (s["total_output_tokens"], s["total_input_tokens"]) == (6, 30)
    assert (s["request_throughput"], s["output_throughput"], s["total_token_throughput"]) == (1.5, 3.0, 18.0)
    assert s["mean_ttft_ms"] == pytest.approx(550 / 3) and s["median_ttft_ms"] == pytest.approx(100)
    assert s["mean_tpot_ms"] == pytest.approx(55) and s["median_itl_ms"] == pytest.approx(100)
    assert s["mean_e2el_ms"] == pytest.approx((300 + 60 + 400) / 3)
    # first inter-token gaps: #0 100 ms, #1 10 ms; #2 streamed one chunk and has none
    assert (s["mean_itl1_ms"], s["median_itl1_ms"], s["p99_itl1_ms"]) == pytest.approx((55, 55, 99.1))
    # goodput: #0 misses TPOT (100 > 50), #1 meets both, #2 misses TTFT (400 > 200); one good request in 2 s
    assert (s["num_good_requests"], s["request_goodput"]) == (1, 0.5)
    assert s["max_concurrent_requests"] == 2  # #2 and #3 overlap
    assert s["errors"] == {"HTTP 400: bad prompt": 1}
    assert metrics.summarize(RECORDS, 2.0)["request_goodput"] is None
    text = metrics.format_summary(s)
    assert "Successful requests:" in text and "Request goodput (req/s):" in text and "P99 ITL (ms):" in text
    assert "Median ITL1 (ms):" in text and "KV Migration" not in text


def test_summary_shows_the_servers_kv_migrations():
    s = metrics.summarize(RECORDS, 2.0)
    none = dict.fromkeys(("kv_migrations", "kv_migrated_bytes", "kv_transfer_seconds", "kv_handoff_seconds"), 0.0)
    assert "KV Migration" not in metrics.format_summary(s, counters=none)
    text = metrics.format_summary(s, counters={"kv_migrations": 4.0, "kv_migrated_bytes": 144e6,
                                               "kv_transfer_seconds": 0.5, "kv_handoff_seconds": 0.8})
    rows = dict(line.rsplit(None, 1) for line in text.splitlines()
                if line.startswith(("Requests whose", "Mean KV", "Mean first", "  of which")))
    assert rows == {"Requests whose KV moved:": "4", "Mean KV bytes per request (MB):": "36.00",
                    "Mean first token to Commit (ms):": "200.00", "  of which the transfer (ms):": "125.00"}
    assert "to the last ack" not in text  # a server without the stream counter
    text = metrics.format_summary(s, counters={"kv_migrations": 4.0, "kv_migrated_bytes": 144e6,
                                               "kv_transfer_seconds": 0.5, "kv_stream_seconds": 0.3,
                                               "kv_handoff_seconds": 0.8})
    assert "    of which to the last ack (ms):" in text and text.split("to the last ack (ms):")[1].split()[0] == "75.00"


def test_goodput_counts_a_one_token_request_as_tpot_zero():
    assert metrics.meets_targets(RECORDS[2], {"tpot": 1.0})
    assert not metrics.meets_targets(RECORDS[2], {"e2el": 300.0})


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert metrics.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert math.isnan(metrics.percentile([], 50))


def test_no_success_gives_nan_latencies_not_errors():
    s = metrics.summarize(RECORDS[3:], 1.0)
    assert s["completed"] == 0 and math.isnan(s["mean_ttft_ms"]) and s["request_throughput"] == 0.0
    assert "failed x1" in metrics.format_summary(s)
