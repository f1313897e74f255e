"""Shared pieces of the control-plane tests: a local Ray per test module, small CPU specs, bounded waits.

    from tests.cluster.ray_fixtures import ray_local, tiny_spec  # noqa: F401 (ray_local is a fixture)
"""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest

RAY_NUM_CPUS = 4


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private Ray head for the module (no dashboard), connected to, and stopped after it.

    The head runs in its own `ray start --block` process. `ray.init(address="local")` would fork the GCS and
    raylet from this process through a preexec_fn, and a child forked while gRPC threads left by earlier tests
    hold a lock can hang before exec: CI saw the GCS port file never written. Token auth is off for this private
    head, since a driver given an explicit address does not pick up the token `ray start` would make."""
    ray = pytest.importorskip("ray")
    from partita.cluster.controller import NAMESPACE

    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
             f"--num-cpus={RAY_NUM_CPUS}", "--include-dashboard=false", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        wait_until(lambda: head.poll() is not None or b"Ray runtime started" in log.read_bytes(), 120,
                   "`ray start --head`")
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        ray.init(address=f"127.0.0.1:{port}", namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        yield ray
    finally:
        ray.shutdown()
        head.terminate()
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def tiny_spec(name: str, replicas: int = 1, **sections: Any):
    """A ClusterSpec of the tiny MoE on CPU with small limits and quick control loops."""
    from partita.cluster.spec import ClusterSpec

    data = {
        "name": name,
        "model": {"preset": "tiny-moe"},
        "pools": [{"name": "p", "replicas": replicas, "gpus_per_worker": 0}],
        "scheduler": {"max_model_len": 256, "max_num_seqs": 16, "max_num_batched_tokens": 256},
        "gateway": {"grpc_port": 0, "http_port": 0},
        "controller": {"reconcile_interval_s": 0.2, "heartbeat_timeout_s": 10.0, "restart_backoff_s": 0.5,
                       "restart_backoff_max_s": 4.0, "drain_timeout_s": 20.0, "worker_start_timeout_s": 120.0},
        "router": {"refresh_interval_s": 0.1, "rerun_wait_s": 60.0},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "model"
        data[key] = {**data.get(key, {}), **value} if merge else value
    return ClusterSpec.from_dict(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """Polls until predicate() is truthy (returns it) or fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


async def collect(stream) -> tuple[list[int], Any]:
    """All token ids of a router stream and its last output."""
    ids, last = [], None
    async for out in stream:
        ids += out.new_token_ids
        last = out
    return ids, last


def run(coro, timeout_s: float = 180.0):
    """asyncio.run with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class LoopThread:
    """An event loop in a daemon thread; `call` runs a coroutine there and waits for its result."""

    def __init__(self):
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def call(self, coro, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class ServedDeployment:
    """A deployment (controller + workers), its router and a gateway on free ports, on a LoopThread."""

    def __init__(self, spec):
        from partita.cluster.controller import start_controller

        self.spec = spec
        self.controller = start_controller(spec)
        self.thread = LoopThread()
        self.router = self.gateway = None

    def start(self, ready_timeout_s: float = 120.0) -> "ServedDeployment":
        import ray

        assert ray.get(self.controller.wait_ready.remote(ready_timeout_s), timeout=ready_timeout_s + 30)
        self.thread.call(self._start(), ready_timeout_s)
        return self

    async def _start(self) -> None:
        from partita.cluster.gateway import Gateway
        from partita.cluster.router import RayRouter

        self.router = await RayRouter.connect(self.controller, self.spec)
        self.gateway = Gateway(self.router, self.spec.gateway)
        await self.gateway.start()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.gateway.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def stop(self) -> None:
        from partita.cluster.controller import stop_controller

        try:
            if self.gateway is not None:
                self.thread.call(self.gateway.stop(1.0), 30)
            if self.router is not None:
                self.thread.call(self.router.aclose(), 30)
        finally:
            self.thread.close()
            stop_controller(self.controller)
