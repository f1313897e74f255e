"""The OpenAI-compatible HTTP API on loopback: the official `openai` client (completions and chat,
streaming and not), a table of bad inputs with their statuses and error bodies, auth, body limits,
overload with Retry-After, disconnects freeing KV blocks, and the operational endpoints."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from partita.client import Client
from tests.client.gateway_server import LONG, engine_busy, engine_idle, running_gateway, wait_until

API_KEY = "http-key-456"


@pytest.fixture(scope="module")
def server():
    with running_gateway() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=30.0) as c:
        yield c


def http(method: str, url: str, body: object = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, hdrs, payload = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        status, hdrs, payload = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(payload)
    except ValueError:
        return status, hdrs, payload.decode()


# --- the openai client ---------------------------------------------------------------------------------
def test_completion(client):
    result = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=7, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert result.object == "text_completion" and result.model == "tiny-llama" and result.id.startswith("cmpl-")
    assert result.choices[0].finish_reason == "length" and isinstance(result.choices[0].text, str)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (5, 7, 12)


def test_completion_stream_matches_the_whole_completion(client):
    kwargs = dict(model="tiny-llama", prompt=[0, 72, 101], max_tokens=12, temperature=0.0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1


def test_chat_completion(client, server):
    result = client.chat.completions.create(model="tiny-llama", max_tokens=6, temperature=0.0,
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "Hi there"}],
                                            extra_body={"ignore_eos": True})
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 6
    template = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert result.usage.prompt_tokens == len(server.gateway.engine.tokenizer.encode(template, add_special_tokens=False))


def test_chat_stream_with_usage_and_text_parts(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=9, temperature=0.0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=9,
                                                 temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_default_max_tokens_fills_the_context(client, server):
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}],
                                            stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    assert engine_busy(server)
    stream.close()
    assert wait_until(lambda: engine_idle(server))


def test_extra_sampling_parameters_and_stop(client, server):
    seeded = [client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=5, seed=7,
                                        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2,
                                                    "ignore_eos": True}).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    with Client(server.grpc_target) as grpc_client:
        first = grpc_client.generate("Hi", max_tokens=1, temperature=0.0).token_ids[0]
    stopped = client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=3, temperature=0.0,
                                        extra_body={"ignore_eos": True, "stop_token_ids": [first]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


def test_logprobs(client):
    comp = client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=4, temperature=0.0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(x <= 0.0 for x in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=3,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 3 and c.logprob <= 0.0 for c in content)
    chunks = list(client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0.0, logprobs=True, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == 3


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"] and models[0].owned_by == "partita"


def test_openai_client_sees_400_for_a_bad_stream_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="Hi", temperature=-1.0, stream=True)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


def test_disconnecting_a_stream_frees_kv_blocks(client, server):
    stream = client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    iterator = iter(stream)
    next(iterator)
    next(iterator)
    assert engine_busy(server)
    stream.close()
    assert wait_until(lambda: engine_idle(server)), server.gateway.engine.loads()


def test_concurrent_streams(client, server):
    def one(i: int) -> int:
        chunks = client.completions.create(model="tiny-llama", prompt=f"p{i}", max_tokens=10, seed=i, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        return list(chunks)[-1].usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [10] * 8
    assert wait_until(lambda: engine_idle(server))


# --- bad inputs, raw ----------------------------------------------------------------------------------
BAD = [
    ("completions", None, b"{not json", 400, "body"),
    ("completions", ["a list"], None, 400, "body"),
    ("completions", {"max_tokens": 3}, None, 400, "prompt"),
    ("completions", {"prompt": 42}, None, 400, "prompt"),
    ("completions", {"prompt": ["one", "two"]}, None, 400, "prompt"),
    ("completions", {"prompt": [1, "x"]}, None, 400, "prompt"),
    ("completions", {"prompt": [5, 100000]}, None, 400, "prompt"),
    ("completions", {"prompt": "x" * 2100}, None, 400, "prompt"),
    ("completions", {"prompt": "Hi", "temperature": -1}, None, 400, "temperature"),
    ("completions", {"prompt": "Hi", "temperature": "hot"}, None, 400, "temperature"),
    ("completions", {"prompt": "Hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ("completions", {"prompt": "Hi", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("completions", {"prompt": "Hi", "top_p": 0}, None, 400, "top_p"),
    ("completions", {"prompt": "Hi", "top_k": -3}, None, 400, "top_k"),
    ("completions", {"prompt": "Hi", "n": 2}, None, 400, "n"),
    ("completions", {"prompt": "Hi", "presence_penalty": 1.0}, None, 400, "presence_penalty"),
    ("completions", {"prompt": "Hi", "stop": 5}, None, 400, "stop"),
    ("completions", {"prompt": "Hi", "stream": "yes"}, None, 400, "stream"),
    ("completions", {"prompt": "Hi", "logprobs": 50}, None, 400, "logprobs"),
    ("completions", {"prompt": "Hi", "model": "gpt-17"}, None, 404, "model"),
    ("chat/completions", {"max_tokens": 3}, None, 400, "messages"),
    ("chat/completions", {"messages": []}, None, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 7}]}, None, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"content": "Hi"}]}, None, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     None, 400, "messages[0].content[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}, None, 400,
     "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]},
     None, 400, "tools"),
    ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000}, None, 400,
     "max_tokens"),
]


@pytest.mark.parametrize("route, body, raw, status, param", BAD,
                         ids=[f"{b[0]}:{b[4]}:{i}" for i, b in enumerate(BAD)])
def test_bad_inputs(server, route, body, raw, status, param):
    code, headers, payload = http("POST", f"{server.http_url}/v1/{route}", body, raw=raw)
    assert code == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == status and error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_unknown_route_and_wrong_method(server):
    status, _, payload = http("GET", f"{server.http_url}/v1/nothing")
    assert status == 404 and payload["error"]["code"] == 404
    status, _, payload = http("GET", f"{server.http_url}/v1/completions")
    assert status == 405 and "POST" in payload["error"]["message"]


# --- operational endpoints -----------------------------------------------------------------------------
def test_health_version_metrics(server, client):
    assert http("GET", f"{server.http_url}/health")[:3:2] == (200, {"status": "ok"})
    status, _, payload = http("GET", f"{server.http_url}/version")
    assert status == 200 and payload["version"]
    client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
    status, headers, text = http("GET", f"{server.http_url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("partita:time_to_first_token_seconds_bucket", "partita:inter_token_latency_seconds_bucket",
                 "partita:e2e_request_latency_seconds_count", "partita:num_requests_running{",
                 "partita:num_requests_waiting{", "partita:kv_cache_usage_perc{", "partita:prompt_tokens_total{",
                 "partita:generation_tokens_total{", 'partita:request_success_total{finished_reason="length"'):
        assert name in text, name


# --- a strict server: auth, small bodies, a queue of one, one running sequence -------------------------
@pytest.fixture(scope="module")
def strict():
    with running_gateway(engine={"max_num_seqs": 1}, api_key=API_KEY, max_queued_requests=1,
                         max_message_bytes=4096, retry_after_s=2) as s:
        yield s


def test_auth(strict):
    url = f"{strict.http_url}/v1/completions"
    body = {"prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
        status, _, payload = http("POST", url, body, headers)
        assert status == 401 and payload["error"]["type"] == "authentication_error"
    for path in ("/v1/models", "/metrics", "/version"):
        assert http("GET", strict.http_url + path)[0] == 401
    assert http("GET", strict.http_url + "/health")[0] == 200
    with openai.OpenAI(base_url=strict.http_url + "/v1", api_key=API_KEY, max_retries=0) as c:
        assert c.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with openai.OpenAI(base_url=strict.http_url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_oversized_body_is_413(strict):
    status, _, payload = http("POST", f"{strict.http_url}/v1/completions", {"prompt": "x" * 8000},
                              {"Authorization": f"Bearer {API_KEY}"})
    assert status == 413 and payload["error"]["param"] == "body"


def test_overload_is_429_with_retry_after(strict):
    with openai.OpenAI(base_url=strict.http_url + "/v1", api_key=API_KEY, max_retries=0, timeout=30) as c:
        running = c.completions.create(model="tiny-llama", prompt="Hi", max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
        next(iter(running))
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: list(c.completions.create(model="tiny-llama", prompt="Hi", max_tokens=3)))
            assert wait_until(lambda: strict.gateway.tracker.num_queued == 1)
            status, headers, payload = http("POST", f"{strict.http_url}/v1/completions",
                                            {"prompt": "Hi", "max_tokens": 2}, {"Authorization": f"Bearer {API_KEY}"})
            assert status == 429 and headers["Retry-After"] == "2"
            assert payload["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model="tiny-llama", prompt="Hi", max_tokens=2)
            running.close()
            assert waiting.result(timeout=30)
    assert wait_until(lambda: engine_idle(strict))
