"""`deltatune ui`: the local web app — runs, launch, compare, playground — on FastAPI + uvicorn
(what `serve` uses). The page is static HTML/CSS/JS shipped in the package (ui/static/); it
talks to the JSON API below. Nothing is loaded from the network, so it works offline.

    GET  /api/runs                        every run and comparison, and the launched jobs
    GET  /api/run?id=ID&since=N           a run: config, summary, checkpoints, metrics from line N
    GET  /api/comparison?id=ID            a comparison's rows and reading (partial while running)
    GET  /api/options                     presets, tasks, formats, methods (the launch form)
    POST /api/plan | /api/launch          the form -> plan's prediction | a started job
    POST /api/jobs/{id}/stop
    GET  /api/playground                  bases and the runs trained on each
    POST /api/playground/classify         {base, runs: [...], text}
    POST /api/playground/chat             {base, run, messages}: server-sent events

Binds 127.0.0.1 by default; bound anywhere else it needs --api-key (the page can start
processes), sent as `Authorization: Bearer KEY`.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any, AsyncIterator

from deltatune.errors import DeltatuneError
from deltatune.ui import runs as runs_index
from deltatune.ui.launch import FormError, Jobs, METHOD_OPTIONS
from deltatune.ui.playground import Playground, choices

STATIC = Path(__file__).parent / "static"


def options(root: Path) -> dict[str, Any]:
    """What the launch form offers: presets, tasks, formats per task, methods and their options,
    and data files found under ../shared/data (or $DELTATUNE_DATA)."""
    import os

    from deltatune.compare.settings import ALL_METHODS
    from deltatune.config.run import DATA_ENV, FORMATS_BY_TASK, SHARED_DATA_PREFIX
    from deltatune.methods import REGISTRY
    from deltatune.models import PRESETS

    data_root = Path(os.environ.get(DATA_ENV) or SHARED_DATA_PREFIX)
    files = sorted(str(p) for p in data_root.glob("*/*.jsonl"))[:200] if data_root.is_dir() else []
    return {"presets": PRESETS, "formats": FORMATS_BY_TASK,
            "methods": {m: METHOD_OPTIONS.get(m, []) for m in REGISTRY},
            # ticked when comparing: compare's own default list, less full fine-tuning
            "compare_defaults": [m for m in ALL_METHODS if m in REGISTRY and m != "full"],
            "data_files": files, "runs_root": str(root)}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(runs_root: str | Path, api_key: str | None = None, poll_ms: int = 1000):
    """The web app for the runs under `runs_root`. `poll_ms`: how often the page refreshes."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    root = Path(runs_root).resolve()
    jobs, playground = Jobs(root), Playground(root)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(jobs.shutdown)  # no training left running without its page

    app = FastAPI(title="deltatune ui", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.jobs, app.state.playground = jobs, playground
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse({"error": "this page needs the API key (--api-key)"}, 401)
        return await call_next(request)

    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> JSONResponse:
        return JSONResponse({"errors": exc.errors}, status_code=400)

    @app.exception_handler(DeltatuneError)
    async def user_error(request: Request, exc: DeltatuneError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def body(request: Request) -> dict:
        try:
            value = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise DeltatuneError("the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise DeltatuneError("the request body must be a JSON object")
        return value

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def list_runs() -> dict:
        return {**runs_index.scan(root), "jobs": jobs.list(), "poll_ms": poll_ms}

    @app.get("/api/run")
    def run(id: str, since: int = 0) -> dict:
        return runs_index.run_detail(root, id, max(0, since))

    @app.get("/api/comparison")
    def comparison(id: str) -> dict:
        return runs_index.comparison_detail(root, id)

    @app.get("/api/options")
    def form_options() -> dict:
        return options(root)

    @app.post("/api/plan")
    async def plan(request: Request) -> dict:
        form = await body(request)
        return {"plans": await asyncio.to_thread(jobs.plan, form)}

    @app.post("/api/launch")
    async def launch(request: Request) -> dict:
        form = await body(request)
        return await asyncio.to_thread(jobs.start, form)

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str) -> dict:
        return jobs.stop(job_id)

    @app.get("/api/playground")
    def playground_choices() -> dict:
        return {"bases": choices(root)}

    @app.post("/api/playground/classify")
    async def classify(request: Request) -> dict:
        form = await body(request)
        results = await asyncio.to_thread(playground.classify, str(form.get("base", "")),
                                          list(form.get("runs") or []), str(form.get("text", "")))
        return {"results": results}

    @app.post("/api/playground/chat")
    async def chat(request: Request) -> StreamingResponse:
        form = await body(request)
        try:
            max_tokens = int(form.get("max_tokens", 64))
        except (TypeError, ValueError):
            raise DeltatuneError(f"max_tokens: must be a whole number, got {form.get('max_tokens')!r}") from None

        def events():
            try:
                for piece in playground.chat(str(form.get("base", "")), str(form.get("run", "")),
                                             list(form.get("messages") or []), max_tokens):
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield f"data: {json.dumps({'done': True})}\n\n"
            except DeltatuneError as exc:
                yield f"data: {json.dumps({'error': str(exc)})}\n\n"
            except Exception as exc:  # the page shows one line, never a traceback
                yield f"data: {json.dumps({'error': f'{type(exc).__name__}: {exc}'})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def ui_from_cli(args) -> None:
    """`deltatune ui [--runs DIR] [--host 127.0.0.1] [--port 7860] [--api-key KEY]`."""
    import uvicorn

    from deltatune.serving.limits import resolve_api_key

    if not 0 <= args.port <= 65535:
        raise DeltatuneError(f"--port: must be in 0..65535, got {args.port}")
    api_key = resolve_api_key(args.api_key)  # as `serve`: --api-key, else $DELTATUNE_API_KEY
    if not _is_loopback(args.host) and not api_key:
        raise DeltatuneError(f"--host {args.host}: the page can start training processes; bound "
                             "beyond this machine it needs --api-key KEY")
    root = Path(args.runs)
    if root.exists() and not root.is_dir():
        raise DeltatuneError(f"--runs {root}: not a directory")
    root.mkdir(parents=True, exist_ok=True)
    app = build_app(root, api_key=api_key)
    print(f"deltatune ui: {root.resolve()} on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
