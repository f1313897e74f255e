"""Gateway states over time: draining (Admin.Drain), a dead engine, and server-side timeouts, as seen by
health (gRPC Check/Watch, HTTP /health), new requests, running requests and the KV cache."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from partita.client import Client, RetryPolicy, UnavailableError
from partita.protos.grpc_health.v1 import health_pb2, health_pb2_grpc
from partita.protos.partita.v1 import admin_pb2, admin_pb2_grpc, inference_pb2 as pb, inference_pb2_grpc
from tests.client.gateway_server import LONG, engine_idle, running_gateway, wait_until

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class CountingRetryPolicy(RetryPolicy):
    """Records the attempts it was asked to back off from."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "attempts", [])

    def backoff_s(self, attempt: int) -> float:
        self.attempts.append(attempt)
        return super().backoff_s(attempt)


def long_request(**kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=LONG, ignore_eos=True), **kwargs)


def http_get(url: str) -> tuple[int, dict, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_drain_stops_admitting_reports_not_serving_and_aborts_stragglers():
    with running_gateway(retry_after_s=3) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        running = stub.Generate(long_request(), timeout=30)
        next(running)

        drained = admin_pb2_grpc.AdminStub(channel).Drain(admin_pb2.DrainRequest(timeout_s=0.3), timeout=30)
        assert (drained.num_finished, drained.num_aborted) == (0, 1)
        assert list(running)[-1].complete.finish_reason == pb.FINISH_REASON_ABORT
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        assert health.Check(health_pb2.HealthCheckRequest()).status == NOT_SERVING

        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(text="Hi"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
        status, headers, body = http_get(server.http_url + "/health")
        assert status == 503 and headers["Retry-After"] == "3" and json.loads(body)["status"] == "draining"
        req = urllib.request.Request(server.http_url + "/v1/completions", data=b'{"prompt": "Hi"}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 503 and err.value.headers["Retry-After"] == "3"

        policy = CountingRetryPolicy(max_retries=2, initial_backoff_s=0.01, max_backoff_s=0.02)
        with Client(server.grpc_target, retry_policy=policy) as client:
            with pytest.raises(UnavailableError) as info:
                client.generate("Hi", max_tokens=2)
        assert policy.attempts == [0, 1] and info.value.request_id
        assert wait_until(lambda: engine_idle(server))


def test_dead_engine_is_not_serving_and_unavailable():
    with running_gateway() as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        running = stub.Generate(long_request(), timeout=30)
        next(running)
        server.gateway.engine.shutdown()
        with pytest.raises(grpc.RpcError) as info:
            list(running)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(text="Hi"), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert http_get(server.http_url + "/health")[0] == 503


def test_request_and_queue_timeouts_abort_and_free_kv_blocks():
    with running_gateway(engine={"max_num_seqs": 1}, request_timeout_s=0.6, queue_timeout_s=0.3) as server, \
            grpc.insecure_channel(server.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        running = stub.Generate(long_request(), timeout=30)
        next(running)
        outcome = {}

        def queued_call():
            try:
                list(stub.Generate(long_request(), timeout=30))
            except grpc.RpcError as e:
                outcome["queued"] = (e.code(), e.details())

        thread = threading.Thread(target=queued_call)
        thread.start()
        with pytest.raises(grpc.RpcError) as info:
            list(running)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "0.6 s" in info.value.details()
        thread.join(30)
        assert outcome["queued"][0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "queue_timeout_s" in outcome["queued"][1]
        assert wait_until(lambda: engine_idle(server))

        req = urllib.request.Request(server.http_url + "/v1/completions",
                                     data=json.dumps({"prompt": "Hi", "max_tokens": LONG, "ignore_eos": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 408 and json.loads(err.value.read())["error"]["type"] == "timeout_error"
        assert wait_until(lambda: engine_idle(server))
