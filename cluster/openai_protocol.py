"""OpenAI request bodies in, engine inputs out; engine outputs in, OpenAI response bodies out.

Pure functions over dicts (no aiohttp): request parsing raises InvalidArgumentError naming the field
(`messages[1].content`, `temperature`); SamplingParams checks ranges and names its fields too. Beyond
OpenAI's parameters the body may carry vLLM's extras: top_k, min_p, repetition_penalty, seed,
ignore_eos, stop_token_ids, skip_special_tokens.
"""
from __future__ import annotations

import json
from typing import Any

from partita.cluster.gateway_errors import InvalidArgumentError
from partita.workers.sampling_params import SamplingParams

# OpenAI parameters partita does not implement, with the values that mean "off" (anything else is refused)
_UNSUPPORTED_UNLESS = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
}
_PASSTHROUGH = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "ignore_eos",
                "skip_special_tokens")
_TYPES = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float), "seed": int,
          "repetition_penalty": (int, float), "ignore_eos": bool, "skip_special_tokens": bool,
          "max_tokens": int, "max_completion_tokens": int}


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgumentError("body", f"is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise InvalidArgumentError("body", "must be a JSON object")
    return body


def check_supported(body: dict[str, Any]) -> None:
    for name, allowed in _UNSUPPORTED_UNLESS.items():
        if name in body and body[name] not in allowed:
            raise InvalidArgumentError(name, f"{body[name]!r} is not supported by partita")


def _typed(body: dict[str, Any], name: str) -> Any:
    value = body.get(name)
    expected = _TYPES[name]
    if value is not None and (isinstance(value, bool) and expected is not bool or not isinstance(value, expected)):
        raise InvalidArgumentError(name, f"has the wrong type: {value!r}")
    return value


def sampling_params(body: dict[str, Any], *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    """SamplingParams from a body's sampling fields (max_tokens and logprobs decided by the caller)."""
    kwargs: dict[str, Any] = {name: _typed(body, name) for name in _PASSTHROUGH if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidArgumentError("stop", "must be a string or a list of strings")
        kwargs["stop"] = tuple(s for s in stop if s)
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None:
        if not isinstance(stop_token_ids, list):
            raise InvalidArgumentError("stop_token_ids", "must be a list of token ids")
        kwargs["stop_token_ids"] = tuple(stop_token_ids)
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    return SamplingParams(**kwargs)


def stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidArgumentError("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidArgumentError("stream_options", "must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise InvalidArgumentError("stream_options.include_usage", "must be true or false")
    return bool(stream), include_usage


# --- /v1/completions ------------------------------------------------------------------------------------
def completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """One prompt: a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidArgumentError("prompt", "batches of prompts are not supported; send one request per prompt")
    raise InvalidArgumentError("prompt", "must be a string or a list of token ids")


def completion_sampling(body: dict[str, Any]) -> SamplingParams:
    max_tokens = _typed(body, "max_tokens")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)):
        raise InvalidArgumentError("logprobs", f"must be an integer, got {logprobs!r}")
    return sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)


# --- /v1/chat/completions -------------------------------------------------------------------------------
def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages, with content parts of type "text" joined into one string."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages", "must be a non-empty list of messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgumentError(f"messages[{i}]", "must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidArgumentError(f"messages[{i}].role", "must be a non-empty string")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgumentError(f"messages[{i}].content[{j}]", "only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content", "must be a string or a list of text parts")
        result.append({**message, "role": role, "content": content})
    return result


def chat_limits(body: dict[str, Any]) -> tuple[int | None, int | None]:
    """(max_tokens or None for "as many as fit", logprobs count or None)."""
    max_tokens = _typed(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens")
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise InvalidArgumentError("logprobs", f"must be true or false, got {want!r}")
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise InvalidArgumentError("top_logprobs", f"must be an integer, got {top!r}")
    if top and not want:
        raise InvalidArgumentError("top_logprobs", "needs logprobs: true")
    return max_tokens, ((top or 0) if want else None)


# --- responses ------------------------------------------------------------------------------------------
def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_output_tokens,
            "total_tokens": num_prompt_tokens + num_output_tokens}


def completion_logprobs(entries: list[dict], token_text, text_offset: int) -> dict[str, list]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for entry in entries:
        piece = token_text(entry["token_id"])
        tokens.append(piece)
        offsets.append(text_offset)
        text_offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in (e.get("top") or {}).items()} for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict], token_text) -> dict[str, list]:
    def item(token_id: int, logprob: float) -> dict:
        piece = token_text(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in (e.get("top") or {}).items()]} for e in entries]}


class ChunkEncoder:
    """SSE lines of one streamed response; the common case (text only) is a template, not a json.dumps of
    a whole dict, to keep per-token cost low."""

    def __init__(self, response_id: str, created: int, model: str, chat: bool):
        self.chat = chat
        self._head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
                      "created": created, "model": model}
        head = json.dumps(self._head)[:-1]
        if chat:
            self._text_prefix = head + ', "choices": [{"index": 0, "delta": {"content": '
            self._text_suffix = '}, "logprobs": null, "finish_reason": null}]}'
        else:
            self._text_prefix = head + ', "choices": [{"index": 0, "text": '
            self._text_suffix = ', "logprobs": null, "finish_reason": null}]}'

    def text(self, text: str) -> bytes:
        return b"data: " + (self._text_prefix + json.dumps(text) + self._text_suffix).encode() + b"\n\n"

    def choice(self, text: str | None, finish_reason: str | None, logprobs: dict | None = None,
               role: str | None = None) -> bytes:
        if self.chat:
            delta = {} if text is None and role is None else {"content": text or ""}
            if role is not None:
                delta = {"role": role, **delta}
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return self.event({**self._head, "choices": [choice]})

    def usage(self, num_prompt_tokens: int, num_output_tokens: int) -> bytes:
        return self.event({**self._head, "choices": [], "usage": usage(num_prompt_tokens, num_output_tokens)})

    @staticmethod
    def event(payload: dict) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
