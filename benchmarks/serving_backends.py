"""The two ways the serving benchmark reaches partita: the OpenAI-compatible HTTP API and the gRPC SDK.

    http(s)://HOST:PORT   POST /v1/completions with "stream": true (SSE), the prompt as token ids,
                          "ignore_eos", "stream_options": {"include_usage": true}; aiohttp, one session
    grpc(s)://HOST:PORT   partita.client.AsyncClient.stream with the prompt as token ids (no retries:
                          a retried request would hide its first failure inside its latency)

Both fill a `RequestRecord`: send time, the arrival time of each chunk that carries tokens, the end, the
output token count from the server's usage, or the error. A request never outlives `timeout_s`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

if __package__:
    from .serving_metrics import RequestRecord
    from .serving_traffic import RequestSpec
else:  # run as a script from benchmarks/
    from serving_metrics import RequestRecord
    from serving_traffic import RequestSpec

BACKENDS = ("http", "grpc")
# Prometheus counters read before and after a run: the server's own count of what the run did
SERVER_COUNTERS = {"prompt_tokens": "partita:prompt_tokens_total",
                   "generation_tokens": "partita:generation_tokens_total",
                   "request_success": "partita:request_success_total",
                   "num_preemptions": "partita:num_preemptions_total",
                   # PD deployments: requests whose KV moved, its wire bytes, the seconds of the transfer (Reserve,
                   # or the first chunk when reserved during the prefill, to Commit), of its stream (to the last
                   # chunk's ack) and from the prefill's first token to Commit, summed
                   "kv_migrations": "partita:kv_migrations_total",
                   "kv_migrated_bytes": "partita:kv_migrated_bytes_total",
                   "kv_transfer_seconds": "partita:kv_transfer_seconds_total",
                   "kv_stream_seconds": "partita:kv_stream_seconds_total",
                   "kv_handoff_seconds": "partita:kv_handoff_seconds_total"}


@dataclass(frozen=True)
class ServerInfo:
    """What the endpoint says it serves: model (the name requests use), root (the engine's model name,
    a preset or a checkpoint path), max_model_len."""

    model: str
    root: str
    max_model_len: int | None


def parse_url(url: str, backend: str | None = None) -> tuple[str, str]:
    """(backend, address): the HTTP base URL without a trailing /v1, or the gRPC target host:port."""
    parts = urlsplit(url if "://" in url else f"{backend or 'http'}://{url}")
    scheme = parts.scheme.lower()
    inferred = "grpc" if scheme in ("grpc", "grpcs") else "http" if scheme in ("http", "https") else None
    if inferred is None:
        raise ValueError(f"--url {url!r}: the scheme must be http, https, grpc or grpcs")
    backend = backend or inferred
    if backend != inferred:
        raise ValueError(f"--url {url!r} is a {inferred} address but --backend is {backend}")
    if backend == "grpc":
        return backend, parts.netloc
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return backend, f"{scheme}://{parts.netloc}{path}"


def parse_counters(text: str) -> dict[str, float]:
    """Sums of the SERVER_COUNTERS over their label sets, from the Prometheus text format."""
    wanted = {metric: key for key, metric in SERVER_COUNTERS.items()}
    totals = dict.fromkeys(SERVER_COUNTERS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in wanted:
            totals[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return totals


class HttpBackend:
    """SSE streams of /v1/completions through one aiohttp session."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout_s: float, sampling: dict,
                 endpoint: str = "/v1/completions"):
        self.base_url = base_url
        self._endpoint = endpoint
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout_s = timeout_s
        self._sampling = sampling
        self._session = None
        self.model = ""

    async def __aenter__(self) -> "HttpBackend":
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self._headers,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._session.close()

    async def info(self) -> ServerInfo:
        async with self._session.get(self.base_url + "/v1/models") as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"GET {self.base_url}/v1/models answered {resp.status}: {body}")
        card = body["data"][0]
        return ServerInfo(card["id"], card.get("root") or card["id"], card.get("max_model_len"))

    async def counters(self) -> dict[str, float] | None:
        try:
            async with self._session.get(self.base_url + "/metrics") as resp:
                return parse_counters(await resp.text()) if resp.status == 200 else None
        except Exception:  # noqa: BLE001 - the server's own figures are a bonus, not a requirement
            return None

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Callable[[], float]) -> None:
        body = {"model": self.model, "prompt": spec.prompt, "max_tokens": spec.output_len, "stream": True,
                "stream_options": {"include_usage": True}, **self._sampling}
        record.start_s = clock()
        try:
            async with self._session.post(self.base_url + self._endpoint, json=body) as resp:
                if resp.status != 200:
                    record.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                    return
                async for line in resp.content:
                    if self._on_line(line, record, clock):
                        break
        except asyncio.TimeoutError:
            record.error = f"timed out after {self._timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure is the request's, counted and reported
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end_s = clock()

    @staticmethod
    def _on_line(line: bytes, record: RequestRecord, clock: Callable[[], float]) -> bool:
        """Handles one SSE line; True at the end of the stream."""
        if not line.startswith(b"data:"):
            return False
        now = clock()
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return True
        event = json.loads(payload)
        if "error" in event:
            record.error = f"stream error: {_error_message(event)}"
            return True
        if event.get("usage"):
            record.output_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or ():
            finish = choice.get("finish_reason")
            if finish != "abort" or choice.get("text"):  # a token arrived with it
                record.chunk_times_s.append(now)
            if finish is not None:
                record.finish_reason = finish
                if finish == "abort":
                    record.error = "aborted by the server"
        return False


class GrpcBackend:
    """partita.client.AsyncClient streams (no retries)."""

    def __init__(self, target: str, *, api_key: str | None, timeout_s: float, sampling: dict, tls: bool = False,
                 model: str | None = None):
        self.target = target
        self._kwargs = {"api_key": api_key, "tls": tls, "timeout_s": timeout_s, "max_retries": 0,
                        "model": model or ""}
        self._timeout_s = timeout_s
        self._sampling = sampling
        self._client = None
        self.model = ""

    async def __aenter__(self) -> "GrpcBackend":
        from partita.client import AsyncClient

        self._client = AsyncClient(self.target, **self._kwargs)
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self._client.close()

    async def info(self) -> ServerInfo:
        cards = await self._client.models()
        info = await self._client.model_info()
        return ServerInfo(cards[0].id, info.model_name or cards[0].id, cards[0].max_model_len or None)

    async def counters(self) -> dict[str, float] | None:
        return None  # gRPC has no metrics route; pass --metrics-url to scrape the gateway's HTTP side

    async def send(self, spec: RequestSpec, record: RequestRecord, clock: Callable[[], float]) -> None:
        record.start_s = clock()
        try:
            async for chunk in self._client.stream(spec.prompt, max_tokens=spec.output_len, **self._sampling):
                if chunk.token_ids:
                    record.chunk_times_s.append(clock())
                if chunk.is_final:
                    record.finish_reason = chunk.finish_reason
                    record.output_tokens = chunk.usage.completion_tokens if chunk.usage else record.output_tokens
                    if chunk.finish_reason == "abort":
                        record.error = "aborted by the server"
        except Exception as exc:  # noqa: BLE001 - typed PartitaError or a transport failure
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end_s = clock()


def make_backend(url: str, backend: str | None, *, api_key: str | None, timeout_s: float, sampling: dict,
                 model: str | None = None):
    """The backend for a URL; `model` (None: the served one) names the model in gRPC requests (HTTP requests
    carry `backend.model`, set after `info()`)."""
    kind, address = parse_url(url, backend)
    if kind == "grpc":
        return GrpcBackend(address, api_key=api_key, timeout_s=timeout_s, sampling=sampling,
                           tls=url.lower().startswith("grpcs://"), model=model)
    return HttpBackend(address, api_key=api_key, timeout_s=timeout_s, sampling=sampling)


async def scrape_counters(metrics_url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """The SERVER_COUNTERS of any partita /metrics URL (used with the gRPC backend)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(metrics_url) as resp:
                return parse_counters(await resp.text()) if resp.status == 200 else None
    except Exception:  # noqa: BLE001 - optional figures
        return None


def _error_message(body: str | dict) -> str:
    try:
        data = json.loads(body) if isinstance(body, str) else body
        return str(data["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(body)[:300]


def monotonic_clock(start: float) -> Callable[[], float]:
    """Seconds since `start` on time.perf_counter()."""
    return lambda: time.perf_counter() - start
