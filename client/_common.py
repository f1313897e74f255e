"""What the sync and async clients share: channel settings, retry policy, request building and turning
Generate responses into typed chunks and results."""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from partita.client.errors import PartitaError, error_for
from partita.client.types import GenerateResult, ModelCard, StreamChunk, TokenLogprob, Usage
from partita.protos.partita.v1 import inference_pb2 as pb

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
                   "ignore_eos", "logprobs", "repetition_penalty", "skip_special_tokens")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that failed to connect or got UNAVAILABLE / RESOURCE_EXHAUSTED before any output,
    waiting a jittered exponential backoff: attempt k waits uniform(0.5, 1) x min(max, initial x 2^k)."""

    max_retries: int = 2
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"need 0 < initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s}, "
                             f"{self.max_backoff_s}")

    def backoff_s(self, attempt: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.max_backoff_s, self.initial_backoff_s * 2 ** attempt)

    def should_retry(self, error: PartitaError, attempt: int, received_output: bool) -> bool:
        return error.is_retryable and not received_output and attempt < self.max_retries


def channel_options(max_message_bytes: int, tls_server_name: str | None,
                    extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return options + list(extra)


def channel_credentials(tls: bool, root_certificates: bytes | str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials (root_certificates: PEM bytes or a path; None trusts the system roots) or None."""
    if not tls and root_certificates is None:
        return None
    if isinstance(root_certificates, str):
        with open(root_certificates, "rb") as f:
            root_certificates = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def build_request(prompt: str | Sequence[int], request_id: str | None, priority: int | None, model: str,
                  skip_text: bool, sampling: dict[str, Any]) -> pb.GenerateRequest:
    unknown = set(sampling) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}; known: {', '.join(SAMPLING_FIELDS)}")
    request = pb.GenerateRequest(request_id=request_id or f"req-{uuid.uuid4().hex}", model=model,
                                 skip_text=skip_text)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    if priority is not None:
        request.priority = priority
    params = request.sampling
    for name, value in sampling.items():
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(params, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(params, name, value)
    return request


def _logprobs(items) -> list[TokenLogprob] | None:
    if not items:
        return None
    return [TokenLogprob(x.token_id, x.logprob, dict(x.top)) for x in items]


def chunk_from_response(response: pb.GenerateResponse, request_id: str) -> StreamChunk:
    """A typed chunk; an error message raises its typed PartitaError."""
    kind = response.WhichOneof("response")
    if kind == "chunk":
        c = response.chunk
        return StreamChunk(request_id, list(c.token_ids), c.text, _logprobs(c.logprobs))
    if kind == "complete":
        u = response.complete.usage
        return StreamChunk(request_id, [], "", None, FINISH_REASONS.get(response.complete.finish_reason, "unknown"),
                           Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens))
    if kind == "error":
        e = response.error
        raise error_for(e.code, e.message, request_id, e.field)
    raise error_for(grpc.StatusCode.INTERNAL, f"unexpected Generate response {response!r}", request_id)


class ResultBuilder:
    """Accumulates a Generate stream into a GenerateResult."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._complete: pb.GenerateComplete | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        kind = response.WhichOneof("response")
        if kind == "chunk":
            self._token_ids.extend(response.chunk.token_ids)
            self._text.append(response.chunk.text)
            self._logprobs.extend(_logprobs(response.chunk.logprobs) or ())
        elif kind == "complete":
            self._complete = response.complete
        else:
            chunk_from_response(response, self.request_id)  # raises the typed error

    @property
    def has_output(self) -> bool:
        return bool(self._token_ids) or self._complete is not None

    def result(self) -> GenerateResult:
        c = self._complete
        if c is None:
            raise error_for(grpc.StatusCode.INTERNAL, "the stream ended without a completion", self.request_id)
        u = c.usage
        return GenerateResult(self.request_id, "".join(self._text), self._token_ids,
                              FINISH_REASONS.get(c.finish_reason, "unknown"),
                              Usage(u.prompt_tokens, u.completion_tokens, u.total_tokens),
                              self._logprobs or None, c.time_to_first_token_s, c.e2e_latency_s)


def model_cards(response: pb.ListModelsResponse) -> list[ModelCard]:
    return [ModelCard(m.id, m.owned_by, m.created_unix_s, m.max_model_len) for m in response.models]
