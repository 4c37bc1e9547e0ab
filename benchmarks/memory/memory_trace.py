"""Where a training process's memory goes, step by step: what glibc holds vs what is live.

    python benchmarks/memory/memory_trace.py MODEL [qlora.py's train options] [--interval 0.01]

Runs qlora.py's SFT work (same run config, rows and loop) with a sampler thread that reads, every
`--interval` seconds, the process's RSS and glibc's own accounting (mallinfo2: bytes in use in
its heaps, bytes free but kept in them, bytes in mmapped chunks). Prints one JSON line per step:
the step's peak RSS above the RSS after loading, and at that moment what was live (in use + mmapped)
and what was free but kept, plus the same at the end of the step's forward pass. This is the data
behind plan.py's allocator term (README "plan vs measured").
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import qlora
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2
_PAGE = os.sysconf("SC_PAGE_SIZE")


def sample() -> dict:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    m = _libc.mallinfo2()
    return {"rss": rss, "live": m.uordblks + m.hblkhd, "kept": m.fordblks, "mmapped": m.hblkhd,
            "heap": m.arena}


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), sample()))
            time.sleep(self.interval)


def traced(on_start):
    """Patch the trainer's inner loop so that `on_start(model)` runs once training begins."""
    from deltatune.training import loop

    inner = loop._train

    def wrapper(run, on_step):
        on_start(run.model)
        return inner(run, on_step)

    loop._train = wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="qlora.py's MODEL, or a deltatune run config (.yaml) with --config")
    parser.add_argument("overrides", nargs="*", help="--config: key=value overrides")
    parser.add_argument("--config", action="store_true", help="MODEL is a run config: `deltatune train` it")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--batch", type=int, default=S.BATCH)
    parser.add_argument("--max-length", type=int, default=S.MAX_LENGTH)
    parser.add_argument("--interval", type=float, default=0.01)
    args = parser.parse_args()
    import torch
    from deltatune.training.loop import train as train_loop, train_from_config

    marks: list[tuple[str, float]] = []
    sampler = Sampler(args.interval)
    state: dict = {}

    def on_start(model) -> None:
        with torch.no_grad():  # as plan does: weights may load memory-mapped, count them first
            for parameter in model.parameters():
                parameter.sum()
        model.register_forward_hook(lambda *a: marks.append(("forward", time.perf_counter())))

        def shape(module, args, kwargs):  # the tokens each training batch computes
            ids = kwargs.get("input_ids", args[0] if args else None)
            if module.training and ids is not None:
                marks.append(("tokens", int(ids.numel())))
        model.register_forward_pre_hook(shape, with_kwargs=True)
        state["start"] = sample()
        marks.append(("start", time.perf_counter()))
        sampler.start()

    traced(on_start)
    on_step = lambda step: marks.append(("step", time.perf_counter()))  # noqa: E731
    with tempfile.TemporaryDirectory() as out:
        if args.config:
            summary = train_from_config(args.model, [*args.overrides, f"output_dir={out}/run"],
                                        on_step=on_step)
            dataset = None
        else:
            import deltatune as dt

            model, tokenizer = qlora.load(args)
            dataset = S.load_examples(tokenizer, args.max_length)
            config = qlora.run_config(args, out)
            dt.apply(model, dt.config_from_dict(config.method))
            summary = train_loop(model, tokenizer, config, train_dataset=dataset, on_step=on_step)
    sampler.stop.set()
    sampler.join()
    report(args, state["start"], sampler.samples, marks, dataset)
    print(json.dumps({"summary_peak_gb": (summary or {}).get("peak_memory_bytes", 0) / 2**30}))


def report(args, start: dict, samples: list, marks: list, dataset) -> None:
    from deltatune.training.optimization import BatchStream

    ends = [t for kind, t in marks if kind in ("start", "step")]
    forwards = [t for kind, t in marks if kind == "forward"]
    shapes = [n for kind, n in marks if kind == "tokens"]
    gb = 2 ** 30
    print(json.dumps({"start_rss_gb": start["rss"] / gb, "start_live_gb": start["live"] / gb,
                      **vars(args)}))
    stream = BatchStream(len(dataset), args.batch, S.SEED) if dataset is not None else None
    for k, (a, b) in enumerate(zip(ends, ends[1:])):
        inside = [s for t, s in samples if a <= t < b]
        if not inside:
            continue
        peak = max(inside, key=lambda s: s["rss"])
        live = max(inside, key=lambda s: s["live"])
        forward_end = next((t for t in forwards if a <= t < b), None)
        at_forward = next((s for t, s in samples if forward_end and t >= forward_end), None)
        tokens = (sum(len(dataset[i].input_ids) for i in stream.rows(k)) if stream
                  else shapes[k] if k < len(shapes) else None)
        print(json.dumps({
            "step": k + 1, "tokens": tokens, "seconds": round(b - a, 2),
            "peak_rss_gb": round((peak["rss"] - start["rss"]) / gb, 3),
            "at_peak_live_gb": round((peak["live"] - start["live"]) / gb, 3),
            "at_peak_kept_gb": round(peak["kept"] / gb, 3),
            "at_peak_mmapped_gb": round(peak["mmapped"] / gb, 3),
            "max_live_gb": round((live["live"] - start["live"]) / gb, 3),
            "forward_end_rss_gb": round((at_forward["rss"] - start["rss"]) / gb, 3) if at_forward else None,
            "forward_end_live_gb": round((at_forward["live"] - start["live"]) / gb, 3) if at_forward else None,
            "end_rss_gb": round((inside[-1]["rss"] - start["rss"]) / gb, 3),
            "end_kept_gb": round(inside[-1]["kept"] / gb, 3),
            "end_mmapped_gb": round(inside[-1]["mmapped"] / gb, 3)}))


if __name__ == "__main__":
    sys.exit(main())
