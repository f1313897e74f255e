"""Optional API-key auth for the gateway: `Authorization: Bearer <key>` over HTTP, the `authorization`
metadata (same value) over gRPC. Only health is exempt (gRPC `grpc.health.v1.Health`, HTTP `/health`).
Keys are compared in constant time.
"""
from __future__ import annotations

import hmac
from typing import Awaitable, Callable

import grpc
from aiohttp import web

GRPC_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
HTTP_EXEMPT_PATHS = frozenset({"/health"})
MISSING_TOKEN = "missing or invalid API key: send 'authorization: Bearer <key>'"


def bearer_token(value: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value, or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def token_matches(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


class GrpcTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the key with UNAUTHENTICATED (before the handler runs)."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(GRPC_EXEMPT_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(bearer_token(metadata.get("authorization")), self._api_key):
            return handler
        return _refusing_handler(handler)


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)

    async def refuse_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_TOKEN)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codecs)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, **codecs)


def http_auth_middleware(api_key: str, refuse: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """aiohttp middleware letting through requests with the key (and the exempt paths); `refuse` answers
    the others (with the gateway's JSON error)."""

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path in HTTP_EXEMPT_PATHS:
            return await handler(request)
        if token_matches(bearer_token(request.headers.get("Authorization")), api_key):
            return await handler(request)
        return await refuse(request)

    return auth



def bearer_token_interceptors(token: str) -> list:
    """Client side: interceptors that add `authorization: Bearer <token>` to every unary and bidirectional call
    of a channel (prefill workers calling a decode worker's KvTransfer port). grpc.aio files an interceptor
    under its first matching kind only, hence one object per kind."""
    metadata = ("authorization", f"Bearer {token}")

    def with_token(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                          grpc.aio.Metadata(*(details.metadata or ()), metadata),
                                          details.credentials, details.wait_for_ready)

    class Unary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(with_token(client_call_details), request)

    class Bidi(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
            return await continuation(with_token(client_call_details), request_iterator)

    return [Unary(), Bidi()]
