"""partita's Python SDK: sync and async gRPC clients of the gateway.

    from partita.client import Client, AsyncClient
    client = Client("127.0.0.1:50051", api_key=None, timeout_s=600.0, max_retries=2)
    result = client.generate("Hello", max_tokens=16, temperature=0.0)     # GenerateResult
    for chunk in client.stream("Hello", max_tokens=16): ...                # StreamChunk, last one final
    client.health(), client.models(), client.abort(request_id)

Retries (max_retries=2 by default) cover connection failures, UNAVAILABLE and RESOURCE_EXHAUSTED before
any output arrived, with jittered exponential backoff from 0.5 s to 8 s. Errors are typed
(partita.client.errors) and carry the gRPC status code and the request id.
"""
from partita.client._common import RetryPolicy
from partita.client.async_client import AsyncClient
from partita.client.errors import (DeadlineExceededError, InternalError, InvalidArgumentError, NotFoundError,
                                   PartitaError, RequestCancelledError, ResourceExhaustedError,
                                   UnauthenticatedError, UnavailableError)
from partita.client.sync_client import Client
from partita.client.types import GenerateResult, HealthStatus, ModelCard, StreamChunk, TokenLogprob, Usage

__all__ = ["Client", "AsyncClient", "RetryPolicy", "GenerateResult", "StreamChunk", "Usage", "TokenLogprob",
           "ModelCard", "HealthStatus", "PartitaError", "InvalidArgumentError", "NotFoundError",
           "UnauthenticatedError", "ResourceExhaustedError", "UnavailableError", "DeadlineExceededError",
           "RequestCancelledError", "InternalError"]
