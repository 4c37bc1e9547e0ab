"""What the server refuses, and who may ask: the API key and the request limits.

    --api-key KEY (or DELTATUNE_API_KEY)  every route but /health needs `Authorization: Bearer KEY`;
                                          401 otherwise
    --max-prompt-tokens N                 longer prompts: 400 naming the limit (default: the model's
                                          context length)
    --max-tokens-limit N                  a larger max_tokens (or n x max_tokens): 400 naming the limit
    --max-queue N                         N requests already waiting: 429 with Retry-After
    --request-timeout S                   a request not finished after S seconds (queue included):
                                          504 (or an error event when streaming)
    --max-body-bytes N                    a larger request body: 413
"""
from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass

from deltatune.errors import DeltatuneError
from deltatune.serving.metrics import ServingMetrics

API_KEY_ENV = "DELTATUNE_API_KEY"
OPEN_PATHS = ("/health",)


@dataclass
class Limits:
    max_queue: int | None = 256
    max_prompt_tokens: int | None = None   # None: the model's max_position_embeddings
    max_tokens: int | None = None          # None: the model's max_position_embeddings
    request_timeout: float | None = 600.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for key in ("max_queue", "max_prompt_tokens", "max_tokens", "max_body_bytes"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DeltatuneError(f"serve: {key} must be a positive integer, got {value!r}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise DeltatuneError(f"serve: request_timeout must be > 0 seconds, got {self.request_timeout!r}")


def resolve_api_key(key: str | None) -> str | None:
    """The key given, else $DELTATUNE_API_KEY, else None (no authentication)."""
    key = key if key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise DeltatuneError(f"--api-key / ${API_KEY_ENV}: the key is empty")
    return key


class ApiKeyMiddleware:
    """ASGI middleware: 401 (OpenAI's error shape) for any request without the bearer key."""

    def __init__(self, app, api_key: str, metrics: ServingMetrics | None = None) -> None:
        self.app, self.expected, self.metrics = app, f"Bearer {api_key}".encode(), metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        if self.metrics is not None:
            self.metrics.rejected.inc("401")
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        body = json.dumps({"error": {"message": message, "type": "authentication_error",
                                     "param": None, "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
