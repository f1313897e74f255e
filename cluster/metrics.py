"""Prometheus metrics of the serving path, with vLLM's names and meanings under the prefix `partita:`.

Per request (observed by the gateway as tokens reach it):
    partita:time_to_first_token_seconds    histogram   arrival -> first token
    partita:inter_token_latency_seconds    histogram   gap between consecutive tokens
    partita:e2e_request_latency_seconds    histogram   arrival -> last token
    partita:request_queue_time_seconds     histogram   arrival -> leaving the engine's waiting queue,
                                                       when the engine reports it (RequestOutput.queue_time_s)
    partita:prompt_tokens_total, partita:generation_tokens_total               counters
    partita:request_success_total{finished_reason}                             counter (stop/length/abort)
    partita:request_rejected_total{reason}                                     counter (overload, draining, ...)
Per engine (read from the latest load report at scrape time; labels pool, role, worker):
    partita:num_requests_running, partita:num_requests_waiting                 gauges
    partita:kv_cache_usage_perc                                                gauge, 0..1 as in vLLM
    partita:num_preemptions_total                                              counter
Gateway:
    partita:gateway_queued_requests, partita:gateway_active_requests           gauges
KV migration (prefill/decode disaggregation; labels kv_format; from the router's totals at scrape time):
    partita:kv_migrations_total, partita:kv_migrated_bytes_total               counters (wire payload bytes)
    partita:kv_transfer_seconds_total                                          counter (Reserve, or the first
                                                                               chunk where the decode worker
                                                                               was reserved during the prefill,
                                                                               to Commit; / migrations = mean
                                                                               transfer)
    partita:kv_stream_seconds_total                                            counter (the part of the
                                                                               transfer to the last chunk's
                                                                               ack: the bytes alone; the rest
                                                                               is Commit, which waits for the
                                                                               decode worker's first step)
    partita:kv_handoff_seconds_total                                           counter (the prefill's first
                                                                               token to Commit: its wait for the
                                                                               export, then the transfer; 0 for
                                                                               layer-streamed migrations)

Every metric carries `model_name`. Each `ServingMetrics` has its own registry: no global state.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from partita.cluster.gateway_engine import MigrationTotals, WorkerLoad

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServingMetrics:
    """The gateway's metrics; `loads`, `gateway_counts` and `migrations` are read at scrape time.

    gateway_counts: () -> (queued, active) requests in the gateway.
    migrations: () -> {kv_format: MigrationTotals} so far; None where
        nothing migrates.
    """

    def __init__(self, model_name: str, loads: Callable[[], Sequence[WorkerLoad]],
                 gateway_counts: Callable[[], tuple[int, int]], registry: CollectorRegistry | None = None,
                 migrations: Callable[[], Mapping[str, MigrationTotals]] | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, name = self.registry, ["model_name"]
        self.ttft = Histogram("partita:time_to_first_token_seconds", "Time to first token.", name,
                              buckets=TTFT_BUCKETS_S, registry=r).labels(model_name)
        self.itl = Histogram("partita:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             name, buckets=ITL_BUCKETS_S, registry=r).labels(model_name)
        self.e2e = Histogram("partita:e2e_request_latency_seconds", "Arrival to last token.", name,
                             buckets=E2E_BUCKETS_S, registry=r).labels(model_name)
        self.queue_time = Histogram("partita:request_queue_time_seconds", "Time spent waiting in the engine queue.",
                                    name, buckets=TTFT_BUCKETS_S, registry=r).labels(model_name)
        self.prompt_tokens = Counter("partita:prompt_tokens", "Prompt tokens processed.", name,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("partita:generation_tokens", "Tokens generated.", name,
                                         registry=r).labels(model_name)
        success = Counter("partita:request_success", "Finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._rejected = Counter("partita:request_rejected", "Requests refused or failed, by reason.",
                                 ["model_name", "reason"], registry=r)
        self._model_name = model_name
        r.register(_LoadCollector(model_name, loads, gateway_counts))
        if migrations is not None:
            r.register(_MigrationCollector(model_name, migrations))

    def reject(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    def finished(self, reason: str | None, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        counter = self.request_success.get(reason or "abort")
        if counter is not None:
            counter.inc()

    def render(self) -> bytes:
        """The text exposition format (Content-Type: CONTENT_TYPE)."""
        return generate_latest(self.registry)


class _LoadCollector:
    """Engine and gateway gauges, computed from the latest load reports whenever Prometheus scrapes."""

    def __init__(self, model_name: str, loads: Callable[[], Sequence[WorkerLoad]],
                 gateway_counts: Callable[[], tuple[int, int]]):
        self._model_name, self._loads, self._gateway_counts = model_name, loads, gateway_counts

    def describe(self):
        return []

    def collect(self):
        labels = ["model_name", "pool", "role", "worker"]
        running = GaugeMetricFamily("partita:num_requests_running", "Requests running on the engine.", labels=labels)
        waiting = GaugeMetricFamily("partita:num_requests_waiting", "Requests waiting in the engine queue.",
                                    labels=labels)
        kv = GaugeMetricFamily("partita:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).",
                               labels=labels)
        preempt = CounterMetricFamily("partita:num_preemptions", "Preemptions since start.", labels=labels)
        for load in self._loads():
            values = [self._model_name, load.pool, load.role, load.worker_id]
            running.add_metric(values, load.num_running)
            waiting.add_metric(values, load.num_waiting)
            kv.add_metric(values, load.kv_cache_usage)
            preempt.add_metric(values, load.num_preemptions)
        queued, active = self._gateway_counts()
        gq = GaugeMetricFamily("partita:gateway_queued_requests", "Requests admitted with no token yet.",
                               labels=["model_name"])
        gq.add_metric([self._model_name], queued)
        ga = GaugeMetricFamily("partita:gateway_active_requests", "Requests in flight through the gateway.",
                               labels=["model_name"])
        ga.add_metric([self._model_name], active)
        return [running, waiting, kv, preempt, gq, ga]


class _MigrationCollector:
    """KV migration counters from the router's running totals, per KV format."""

    def __init__(self, model_name: str, migrations: Callable[[], Mapping[str, MigrationTotals]]):
        self._model_name, self._migrations = model_name, migrations

    def describe(self):
        return []

    def collect(self):
        labels = ["model_name", "kv_format"]
        count = CounterMetricFamily("partita:kv_migrations", "Requests whose KV moved to a decode worker.",
                                    labels=labels)
        size = CounterMetricFamily("partita:kv_migrated_bytes", "KV payload bytes sent to decode workers.",
                                   labels=labels)
        seconds = CounterMetricFamily("partita:kv_transfer_seconds", "Seconds spent in KV transfers.",
                                      labels=labels)
        stream = CounterMetricFamily("partita:kv_stream_seconds", "Seconds of KV transfers up to the last chunk's "
                                     "ack (the bytes alone; the rest is the commit).", labels=labels)
        handoff = CounterMetricFamily("partita:kv_handoff_seconds", "Seconds from the prefill's first token to the "
                                      "decode worker's commit (export wait, export and transfer).", labels=labels)
        for kv_format, t in sorted(self._migrations().items()):
            values = [self._model_name, kv_format]
            count.add_metric(values, t.migrations)
            size.add_metric(values, t.num_bytes)
            seconds.add_metric(values, t.transfer_seconds)
            stream.add_metric(values, t.stream_seconds)
            handoff.add_metric(values, t.handoff_seconds)
        return [count, size, seconds, stream, handoff]
