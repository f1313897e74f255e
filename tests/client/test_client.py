"""The SDK, sync and async, against a real gateway and engine on loopback."""
from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc
import pytest

from partita.client import (AsyncClient, Client, GenerateResult, HealthStatus, InvalidArgumentError, NotFoundError,
                            RetryPolicy, StreamChunk, UnavailableError)
from partita.client.errors import DeadlineExceededError, PartitaError, error_for
from tests.client.gateway_server import LONG, engine_busy, engine_idle, running_gateway, wait_until


@pytest.fixture(scope="module")
def server():
    with running_gateway() as s:
        yield s


@pytest.fixture()
def client(server):
    with Client(server.grpc_target, timeout_s=30.0) as c:
        yield c


def test_generate_returns_a_typed_result(client):
    result = client.generate("Hello", max_tokens=8, temperature=0.0, ignore_eos=True, request_id="sdk-gen-1")
    assert isinstance(result, GenerateResult)
    assert result.request_id == "sdk-gen-1"
    assert len(result.token_ids) == 8 and result.finish_reason == "length"
    assert result.usage.completion_tokens == 8 and result.usage.prompt_tokens == len("Hello".encode())
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8
    assert 0 < result.time_to_first_token_s <= result.e2e_latency_s


def test_greedy_generation_is_deterministic_and_matches_token_prompt(client):
    a = client.generate("abc", max_tokens=6, temperature=0.0, ignore_eos=True)
    b = client.generate("abc", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_stream_yields_chunks_then_a_final_one(client):
    chunks = list(client.stream("Hi", max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2))
    assert all(isinstance(c, StreamChunk) for c in chunks)
    assert chunks[-1].is_final and chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == 5
    logprobs = [lp for c in chunks for lp in (c.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == tokens
    assert all(lp.logprob <= 0.0 and len(lp.top) <= 2 for lp in logprobs)


def test_stop_token_ends_with_stop(client):
    first = client.generate("Hi", max_tokens=4, temperature=0.0, ignore_eos=True).token_ids[0]
    result = client.generate("Hi", max_tokens=4, temperature=0.0, ignore_eos=True, stop_token_ids=[first])
    assert result.finish_reason == "stop" and result.token_ids == [first]


def test_health_and_models(client, server):
    assert client.health() is HealthStatus.SERVING
    assert client.health("partita.v1.Inference") is HealthStatus.SERVING
    with pytest.raises(NotFoundError):
        client.health("no.such.Service")
    models = client.models()
    assert [m.id for m in models] == ["tiny-llama"] and models[0].max_model_len == 2048
    info = client.model_info()
    assert info.model_name == "tiny-llama" and info.has_chat_template and list(info.eos_token_ids) == [1]
    assert client.server_info().server_id == server.gateway.server_id
    assert client.loads().loads[0].num_total_blocks == 512


def test_invalid_input_raises_a_typed_error_naming_the_field(client, server):
    with pytest.raises(InvalidArgumentError) as info:
        client.generate("Hi", temperature=-1.0, request_id="sdk-bad-1")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "temperature" and info.value.request_id == "sdk-bad-1"
    with pytest.raises(InvalidArgumentError) as info:
        list(client.stream("", max_tokens=2))
    assert info.value.field == "prompt"
    with pytest.raises(NotFoundError) as info:
        Client(server.grpc_target, model="other-model").generate("Hi", max_tokens=1)
    assert info.value.field == "model"
    with pytest.raises(TypeError):
        client.generate("Hi", max_tokns=3)


def test_leaving_a_stream_early_aborts_the_request(client, server):
    stream = client.stream("Hi", max_tokens=LONG, ignore_eos=True)
    next(stream)
    assert engine_busy(server)
    stream.close()
    assert wait_until(lambda: engine_idle(server)), server.gateway.engine.loads()


def test_abort_by_request_id(client, server):
    stream = client.stream("Hi", max_tokens=LONG, ignore_eos=True, request_id="sdk-abort-1")
    next(stream)
    assert client.abort("sdk-abort-1") == ["sdk-abort-1"]
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert client.abort(["sdk-abort-1", "never-ran"]) == []
    assert wait_until(lambda: engine_idle(server))


def test_timeout_raises_deadline_exceeded_and_frees_the_request(client, server):
    with pytest.raises(DeadlineExceededError) as info:
        client.generate("Hi", max_tokens=LONG, ignore_eos=True, timeout=0.3)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine_idle(server))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_with_backoff_then_unavailable():
    policy = RetryPolicy(max_retries=2, initial_backoff_s=0.05, max_backoff_s=0.1)
    started = time.monotonic()
    with Client(f"127.0.0.1:{_free_port()}", retry_policy=policy, timeout_s=10.0) as c:
        with pytest.raises(UnavailableError) as info:
            c.generate("Hi", max_tokens=1)
    assert info.value.is_retryable
    assert time.monotonic() - started >= 0.05 * 0.5 + 0.1 * 0.5  # two backoffs were waited


def test_retry_policy_backoff_grows_and_caps():
    policy = RetryPolicy()
    assert policy.max_retries == 2
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        assert cap / 2 <= policy.backoff_s(attempt) <= cap
    error = error_for(grpc.StatusCode.UNAVAILABLE, "down")
    assert policy.should_retry(error, 0, False) and not policy.should_retry(error, 2, False)
    assert not policy.should_retry(error, 0, True)  # never replay a stream that produced output
    assert not policy.should_retry(error_for(3, "bad"), 0, False)
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_error_types_follow_status_codes():
    assert isinstance(error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), TimeoutError)
    assert isinstance(error_for(3, "x", "r1", "prompt"), ValueError)
    err = error_for(14, "gone", "r9")
    assert isinstance(err, UnavailableError) and err.request_id == "r9" and "r9" in str(err)
    assert type(error_for(13, "boom")) is not PartitaError and isinstance(error_for(13, "boom"), PartitaError)


# --- AsyncClient --------------------------------------------------------------------------------------
def test_async_client_generate_stream_health_models(server):
    async def main():
        async with AsyncClient(server.grpc_target, timeout_s=30.0) as c:
            assert await c.health() is HealthStatus.SERVING
            assert [m.id for m in await c.models()] == ["tiny-llama"]
            result = await c.generate("Hello", max_tokens=6, temperature=0.0, ignore_eos=True)
            chunks = [chunk async for chunk in c.stream("Hello", max_tokens=6, temperature=0.0, ignore_eos=True)]
            assert [t for ch in chunks for t in ch.token_ids] == result.token_ids
            assert chunks[-1].finish_reason == "length" and chunks[-1].usage == result.usage
            with pytest.raises(InvalidArgumentError) as info:
                await c.generate("Hi", top_p=2.0)
            assert info.value.field == "top_p"

    asyncio.run(main())


def test_async_concurrent_streams_each_get_their_own_tokens(server):
    num_streams, max_tokens = 12, 10

    async def one(c: AsyncClient, i: int) -> tuple[str, list[int], str]:
        tokens, reason = [], None
        async for chunk in c.stream(f"prompt {i}", max_tokens=max_tokens, ignore_eos=True, seed=i,
                                    request_id=f"conc-{i}"):
            assert chunk.request_id == f"conc-{i}"
            tokens += chunk.token_ids
            reason = chunk.finish_reason or reason
        return f"conc-{i}", tokens, reason

    async def main():
        async with AsyncClient(server.grpc_target, timeout_s=60.0) as c:
            return await asyncio.gather(*(one(c, i) for i in range(num_streams)))

    results = asyncio.run(main())
    assert len({rid for rid, _, _ in results}) == num_streams
    assert all(len(tokens) == max_tokens and reason == "length" for _, tokens, reason in results)
    assert wait_until(lambda: engine_idle(server))


def test_async_cancelling_a_stream_frees_its_kv_blocks(server):
    async def main():
        async with AsyncClient(server.grpc_target) as c:
            async with contextlib.aclosing(c.stream("Hi", max_tokens=LONG, ignore_eos=True)) as stream:
                async for _ in stream:
                    break
            assert engine_busy(server) or engine_idle(server)

    asyncio.run(main())
    assert wait_until(lambda: engine_idle(server))


def test_async_unreachable_server_raises_unavailable():
    async def main():
        policy = RetryPolicy(max_retries=1, initial_backoff_s=0.01, max_backoff_s=0.01)
        async with AsyncClient(f"127.0.0.1:{_free_port()}", retry_policy=policy, timeout_s=10.0) as c:
            with pytest.raises(UnavailableError):
                await c.health()

    asyncio.run(main())
