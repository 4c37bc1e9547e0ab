"""OpenAI-compatible request checking and response bodies for `deltatune serve`.

Requests are checked by hand rather than by pydantic models so that every bad request gets
OpenAI's error shape, `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`,
with one sentence naming the field.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}  # OpenAI's completions default is 16
MAX_N = 16          # choices per request
MAX_LOGPROBS = 5    # alternatives per token, as OpenAI's completions allow
ROLES = ("system", "user", "assistant", "tool", "developer")


class ApiError(Exception):
    """A request the server refuses: becomes an HTTP status plus OpenAI's JSON error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.status}}


@dataclass
class Options:
    """The generation settings shared by both endpoints."""

    model: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    seed: int | None
    ignore_eos: bool   # not in OpenAI's API (vLLM has it): benchmarks need fixed-length outputs
    n: int = 1
    logprobs: int | None = None  # completions only: alternatives per token (0: just the chosen one)


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, got {value!r}", key)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{key}' must be in {bound}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, minimum: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer, got {value!r}", key)
    if minimum is not None and value < minimum:
        raise ApiError(400, f"'{key}' must be at least {minimum}, got {value}", key)
    return value


def _options(body: Any, kind: str, known_models: list[str]) -> Options:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's name", "model")
    if model not in known_models:
        raise ApiError(404, f"model {model!r} does not exist; this server has: {', '.join(known_models)}",
                       "model", kind="not_found_error")
    key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, key, DEFAULT_MAX_TOKENS[kind], minimum=1)
    n = _integer(body, "n", 1, minimum=1)
    if n > MAX_N:
        raise ApiError(400, f"'n' must be at most {MAX_N}, got {n}", "n")
    logprobs = None
    if kind == "completion":
        logprobs = _integer(body, "logprobs", None, minimum=0)
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise ApiError(400, f"'logprobs' must be at most {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    elif body.get("logprobs"):
        raise ApiError(400, "'logprobs' is supported on /v1/completions only", "logprobs")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of up to 4 non-empty strings, got {body['stop']!r}", "stop")
    for flag in ("stream", "ignore_eos"):
        if not isinstance(body.get(flag, False), bool):
            raise ApiError(400, f"'{flag}' must be true or false, got {body[flag]!r}", flag)
    return Options(model=model, max_tokens=max_tokens,
                   temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                   top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                   stop=stop, stream=body.get("stream", False), seed=_integer(body, "seed", None),
                   ignore_eos=body.get("ignore_eos", False), n=n, logprobs=logprobs)


def parse_completion(body: Any, known_models: list[str]) -> tuple[str, Options]:
    options = _options(body, "completion", known_models)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' is required: a non-empty string (one prompt per request)", "prompt")
    return prompt, options


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
            raise ApiError(400, f"messages[{index}].content: only text parts are supported", "messages")
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string, got {content!r}", "messages")
    return content


def parse_chat(body: Any, known_models: list[str]) -> tuple[list[dict[str, str]], Options]:
    options = _options(body, "chat", known_models)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}", "messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role in {', '.join(ROLES)}", "messages")
        checked.append({"role": message["role"], "content": _content(message, i)})
    return checked, options


# ------------------------------------------------------------------ response bodies
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "finish_reason": reason, "logprobs": logprobs}


def completion_body(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def logprobs_body(tokens: list[str], chosen: list[float], top: list[dict[str, float]]) -> dict:
    """OpenAI's completions logprobs: offsets count characters of the completion text."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": top, "text_offset": offsets}


def chat_body(rid: str, model: str, answers: list[tuple[str, str]], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "finish_reason": reason, "logprobs": None} for i, (text, reason) in enumerate(answers)],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None, index: int = 0) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}


def models_body(names: list[str], base: str) -> dict:
    created = int(time.time())
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "deltatune",
         "root": base, "parent": None if name == base else base} for name in names]}
