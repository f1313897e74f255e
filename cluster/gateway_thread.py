"""A gateway on its own event loop in a background thread: for tests, benchmarks and notebooks, where the
caller's thread stays free to act as a client.

    with GatewayThread(lambda: AsyncEngine.from_model("tiny-llama", device="cpu"),
                       GatewayConfig(grpc_port=0, http_port=0)) as server:
        client = Client(server.grpc_target)
        openai_client = OpenAI(base_url=server.http_url + "/v1", api_key="-")
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Coroutine

from partita.cluster.gateway import Gateway
from partita.cluster.gateway_config import GatewayConfig
from partita.cluster.gateway_engine import EngineClient


class GatewayThread:
    """engine_factory runs on the gateway's thread (so the engine client binds that loop)."""

    def __init__(self, engine_factory: Callable[[], EngineClient], config: GatewayConfig | None = None):
        self._engine_factory = engine_factory
        self._config = config or GatewayConfig(grpc_port=0, http_port=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="partita-gateway", daemon=True)
        self.gateway: Gateway | None = None

    def start(self, timeout_s: float = 120.0) -> "GatewayThread":
        self._thread.start()
        self.call(self._start(), timeout_s)
        return self

    async def _start(self) -> None:
        self.gateway = Gateway(self._engine_factory(), self._config)
        await self.gateway.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float | None = 60.0) -> Any:
        """Runs a coroutine on the gateway's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def host(self) -> str:
        host = self._config.host
        return f"[{host}]" if ":" in host else host

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.gateway.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self._config.tls else "http"
        return f"{scheme}://{self.host}:{self.gateway.http_port}"

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        if self.gateway is not None and self._thread.is_alive():
            self.call(self.gateway.stop(drain_timeout_s), drain_timeout_s + 30.0)
            shutdown = getattr(self.gateway.engine, "shutdown", None)
            if callable(shutdown):
                shutdown()
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30.0)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "GatewayThread":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
