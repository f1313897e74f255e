"""The standard `grpc.health.v1.Health` service (what Kubernetes gRPC probes and grpc_health_probe ask).

"" (the whole server) and each partita service report SERVING while the gateway admits requests and its
engine runs, NOT_SERVING while draining or with a dead engine; other names are NOT_FOUND (Check) or
SERVICE_UNKNOWN (Watch). Watch sends the current status, then each change (polled every `poll_s`).
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable

import grpc

from partita.protos.grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self, is_serving: Callable[[], bool], services: Iterable[str], poll_s: float = 0.5):
        self._is_serving = is_serving
        self._services = frozenset(services) | {""}
        self._poll_s = poll_s

    def _status(self, service: str) -> int:
        if service not in self._services:
            return SERVICE_UNKNOWN
        return SERVING if self._is_serving() else NOT_SERVING

    async def Check(self, request, context):
        status = self._status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self._poll_s)
