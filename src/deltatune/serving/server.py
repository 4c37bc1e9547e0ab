"""Running the app: `deltatune serve` from the command line, or a ServerThread in-process.

SIGTERM (or Ctrl-C) makes uvicorn stop accepting connections and wait for the replies in flight;
then the app's shutdown drains the engine (every queued and running request finishes) and the
process exits.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch

from deltatune.errors import DeltatuneError


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

    def terminate(self) -> None:
        """What SIGTERM does: stop accepting, let in-flight requests finish, then shut down."""
        self.server.should_exit = True

    def stop(self, timeout: float = 60) -> None:
        self.terminate()
        self.thread.join(timeout=timeout)


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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def serving_dtype(setting: str, device: torch.device | None = None) -> torch.dtype:
    """--dtype: fp32 | bf16 | auto. auto asks the same measured probe as `train.bf16: auto`, so
    a CPU where bf16 is emulated (AVX2 only: 100x slower) never gets it. Every row of a server
    computes in this precision, and so must the generate() its replies are compared with."""
    if setting == "auto":
        from deltatune.hardware import bf16_auto

        # the probe of the device the server computes on: the CPU (load_model leaves a dense base
        # there; only a bitsandbytes-quantized one lands on GPU 0, where compute dtype is its own)
        setting = "bf16" if bf16_auto(device or torch.device("cpu")) else "fp32"
    if setting not in DTYPES:
        raise DeltatuneError(f"--dtype: expected fp32, bf16 or auto, got {setting!r}")
    return DTYPES[setting]


def serve_from_cli(args) -> None:
    """`deltatune serve --model M [--adapter name=DIR ...] [--adapter-dir DIR --max-adapters N]
    [--api-key KEY] [--max-queue N] ...` (see serving.limits for the limits)."""
    import uvicorn

    from deltatune.models import load_model
    from deltatune.quantization import shared_quantization, use_inference_kernel
    from deltatune.serving.app import build_app
    from deltatune.serving.limits import Limits, resolve_api_key

    if not 0 <= args.port <= 65535:  # checked before the model loads, not deep inside uvicorn
        raise DeltatuneError(f"--port: must be in 0..65535, got {args.port}")
    adapters = parse_adapter_specs(args.adapter)
    api_key = resolve_api_key(getattr(args, "api_key", None))
    limits = Limits(max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_tokens=args.max_tokens_limit, request_timeout=args.request_timeout,
                    max_body_bytes=args.max_body_bytes)
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        raise DeltatuneError(f"--adapter-dir {args.adapter_dir}: directory not found")
    # the base the adapters were trained on, unless --quantize says otherwise
    quantization = getattr(args, "quantize", None) or shared_quantization(adapters)
    dtype = serving_dtype(getattr(args, "dtype", "fp32"))
    model, tokenizer = load_model(args.model, task="causal-lm", quantize=quantization, dtype=dtype)
    use_inference_kernel(model)  # a server only generates
    app = build_app(model, tokenizer, adapters, base_name=args.model, max_batch=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms, engine=args.engine, adapter_dir=args.adapter_dir,
                    max_adapters=args.max_adapters, api_key=api_key, limits=limits)
    names = ", ".join(app.state.engine.pool.names())
    print(f"serving {names} on http://{args.host}:{args.port}/v1 ({args.engine} batching, "
          f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
          f"{', API key required' if api_key else ''})", flush=True)
    # uvicorn drains on SIGTERM, then raises SIGTERM again under the handler it found: with this
    # one the process exits 0 after a clean drain instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print("deltatune serve: stopped (every request in flight was answered)", flush=True)
