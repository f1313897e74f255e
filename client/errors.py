"""Typed errors of the SDK; each carries the gRPC status code, the server's message and the request id.

    PartitaError                       any failure (code, message, request_id, field)
    ├── InvalidArgumentError           INVALID_ARGUMENT (field names the bad request field)
    ├── NotFoundError                  NOT_FOUND (an unknown model)
    ├── UnauthenticatedError           UNAUTHENTICATED (missing or wrong api_key)
    ├── ResourceExhaustedError         RESOURCE_EXHAUSTED (server overloaded, message too large) - retried
    ├── UnavailableError               UNAVAILABLE (unreachable, draining, engine down) - retried
    ├── DeadlineExceededError          DEADLINE_EXCEEDED (the call's timeout passed)
    ├── RequestCancelledError          CANCELLED
    └── InternalError                  INTERNAL, UNKNOWN and anything else
"""
from __future__ import annotations

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class PartitaError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None, field: str | None = None):
        super().__init__(f"{code.name}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.code = code
        self.message = message
        self.request_id = request_id
        self.field = field or None

    @property
    def is_retryable(self) -> bool:
        return self.code in RETRYABLE_CODES


class InvalidArgumentError(PartitaError, ValueError):
    pass


class NotFoundError(PartitaError):
    pass


class UnauthenticatedError(PartitaError):
    pass


class ResourceExhaustedError(PartitaError):
    pass


class UnavailableError(PartitaError):
    pass


class DeadlineExceededError(PartitaError, TimeoutError):
    pass


class RequestCancelledError(PartitaError):
    pass


class InternalError(PartitaError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
}
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def error_for(code: grpc.StatusCode | int, message: str, request_id: str | None = None,
              field: str | None = None) -> PartitaError:
    """The typed error for a status code (a grpc.StatusCode or its integer value)."""
    if isinstance(code, int):
        code = _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, InternalError)(code, message, request_id, field)


def error_from_rpc(error: grpc.RpcError, request_id: str | None = None) -> PartitaError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "", request_id)
