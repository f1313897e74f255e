"""The gateway's HTTP side (aiohttp): the OpenAI-compatible API and the operational endpoints.

    POST /v1/completions, /v1/chat/completions     cluster/openai_serving.py (SSE when "stream": true)
    GET  /v1/models                                 the served model
    GET  /health                                    200 while serving, 503 while draining or engine dead
    GET  /metrics                                   Prometheus text format (cluster/metrics.py)
    GET  /version                                   {"version": ...}

Every error is OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with `Retry-After`
on 429 and 503. Bodies larger than `max_message_bytes` answer 413. A client that disconnects cancels
its handler (aiohttp's handler_cancellation), which aborts its request in the engine.
"""
from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from aiohttp import web

from partita.cluster.auth import MISSING_TOKEN, http_auth_middleware
from partita.cluster.gateway_errors import (GatewayError, NotFoundError, PayloadTooLargeError,
                                            UnauthenticatedError, as_gateway_error)
from partita.cluster.metrics import CONTENT_TYPE
from partita.cluster.openai_serving import OpenAIServing

if TYPE_CHECKING:
    from partita.cluster.gateway import Gateway

log = logging.getLogger(__name__)


def error_response(error: GatewayError) -> web.Response:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    return web.json_response(error.to_json(), status=error.http_status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as e:
        return error_response(PayloadTooLargeError(f"request body too large: {e.text}", field="body"))
    except web.HTTPNotFound:
        return error_response(NotFoundError(f"no route {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed as e:
        error = GatewayError(f"{request.method} is not allowed on {request.path}; use {', '.join(e.allowed_methods)}")
        error.http_status, error.error_type = 405, "invalid_request_error"
        return error_response(error)
    except web.HTTPException:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure answers in the OpenAI error shape
        return error_response(as_gateway_error(exc))


async def _refuse_unauthenticated(request: web.Request) -> web.Response:
    return error_response(UnauthenticatedError(MISSING_TOKEN))


class HttpApi:
    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway
        self._openai = OpenAIServing(gateway)

    def build_app(self) -> web.Application:
        config = self._gateway.config
        middlewares = [error_middleware]
        if config.api_key:
            middlewares.append(http_auth_middleware(config.api_key, _refuse_unauthenticated))
        app = web.Application(client_max_size=config.max_message_bytes, middlewares=middlewares)
        app.add_routes([
            web.post("/v1/completions", self._openai.completions),
            web.post("/v1/chat/completions", self._openai.chat_completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
            web.get("/metrics", self.metrics),
            web.get("/version", self.version),
        ])
        return app

    async def models(self, request: web.Request) -> web.Response:
        info = self._gateway.engine.model_info
        card = {"id": self._gateway.model_name, "object": "model", "created": info.created_unix_s,
                "owned_by": "partita", "root": info.model_name, "max_model_len": info.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        gateway = self._gateway
        if gateway.is_serving:
            return web.json_response({"status": "ok"})
        reason = "draining" if gateway.tracker.is_draining else "engine unavailable"
        return web.json_response({"status": reason}, status=503,
                                 headers={"Retry-After": str(gateway.config.retry_after_s)})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self._gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self._gateway.version})


async def start_http_server(gateway: "Gateway") -> tuple[web.AppRunner, int]:
    """Starts serving the HTTP API; returns (runner, bound port). `runner.cleanup()` stops it."""
    config = gateway.config
    runner = web.AppRunner(HttpApi(gateway).build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    ssl_context = None
    if config.tls:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert_path, config.tls_key_path)
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=ssl_context, reuse_port=False)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port
