"""Configuration of the gateway (gRPC + HTTP front door), validated when built.

Errors name the field path (`gateway.http_port`), the bad value and what is allowed. Nothing here reads
the environment: the CLI and the cluster spec build a `GatewayConfig` and pass it in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class GatewayConfigError(ValueError):
    """A gateway setting that cannot be used as given; `field` is its path (`gateway.grpc_port`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway listens, admits and bounds requests.

    host: address both servers bind (127.0.0.1 keeps them local; "0.0.0.0" exposes them).
    grpc_port: port of the gRPC server (0 picks a free one; None runs no gRPC server).
    http_port: port of the OpenAI-compatible HTTP server (0 picks a free one; None runs none).
    api_key: when set, every route but health needs it: `Authorization: Bearer <key>` over HTTP, the
        `authorization: Bearer <key>` metadata over gRPC.
    tls_cert_path, tls_key_path: PEM certificate chain and private key; both or neither. When set, both
        servers speak TLS only.
    max_queued_requests: requests admitted but not yet producing tokens, at most; one more is refused
        with RESOURCE_EXHAUSTED / HTTP 429. None means unbounded.
    max_message_bytes: largest gRPC message and HTTP request body accepted (and gRPC message sent).
    request_timeout_s: longest a request may run, end to end (None: no limit beyond the client's own
        gRPC deadline). Past it the request is aborted: DEADLINE_EXCEEDED / HTTP 408.
    queue_timeout_s: longest a request may wait for its first token (None: no limit); past it the
        request is aborted: DEADLINE_EXCEEDED / HTTP 408.
    retry_after_s: the `Retry-After` seconds sent with HTTP 429 and 503.
    drain_timeout_s: how long `Gateway.stop()` lets running requests finish before aborting them.
    served_model_name: the model name clients see (default: the engine's).
    enable_reflection: serve gRPC server reflection (grpcurl, grpcui).
    """

    host: str = "127.0.0.1"
    grpc_port: int | None = 50051
    http_port: int | None = 8000
    api_key: str | None = None
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    max_queued_requests: int | None = 1024
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    request_timeout_s: float | None = None
    queue_timeout_s: float | None = None
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    served_model_name: str | None = None
    enable_reflection: bool = True

    def __post_init__(self) -> None:
        _check_str("host", self.host)
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if port is not None:
                _check_int(name, port, 0, 65535)
        if self.grpc_port is None and self.http_port is None:
            raise GatewayConfigError("gateway.grpc_port", "grpc_port and http_port are both None: nothing to serve")
        if self.grpc_port and self.grpc_port == self.http_port:
            raise GatewayConfigError("gateway.http_port", f"{self.http_port} is also grpc_port; use two ports")
        if self.api_key is not None:
            _check_str("api_key", self.api_key)
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            missing = "tls_key_path" if self.tls_key_path is None else "tls_cert_path"
            raise GatewayConfigError(f"gateway.{missing}", "TLS needs both tls_cert_path and tls_key_path")
        for name in ("tls_cert_path", "tls_key_path"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise GatewayConfigError(f"gateway.{name}", f"{path!r} is not a readable file")
        if self.max_queued_requests is not None:
            _check_int("max_queued_requests", self.max_queued_requests, 0, None)
        _check_int("max_message_bytes", self.max_message_bytes, 1024, 2**31 - 1)
        for name in ("request_timeout_s", "queue_timeout_s"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        _check_int("retry_after_s", self.retry_after_s, 0, None)
        _check_positive("drain_timeout_s", self.drain_timeout_s, allow_zero=True)
        if self.served_model_name is not None:
            _check_str("served_model_name", self.served_model_name)
        if not isinstance(self.enable_reflection, bool):
            raise GatewayConfigError("gateway.enable_reflection", f"must be true or false, got {self.enable_reflection!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert_path is not None

    @classmethod
    def from_dict(cls, values: dict, path: str = "gateway") -> "GatewayConfig":
        """Builds from a mapping (a YAML section), refusing unknown keys by name."""
        if not isinstance(values, dict):
            raise GatewayConfigError(path, f"must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise GatewayConfigError(f"{path}.{key}", f"unknown setting; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except GatewayConfigError as e:
            if path != "gateway":
                raise GatewayConfigError(path + e.field[len("gateway"):], e.message) from None
            raise


def _check_int(name: str, value: object, low: int | None, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GatewayConfigError(f"gateway.{name}", f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise GatewayConfigError(f"gateway.{name}", f"must be {allowed}, got {value}")


def _check_positive(name: str, value: object, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise GatewayConfigError(f"gateway.{name}", f"must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise GatewayConfigError(f"gateway.{name}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise GatewayConfigError(f"gateway.{name}", f"must be a non-empty string, got {value!r}")
