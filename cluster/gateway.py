"""The gateway: partita's front door, a gRPC server and an HTTP server in one process and one event loop,
both in front of one `EngineClient` (the in-process `AsyncEngine` now, the control plane's router later).

    engine = AsyncEngine.from_model("tiny-llama", device="cpu")
    gateway = Gateway(engine, GatewayConfig(grpc_port=50051, http_port=8000))
    await gateway.start()
    ...
    await gateway.stop()          # drains (up to drain_timeout_s), then closes both servers

What happens to a request, whichever door it came through: cluster/gateway_requests.py (admission,
timeouts, abort on exit, metrics); the wire details: cluster/grpc_server.py and cluster/http_api.py.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from importlib import metadata

from partita.cluster.gateway_config import GatewayConfig
from partita.cluster.gateway_engine import EngineClient
from partita.cluster.gateway_errors import NotFoundError
from partita.cluster.gateway_requests import RequestTracker
from partita.cluster.metrics import ServingMetrics

log = logging.getLogger(__name__)


def partita_version() -> str:
    try:
        return metadata.version("partita")
    except metadata.PackageNotFoundError:
        return "unknown"


class Gateway:
    def __init__(self, engine: EngineClient, config: GatewayConfig | None = None):
        self.engine = engine
        self.config = config or GatewayConfig()
        self.model_name = self.config.served_model_name or engine.model_info.model_name
        self.version = partita_version()
        self.server_id = uuid.uuid4().hex[:12]
        self.started_unix_s = time.time()
        # an engine client that migrates KV (the router over prefill/decode pools) reports its totals
        self.metrics = ServingMetrics(self.model_name, engine.loads, lambda: self.tracker.counts(),
                                      migrations=getattr(engine, "migration_totals", None))
        self.tracker = RequestTracker(engine, self.config, self.metrics)
        self._is_started = False
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._grpc_server = None
        self._http_runner = None

    @property
    def is_serving(self) -> bool:
        return self._is_started and not self.tracker.is_draining and self.engine.is_healthy()

    def check_model(self, model: object) -> None:
        """Requests may name the served model or leave it empty."""
        if model not in (None, "", self.model_name, self.engine.model_info.model_name):
            raise NotFoundError(f"model {model!r} is not served here; this server serves {self.model_name!r}",
                                field="model")

    async def start(self) -> None:
        """Binds the configured servers (ports 0 become real ports in grpc_port / http_port)."""
        from partita.cluster.grpc_server import build_grpc_server
        from partita.cluster.http_api import start_http_server

        start = getattr(self.engine, "start", None)
        if callable(start):
            start()
        try:
            if self.config.grpc_port is not None:
                self._grpc_server, self.grpc_port = build_grpc_server(self)
                await self._grpc_server.start()
            if self.config.http_port is not None:
                self._http_runner, self.http_port = await start_http_server(self)
        except BaseException:
            await self._close_servers(0.0)
            raise
        self.started_unix_s = time.time()
        self._is_started = True
        log.info("gateway serving %s: grpc %s:%s, http %s:%s", self.model_name, self.config.host, self.grpc_port,
                 self.config.host, self.http_port)

    async def drain(self, timeout_s: float | None = None) -> tuple[int, int]:
        """Stops admitting (health turns NOT_SERVING / 503), lets running requests finish for up to
        timeout_s (default drain_timeout_s), then aborts the rest. Returns (finished, aborted)."""
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        return await self.tracker.drain(timeout_s)

    async def stop(self, drain_timeout_s: float | None = None) -> None:
        if self._is_started:
            await self.drain(drain_timeout_s)
        await self._close_servers(1.0)
        self._is_started = False

    async def _close_servers(self, grace_s: float) -> None:
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace_s)
            self._grpc_server = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None

    async def serve_forever(self) -> None:
        """Runs until SIGINT or SIGTERM, then drains and stops (what `partita serve` calls)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
