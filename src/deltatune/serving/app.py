"""`deltatune serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    POST /v1/completions       {"model": "sst2", "prompt": "...", "max_tokens": 32, "stream": false}
    POST /v1/chat/completions  {"model": "base", "messages": [{"role": "user", "content": "..."}]}
    GET  /v1/models            the base model's name and every adapter's name

The request's `model` picks the adapter (the base model's name: no adapter). Concurrent requests
for different LoRA adapters share one batched generate() (see serve_engine). Binds 127.0.0.1
unless told otherwise: there is no authentication.
"""

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.serving.engine import BatchingEngine, Job
from deltatune.serving.protocol import (ApiError, Options, chat_body, chat_chunk, completion_body, models_body,
                             new_id, parse_chat, parse_completion, usage)


def _load_adapters(model: nn.Module, adapters: Mapping[str, str | os.PathLike] | None,
                   base_name: str) -> list[str]:
    from deltatune.adapters_io import load_adapter
    from deltatune.deltas import adapter_names

    for name, directory in (adapters or {}).items():
        if name == base_name:
            raise DeltatuneError(f"adapter name {name!r} is the base model's name; pick another")
        load_adapter(model, directory, name=name)
    return adapter_names(model)


def build_app(model: nn.Module, tokenizer, adapters: Mapping[str, str | os.PathLike] | None = None,
              base_name: str | None = None, max_batch: int = 8, batch_wait_ms: float = 5.0):
    """The FastAPI app serving `model` (+ `adapters`: name -> adapter directory, loaded now;
    adapters already on the model are served too). The engine thread runs while the app runs."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise DeltatuneError(f"serve: max_batch must be a positive integer, got {max_batch!r}")
    if not batch_wait_ms >= 0:
        raise DeltatuneError(f"serve: batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    base_name = base_name or str(getattr(model, "name_or_path", None) or "base")
    names = [base_name] + _load_adapters(model, adapters, base_name)
    model.eval()
    engine = BatchingEngine(model, tokenizer, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    max_positions = getattr(model.config, "max_position_embeddings", None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="deltatune", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})") from None

    def submit(prompt_ids: list[int], options: Options) -> Job:
        if max_positions and len(prompt_ids) + options.max_tokens > max_positions:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and max_tokens is "
                                f"{options.max_tokens}; this model takes at most {max_positions}",
                           "max_tokens")
        job = Job(prompt_ids=prompt_ids, adapter=None if options.model == base_name else options.model,
                  max_tokens=options.max_tokens, temperature=options.temperature, top_p=options.top_p,
                  stop=options.stop, ignore_eos=options.ignore_eos, seed=options.seed,
                  loop=asyncio.get_running_loop(), events=asyncio.Queue())
        engine.submit(job)
        return job

    async def events(job: Job) -> AsyncIterator[tuple]:
        try:
            while True:
                event = await job.events.get()
                yield event
                if event[0] != "text":
                    return
        finally:
            if job.finish_reason is None:
                job.cancelled = True  # the client left: the engine drops the row

    async def collect(job: Job) -> tuple[str, str]:
        parts = []
        async for kind, *rest in events(job):
            if kind == "text":
                parts.append(rest[0])
            elif kind == "error":
                raise ApiError(500, rest[0], kind="server_error")
            else:
                return "".join(parts), rest[0]
        return "".join(parts), "stop"

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def lines() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    async def stream_chunks(job: Job, make: Any) -> AsyncIterator[dict]:
        async for kind, *rest in events(job):
            if kind == "text":
                yield make(rest[0], None)
            elif kind == "error":
                yield ApiError(500, rest[0], kind="server_error").body()
            else:
                yield make(None, rest[0])

    @app.get("/v1/models")
    async def list_models() -> dict:
        return models_body(names, base_name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompt, options = parse_completion(await read_json(request), names)
        with engine.tokenizer_lock:
            prompt_ids = tokenizer(prompt).input_ids
        job, rid = submit(prompt_ids, options), new_id("cmpl")
        if options.stream:
            return sse(stream_chunks(job, lambda text, reason: completion_body(
                rid, options.model, text or "", reason, None)))
        text, reason = await collect(job)
        return completion_body(rid, options.model, text, reason, usage(len(prompt_ids), len(job.token_ids)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        messages, options = parse_chat(await read_json(request), names)
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {options.model!r} has no chat template; use /v1/completions")
        with engine.tokenizer_lock:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # e.g. a template that insists on alternating roles
                raise ApiError(400, f"messages do not fit this model's chat template: {exc}",
                               "messages") from None
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        job, rid = submit(prompt_ids, options), new_id("chatcmpl")
        if options.stream:
            async def chunks() -> AsyncIterator[dict]:
                yield chat_chunk(rid, options.model, {"role": "assistant", "content": ""}, None)
                async for chunk in stream_chunks(job, lambda text, reason: chat_chunk(
                        rid, options.model, {"content": text} if text else {}, reason)):
                    yield chunk
            return sse(chunks())
        answer, reason = await collect(job)
        return chat_body(rid, options.model, answer, reason, usage(len(prompt_ids), len(job.token_ids)))

    return app


class ServerThread:
    """uvicorn serving `app` in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="deltatune-uvicorn", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise DeltatuneError(f"the server did not start on {host}:{port}")
            self.thread.join(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def parse_adapter_specs(specs: list[str]) -> dict[str, str]:
    """["sst2=runs/sst2/adapter", ...] -> {"sst2": "runs/sst2/adapter"}; one-line errors."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise DeltatuneError(f"--adapter {spec!r}: expected NAME=DIR, e.g. sst2=runs/sst2/adapter")
        if name in adapters:
            raise DeltatuneError(f"--adapter {spec!r}: the name {name!r} is given twice")
        if not Path(directory).is_dir():
            raise DeltatuneError(f"--adapter {spec!r}: {directory}: adapter directory not found")
        adapters[name] = directory
    return adapters


def serve_from_cli(args) -> None:
    """`deltatune serve --model M --adapter name=DIR ... [--host 127.0.0.1] [--port 8000]`."""
    import uvicorn

    from deltatune.models import load_model
    from deltatune.quantization import shared_quantization, use_inference_kernel

    if not 0 <= args.port <= 65535:  # checked before the model loads, not deep inside uvicorn
        raise DeltatuneError(f"--port: must be in 0..65535, got {args.port}")
    adapters = parse_adapter_specs(args.adapter)
    # the base the adapters were trained on, unless --quantize says otherwise
    quantization = getattr(args, "quantize", None) or shared_quantization(adapters)
    model, tokenizer = load_model(args.model, task="causal-lm", quantize=quantization)
    use_inference_kernel(model)  # a server only generates
    app = build_app(model, tokenizer, adapters, base_name=args.model,
                    max_batch=getattr(args, "max_batch", 8),
                    batch_wait_ms=getattr(args, "batch_wait_ms", 5.0))
    print(f"serving {', '.join([args.model, *adapters])} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
