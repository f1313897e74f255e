"""Prometheus metrics: names and labels (vLLM's, prefixed `partita:`), and values that follow real
requests through the gateway."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from partita.client import Client
from partita.cluster.gateway_engine import MigrationTotals, WorkerLoad
from partita.cluster.metrics import ServingMetrics
from tests.client.gateway_server import LONG, engine_idle, running_gateway, wait_until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(all_samples: dict, name: str, **labels) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_serving_metrics_render_engine_and_gateway_gauges():
    loads = [WorkerLoad("w0", "prefill", "p", 2, 3, 10, 40, 0.75, 4), WorkerLoad("w1", "decode", "d", 5, 0, 1, 40)]
    metrics = ServingMetrics("m", lambda: loads, lambda: (7, 9))
    metrics.ttft.observe(0.02)
    metrics.itl.observe(0.004)
    metrics.finished("stop", 11, 5)
    metrics.finished("length", 3, 2)
    metrics.reject("queue_full")
    s = samples(metrics.render().decode())
    w0 = {"model_name": "m", "pool": "p", "role": "prefill", "worker": "w0"}
    assert value(s, "partita:num_requests_running", **w0) == 2
    assert value(s, "partita:num_requests_waiting", **w0) == 3
    assert value(s, "partita:kv_cache_usage_perc", **w0) == 0.75
    assert value(s, "partita:num_preemptions_total", **w0) == 4
    assert value(s, "partita:num_requests_running", model_name="m", pool="d", role="decode", worker="w1") == 5
    assert value(s, "partita:gateway_queued_requests", model_name="m") == 7
    assert value(s, "partita:gateway_active_requests", model_name="m") == 9
    assert value(s, "partita:prompt_tokens_total", model_name="m") == 14
    assert value(s, "partita:generation_tokens_total", model_name="m") == 7
    assert value(s, "partita:request_success_total", model_name="m", finished_reason="stop") == 1
    assert value(s, "partita:request_rejected_total", model_name="m", reason="queue_full") == 1
    assert value(s, "partita:time_to_first_token_seconds_count", model_name="m") == 1
    assert value(s, "partita:inter_token_latency_seconds_bucket", model_name="m", le="0.005") == 1


def test_kv_migration_counters_sum_per_format():
    totals = {"int4": MigrationTotals().add(1000, 0.25, 0.125, 0.5).add(3000, 0.5, 0.25, 1.0),
              "kivi2": MigrationTotals().add(700, 0.1, 0.05, 0.2)}
    s = samples(ServingMetrics("m", lambda: [], lambda: (0, 0), migrations=lambda: totals).render().decode())
    int4 = {"model_name": "m", "kv_format": "int4"}
    assert value(s, "partita:kv_migrations_total", **int4) == 2
    assert value(s, "partita:kv_migrated_bytes_total", **int4) == 4000
    assert value(s, "partita:kv_transfer_seconds_total", **int4) == 0.75
    assert value(s, "partita:kv_stream_seconds_total", **int4) == 0.375
    assert value(s, "partita:kv_handoff_seconds_total", **int4) == 1.5
    assert value(s, "partita:kv_stream_seconds_total", model_name="m", kv_format="kivi2") == 0.05


def test_metrics_follow_requests_through_the_gateway():
    with running_gateway(served_model_name="tiny") as server, Client(server.grpc_target) as client:
        for _ in range(3):
            client.generate("Hello", max_tokens=4, ignore_eos=True)
        stream = client.stream("Hi", max_tokens=LONG, ignore_eos=True)
        next(stream)
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as resp:
            during = samples(resp.read().decode())
        stream.close()
        assert wait_until(lambda: engine_idle(server))
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as resp:
            after = samples(resp.read().decode())
    engine = {"model_name": "tiny", "pool": "default", "role": "colocated", "worker": "engine-0"}
    assert value(during, "partita:num_requests_running", **engine) == 1
    assert value(during, "partita:kv_cache_usage_perc", **engine) > 0
    assert value(during, "partita:gateway_active_requests", model_name="tiny") == 1
    assert value(after, "partita:num_requests_running", **engine) == 0
    assert value(after, "partita:kv_cache_usage_perc", **engine) == 0
    assert value(after, "partita:request_success_total", model_name="tiny", finished_reason="length") == 3
    assert value(after, "partita:request_success_total", model_name="tiny", finished_reason="abort") == 1
    assert value(after, "partita:prompt_tokens_total", model_name="tiny") == 3 * 5 + 2
    assert value(after, "partita:generation_tokens_total", model_name="tiny") >= 3 * 4 + 1
    assert value(after, "partita:time_to_first_token_seconds_count", model_name="tiny") == 4
    assert value(after, "partita:e2e_request_latency_seconds_count", model_name="tiny") == 4
    assert value(after, "partita:inter_token_latency_seconds_count", model_name="tiny") >= 3 * 3
