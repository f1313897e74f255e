"""A real gateway (gRPC + HTTP) in front of a real engine with a tiny random model, on loopback ports
picked by the OS; shared by the SDK tests and the gateway tests."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

from partita.cluster.async_engine import AsyncEngine
from partita.cluster.gateway_config import GatewayConfig
from partita.cluster.gateway_thread import GatewayThread
from partita.workers import EngineConfig

ENGINE_DEFAULTS = {"max_num_seqs": 16, "max_model_len": 2048, "num_kv_blocks": 512}
LONG = 1500  # max_tokens of a request meant to be cut short (it would run for seconds)


@contextlib.contextmanager
def running_gateway(engine: dict | None = None, **config) -> Iterator[GatewayThread]:
    engine_config = EngineConfig(**{**ENGINE_DEFAULTS, **(engine or {})})
    gateway_config = GatewayConfig(**{"grpc_port": 0, "http_port": 0, **config})
    server = GatewayThread(lambda: AsyncEngine.from_model("tiny-llama", device="cpu", config=engine_config),
                           gateway_config)
    with server:
        yield server


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def engine_idle(server: GatewayThread) -> bool:
    """No request left in the engine or the gateway, and every KV block free."""
    load = server.gateway.engine.loads()[0]
    queued, active = server.gateway.tracker.counts()
    return (load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks
            and queued == 0 and active == 0)


def engine_busy(server: GatewayThread, num_running: int = 1) -> bool:
    return server.gateway.engine.loads()[0].num_running >= num_running
