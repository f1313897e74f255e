"""`/v1/completions` and `/v1/chat/completions`: OpenAI bodies through the gateway's request tracker.

A streamed response waits for the request's first output before it sends its headers, so that errors the
engine finds in the input (prompt too long, a bad token id) still answer HTTP 400 rather than an SSE event.
After that an error becomes an SSE `data: {"error": ...}` event before `data: [DONE]`. A client that
disconnects cancels the handler, which aborts the request.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from partita.cluster import openai_protocol as oai
from partita.cluster.gateway_errors import InvalidArgumentError, as_gateway_error

if TYPE_CHECKING:
    from partita.cluster.gateway import Gateway

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIServing:
    def __init__(self, gateway: "Gateway"):
        self._gateway = gateway
        self._token_text_cache: dict[int, str] = {}

    def _token_text(self, token_id: int) -> str:
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = self._gateway.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text_cache) < 1 << 16:
                self._token_text_cache[token_id] = text
        return text

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = oai.parse_body(await request.read())
        self._gateway.check_model(body.get("model"))
        oai.check_supported(body)
        stream, include_usage = oai.stream_options(body)
        prompt = oai.completion_prompt(body)
        params = oai.completion_sampling(body)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return await self._serve(request, request_id, prompt, params, stream, include_usage, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = oai.parse_body(await request.read())
        self._gateway.check_model(body.get("model"))
        oai.check_supported(body)
        stream, include_usage = oai.stream_options(body)
        messages = oai.chat_messages(body)
        max_tokens, logprobs = oai.chat_limits(body)
        tokenizer = self._gateway.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - no template, or the template's raise_exception
            raise InvalidArgumentError("messages", f"cannot apply the chat template: {e}") from None
        prompt = tokenizer.encode(text, add_special_tokens=False)
        if max_tokens is None:
            max_tokens = max(1, self._gateway.engine.model_info.max_model_len - len(prompt))
        params = oai.sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._serve(request, request_id, prompt, params, stream, include_usage, chat=True)

    async def _serve(self, request: web.Request, request_id: str, prompt, params, stream: bool,
                     include_usage: bool, chat: bool) -> web.StreamResponse:
        tracker = self._gateway.tracker
        async with contextlib.aclosing(tracker.open(request_id, prompt, params)) as tracked:
            if stream:
                return await self._stream(request, tracked, request_id, include_usage, chat)
            return await self._collect(tracked, request_id, chat)

    async def _collect(self, tracked, request_id: str, chat: bool) -> web.Response:
        pieces: list[str] = []
        logprobs: list[dict] = []
        out = None
        async for out in tracked:
            pieces.append(out.text_delta)
            if out.logprobs:
                logprobs.extend(out.logprobs)
        text = "".join(pieces)
        want_logprobs = tracked.params.logprobs is not None
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": oai.chat_logprobs(logprobs, self._token_text) if want_logprobs
                                      else None, "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": out.finish_reason,
                      "logprobs": oai.completion_logprobs(logprobs, self._token_text, 0) if want_logprobs else None}
        return web.json_response({
            "id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self._gateway.model_name, "choices": [choice],
            "usage": oai.usage(out.num_prompt_tokens, out.num_output_tokens)})

    async def _stream(self, request: web.Request, tracked, request_id: str, include_usage: bool,
                      chat: bool) -> web.StreamResponse:
        first = await tracked.__anext__()  # errors found in the input still answer with a status code
        encoder = oai.ChunkEncoder(request_id, int(time.time()), self._gateway.model_name, chat)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        want_logprobs = tracked.params.logprobs is not None
        text_offset = 0
        if chat:
            await response.write(encoder.choice("", None, role="assistant"))
        out = first
        try:
            while True:
                if out.finished or want_logprobs:
                    logprobs = None
                    if want_logprobs and out.logprobs:
                        logprobs = (oai.chat_logprobs(out.logprobs, self._token_text) if chat else
                                    oai.completion_logprobs(out.logprobs, self._token_text, text_offset))
                    if out.text_delta or out.finished or logprobs:
                        await response.write(encoder.choice(out.text_delta, out.finish_reason, logprobs))
                elif out.new_token_ids or out.text_delta:  # one event per output, even mid-character
                    await response.write(encoder.text(out.text_delta))
                text_offset += len(out.text_delta)
                if out.finished:
                    if include_usage:
                        await response.write(encoder.usage(out.num_prompt_tokens, out.num_output_tokens))
                    break
                out = await tracked.__anext__()
        except ConnectionError:  # the client went away: closing the tracker aborts the request
            return response
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error travels as an event
            await response.write(encoder.event(as_gateway_error(exc).to_json()))
        await response.write(oai.DONE)
        await response.write_eof()
        return response
