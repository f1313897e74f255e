"""Errors the gateway answers with, each knowing its gRPC status, HTTP status and OpenAI error shape.

    invalid input           INVALID_ARGUMENT     400  (names the field)
    missing/wrong token     UNAUTHENTICATED      401
    unknown model/route     NOT_FOUND            404
    request/queue timeout   DEADLINE_EXCEEDED    408
    body too large          RESOURCE_EXHAUSTED   413
    overload (queue full)   RESOURCE_EXHAUSTED   429  (Retry-After)
    draining / dead engine  UNAVAILABLE          503  (Retry-After)
    anything else           INTERNAL             500
"""
from __future__ import annotations

import logging

import grpc

from partita.cluster.gateway_engine import EngineUnavailableError
from partita.workers.errors import InvalidRequestError

log = logging.getLogger(__name__)


class GatewayError(Exception):
    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, field: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict:
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.field,
                          "code": self.http_status}}


class InvalidArgumentError(GatewayError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field=field)


class UnauthenticatedError(GatewayError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "authentication_error"


class NotFoundError(GatewayError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "not_found_error"


class RequestTimeoutError(GatewayError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408
    error_type = "timeout_error"


class PayloadTooLargeError(GatewayError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413
    error_type = "invalid_request_error"


class OverloadedError(GatewayError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "rate_limit_error"


class UnavailableError(GatewayError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "service_unavailable_error"


def as_gateway_error(exc: BaseException) -> GatewayError:
    """The gateway error that answers `exc` (engine errors mapped; unknown ones logged as INTERNAL)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return InvalidArgumentError(exc.field, exc.message)
    if isinstance(exc, EngineUnavailableError):
        return UnavailableError(str(exc), retry_after_s=1)
    log.error("internal error while serving a request", exc_info=exc)
    return GatewayError(f"internal error ({type(exc).__name__}); see the server log")
