"""`deltatune serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    POST /v1/completions          {"model": "sst2", "prompt": "...", "max_tokens": 32, "stream": false,
                                   "temperature": 0, "top_p": 1, "seed": 1, "stop": ["\\n"], "n": 1,
                                   "logprobs": 2}
    POST /v1/chat/completions     {"model": "base", "messages": [{"role": "user", "content": "..."}]}
    GET  /v1/models               the base model's name and every adapter's name
    POST /v1/load_lora_adapter    {"lora_name": "x", "lora_path": "/dir"}   (vLLM's names and bodies)
    POST /v1/unload_lora_adapter  {"lora_name": "x"}
    GET  /metrics                 Prometheus text format (see serving.metrics)
    GET  /health                  200 {"status": "ok"}; 503 while shutting down; needs no key

The request's `model` picks the adapter (the base model's name: no adapter). The continuous engine
(serving.engine, the default) batches rows from every request at every step; `engine="static"`
keeps the older batch-at-a-time engine (serving.static). Limits and the API key: serving.limits.
Binds 127.0.0.1 unless told otherwise.
"""

import asyncio
import contextlib
import json
import os
from typing import Any, AsyncIterator, Mapping

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.serving.adapter_pool import AdapterPool
from deltatune.serving.core import Draining, EngineCore, QueueFull
from deltatune.serving.job import Job
from deltatune.serving.limits import ApiKeyMiddleware, Limits
from deltatune.serving.protocol import (ApiError, Options, chat_body, chat_chunk, completion_body, completion_choice,
                                        logprobs_body, models_body, new_id, parse_chat, parse_completion, usage)


class Models:
    """The model names a request may use, for protocol's checks (`in`, listing)."""

    def __init__(self, pool: AdapterPool) -> None:
        self.pool = pool

    def __contains__(self, name: str) -> bool:
        return name == self.pool.base_name or self.pool.known(name)

    def __iter__(self):
        return iter(self.pool.names())


def make_engine(model: nn.Module, tokenizer, pool: AdapterPool, kind: str = "continuous", max_batch: int = 32,
                batch_wait_ms: float = 5.0, max_queue: int | None = None) -> EngineCore:
    if kind == "continuous":
        from deltatune.serving.engine import ContinuousEngine
        return ContinuousEngine(model, tokenizer, pool, max_batch=max_batch, max_queue=max_queue)
    if kind == "static":
        from deltatune.serving.static import StaticEngine
        if not batch_wait_ms >= 0:
            raise DeltatuneError(f"serve: batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
        return StaticEngine(model, tokenizer, pool, max_batch=max_batch, max_queue=max_queue,
                            batch_wait_ms=batch_wait_ms)
    raise DeltatuneError(f"--engine: expected continuous or static, got {kind!r}")


def build_app(model: nn.Module, tokenizer, adapters: Mapping[str, str | os.PathLike] | None = None,
              base_name: str | None = None, max_batch: int = 32, batch_wait_ms: float = 5.0, *,
              engine: str = "continuous", adapter_dir: str | os.PathLike | None = None,
              max_adapters: int | None = None, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving `model` (+ `adapters`: name -> directory, and every adapter in
    `adapter_dir`, loaded at first use, at most `max_adapters` at once; adapters already on the
    model are served too). The engine thread runs while the app runs."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    base_name = base_name or str(getattr(model, "name_or_path", None) or "base")
    pool = AdapterPool(model, base_name, dict(adapters or {}), adapter_dir, max_adapters)
    model.eval()
    core = make_engine(model, tokenizer, pool, engine, max_batch, batch_wait_ms, limits.max_queue)
    metrics, models = pool.metrics, Models(pool)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    max_prompt = limits.max_prompt_tokens or max_positions
    max_tokens_cap = limits.max_tokens or max_positions

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core.start()
        yield
        await asyncio.to_thread(core.stop, True)  # SIGTERM: uvicorn let in-flight replies finish

    app = FastAPI(title="deltatune", lifespan=lifespan)
    app.state.engine = core

    def error_response(error: ApiError, headers: dict | None = None) -> JSONResponse:
        metrics.rejected.inc(str(error.status))
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, getattr(exc, "headers", None))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

    async def read_json(request: Request) -> Any:
        cap = limits.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than the limit of {cap} bytes (--max-body-bytes)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cap:
                raise too_big
        try:
            return json.loads(bytes(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None

    def submit(prompt_ids: list[int], options: Options) -> list[Job]:
        if max_prompt and len(prompt_ids) > max_prompt:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the limit is {max_prompt} "
                                f"(max_prompt_tokens)", "prompt")
        if max_tokens_cap and options.max_tokens * options.n > max_tokens_cap:
            raise ApiError(400, f"max_tokens x n is {options.max_tokens * options.n}; the limit is "
                                f"{max_tokens_cap} (max_tokens_limit)", "max_tokens")
        if max_positions and len(prompt_ids) + options.max_tokens > max_positions:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is "
                                f"{options.max_tokens}; this model takes at most {max_positions}",
                           "max_tokens")
        if options.logprobs is not None and engine != "continuous":
            raise ApiError(400, "'logprobs' needs the continuous engine", "logprobs")
        events: asyncio.Queue = asyncio.Queue()
        adapter = None if options.model == base_name else options.model
        jobs: list[Job] = []
        try:
            for choice in range(options.n):
                jobs.append(core.submit(Job.for_loop(
                    events=events, prompt_ids=prompt_ids, adapter=adapter, max_tokens=options.max_tokens,
                    temperature=options.temperature, top_p=options.top_p, stop=options.stop,
                    ignore_eos=options.ignore_eos, seed=options.seed, logprobs=options.logprobs,
                    timeout=limits.request_timeout, choice=choice)))
        except QueueFull as exc:
            for job in jobs:
                job.cancelled = True
            error = ApiError(429, str(exc), kind="rate_limit_error")
            error.headers = {"Retry-After": str(exc.retry_after)}
            raise error from None
        except Draining as exc:
            raise ApiError(503, str(exc), kind="server_error") from None
        return jobs

    async def events(jobs: list[Job]) -> AsyncIterator[tuple]:
        """(kind, value, choice) of all the request's jobs until each is done."""
        open_jobs = len(jobs)
        try:
            while open_jobs:
                event = await jobs[0].events.get()
                open_jobs -= event[0] != "text"
                yield event
        finally:
            for job in jobs:
                if job.finish_reason is None:
                    job.cancelled = True  # the client left: the engine drops the row

    def failure(jobs: list[Job], message: str) -> ApiError:
        timed_out = any(job.error is not None and job.error.kind == "timeout" for job in jobs)
        return ApiError(504 if timed_out else 500, message, kind="timeout" if timed_out else "server_error")

    async def collect(jobs: list[Job]) -> list[tuple[str, str]]:
        parts: list[list[str]] = [[] for _ in jobs]
        reasons = ["stop"] * len(jobs)
        async for kind, value, choice in events(jobs):
            if kind == "text":
                parts[choice].append(value)
            elif kind == "error":
                raise failure(jobs, value)
            else:
                reasons[choice] = value
        return [("".join(p), r) for p, r in zip(parts, reasons)]

    def logprobs_of(job: Job) -> dict | None:
        if job.logprobs is None:
            return None
        with core.tokenizer_lock:
            text = lambda i: tokenizer.decode([i])  # noqa: E731
            tokens = [text(i) for i in job.token_ids]
            top = [{text(i): v for i, v in alts.items()} for _, alts in job.token_logprobs]
        return logprobs_body(tokens, [lp for lp, _ in job.token_logprobs], top)

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    async def stream_chunks(jobs: list[Job], make: Any) -> AsyncIterator[dict]:
        async for kind, value, choice in events(jobs):
            if kind == "text":
                yield make(value, None, jobs[choice])
            elif kind == "error":
                yield failure(jobs, value).body()
            else:
                yield make(None, value, jobs[choice])

    @app.get("/health")
    async def health():
        if core.stopping:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict:
        return models_body(pool.names(), base_name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        path = body.get("lora_path") if isinstance(body, dict) else None
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise ApiError(400, "'lora_name' and 'lora_path' are required strings", "lora_name")
        try:
            pool.register(name, path)
        except DeltatuneError as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        try:
            await asyncio.to_thread(core.call, lambda: pool.preload(name))
        except DeltatuneError as exc:  # e.g. saved for another base model
            pool.forget(name)
            raise ApiError(400, str(exc), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await read_json(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' is required", "lora_name")
        try:
            pool.unregister(name)
        except DeltatuneError as exc:
            raise ApiError(404, str(exc), "lora_name", kind="not_found_error") from None
        await asyncio.to_thread(core.call, pool.sweep)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompt, options = parse_completion(await read_json(request), models)
        with core.tokenizer_lock:
            prompt_ids = tokenizer(prompt).input_ids
        jobs, rid = submit(prompt_ids, options), new_id("cmpl")
        if options.stream:
            return sse(stream_chunks(jobs, lambda text, reason, job: completion_body(
                rid, options.model, [completion_choice(job.choice, text or "", reason,
                                                       logprobs_of(job) if reason else None)], None)))
        answers = await collect(jobs)
        choices = [completion_choice(i, text, reason, logprobs_of(job))
                   for i, ((text, reason), job) in enumerate(zip(answers, jobs))]
        return completion_body(rid, options.model, choices,
                               usage(len(prompt_ids), sum(len(job.token_ids) for job in jobs)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        messages, options = parse_chat(await read_json(request), models)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {options.model!r} has no chat template; use /v1/completions")
        with core.tokenizer_lock:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # e.g. a template that insists on alternating roles
                raise ApiError(400, f"messages do not fit this model's chat template: {exc}",
                               "messages") from None
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        jobs, rid = submit(prompt_ids, options), new_id("chatcmpl")
        if options.stream:
            async def chunks() -> AsyncIterator[dict]:
                for job in jobs:
                    yield chat_chunk(rid, options.model, {"role": "assistant", "content": ""}, None, job.choice)
                async for chunk in stream_chunks(jobs, lambda text, reason, job: chat_chunk(
                        rid, options.model, {"content": text} if text else {}, reason, job.choice)):
                    yield chunk
            return sse(chunks())
        answers = await collect(jobs)
        return chat_body(rid, options.model, answers,
                         usage(len(prompt_ids), sum(len(job.token_ids) for job in jobs)))

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, metrics=metrics)
    return app
