"""`Client`: the blocking gRPC client of partita.

    from partita.client import Client
    with Client("127.0.0.1:50051") as client:
        result = client.generate("Hello", max_tokens=16, temperature=0.0)
        for chunk in client.stream("Hello", max_tokens=16):
            print(chunk.text, end="")

Sampling parameters are keyword arguments with vLLM's names (max_tokens, temperature, top_p, top_k,
min_p, seed, stop, stop_token_ids, ignore_eos, logprobs, repetition_penalty, skip_special_tokens);
unset ones take the server's defaults. Failures raise the typed errors of partita.client.errors.
"""
from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import grpc

from partita.client import _common
from partita.client.errors import PartitaError, error_from_rpc
from partita.client.types import GenerateResult, HealthStatus, ModelCard, StreamChunk
from partita.protos.grpc_health.v1 import health_pb2, health_pb2_grpc
from partita.protos.partita.v1 import admin_pb2_grpc, inference_pb2 as pb, inference_pb2_grpc


class Client:
    """A connection to one partita gateway.

    target: "host:port". api_key: sent as `authorization: Bearer <key>`. tls / root_certificates (PEM
    bytes or a path): use TLS, trusting those roots (default: the system's). tls_server_name: the name
    the certificate must carry when it differs from the target's host. timeout_s: default per-call
    timeout (each method takes `timeout=` to override). max_retries / retry_policy: see RetryPolicy.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, tls_server_name: str | None = None,
                 timeout_s: float | None = _common.DEFAULT_TIMEOUT_S, max_retries: int = 2,
                 retry_policy: _common.RetryPolicy | None = None,
                 max_message_bytes: int = _common.DEFAULT_MAX_MESSAGE_BYTES, model: str = "",
                 channel_options: Sequence[tuple[str, Any]] = ()):
        options = _common.channel_options(max_message_bytes, tls_server_name, channel_options)
        credentials = _common.channel_credentials(tls, root_certificates)
        self._channel = (grpc.secure_channel(target, credentials, options) if credentials
                         else grpc.insecure_channel(target, options))
        self._inference = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.admin = admin_pb2_grpc.AdminStub(self._channel)  # raw stub: cluster operations
        self._metadata = _common.call_metadata(api_key)
        self._timeout_s = timeout_s
        self._retry = retry_policy or _common.RetryPolicy(max_retries=max_retries)
        self._model = model

    # --- generation -----------------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], *, request_id: str | None = None, priority: int | None = None,
                 timeout: float | None = None, skip_text: bool = False, **sampling: Any) -> GenerateResult:
        """Generates to the end and returns the whole result."""
        request = _common.build_request(prompt, request_id, priority, self._model, skip_text, sampling)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            builder = _common.ResultBuilder(request.request_id)
            call = self._inference.Generate(request, timeout=_remaining(deadline), metadata=self._metadata)
            try:
                for response in call:
                    builder.add(response)
                return builder.result()
            except (grpc.RpcError, PartitaError) as exc:
                error = exc if isinstance(exc, PartitaError) else error_from_rpc(exc, request.request_id)
                if not self._retry.should_retry(error, attempt, builder.has_output):
                    raise error from None
            finally:
                call.cancel()
            attempt = self._backoff(attempt, deadline)

    def stream(self, prompt: str | Sequence[int], *, request_id: str | None = None, priority: int | None = None,
               timeout: float | None = None, skip_text: bool = False, **sampling: Any) -> Iterator[StreamChunk]:
        """Yields chunks as tokens arrive; the last has finish_reason and usage. Leaving the loop early
        cancels the call, which aborts the request on the server."""
        request = _common.build_request(prompt, request_id, priority, self._model, skip_text, sampling)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            received = False
            call = self._inference.Generate(request, timeout=_remaining(deadline), metadata=self._metadata)
            try:
                for response in call:
                    chunk = _common.chunk_from_response(response, request.request_id)
                    received = True
                    yield chunk
                return
            except (grpc.RpcError, PartitaError) as exc:
                error = exc if isinstance(exc, PartitaError) else error_from_rpc(exc, request.request_id)
                if not self._retry.should_retry(error, attempt, received):
                    raise error from None
            finally:
                call.cancel()
            attempt = self._backoff(attempt, deadline)

    def abort(self, request_ids: str | Sequence[str], *, timeout: float | None = None) -> list[str]:
        """Aborts running requests; returns the ids that were running."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        response = self._unary(self._inference.Abort, pb.AbortRequest(request_ids=ids), timeout)
        return list(response.aborted_request_ids)

    # --- information ----------------------------------------------------------------------------------
    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return HealthStatus(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def models(self, *, timeout: float | None = None) -> list[ModelCard]:
        return _common.model_cards(self._unary(self._inference.ListModels, pb.ListModelsRequest(), timeout))

    def model_info(self, model: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        return self._unary(self._inference.GetModelInfo, pb.GetModelInfoRequest(model=model), timeout)

    def server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        return self._unary(self._inference.GetServerInfo, pb.GetServerInfoRequest(), timeout)

    def loads(self, *, timeout: float | None = None) -> pb.GetLoadsResponse:
        return self._unary(self._inference.GetLoads, pb.GetLoadsRequest(), timeout)

    # --- plumbing -------------------------------------------------------------------------------------
    def _unary(self, method, request, timeout: float | None):
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not self._retry.should_retry(error, attempt, False):
                    raise error from None
            attempt = self._backoff(attempt, deadline)

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self._timeout_s if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _backoff(self, attempt: int, deadline: float | None) -> int:
        delay = self._retry.backoff_s(attempt)
        if deadline is not None:
            delay = min(delay, max(0.0, deadline - time.monotonic()))
        time.sleep(delay)
        return attempt + 1

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
