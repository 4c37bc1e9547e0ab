"""Long sequences on real model shapes: deltatune vs peft + HF Trainer, batch 1, 1k-8k+ tokens.

    python benchmarks/memory/long_context.py point MODEL_DIR --tool deltatune|peft --length 4096
                                 [--quantize none|nf4] [--steps 2] [--cap-gb 20] [--profile]
    python benchmarks/memory/long_context.py sweep MODEL_DIR --lengths 1024,2048,4096 [--tools deltatune,peft]
                                 [--quantize none] [--name llama1b-lora-bf16]
    python benchmarks/memory/long_context.py longest MODEL_DIR --tool deltatune --lo 1024 --hi 16384
                                 [--cap-gb 20]
    python benchmarks/memory/long_context.py plan MODEL_DIR --lengths 1024,2048,4096 [--cap-gb 20]
    python benchmarks/memory/long_context.py mfu MODEL_DIR --length 2048 --result SWEEP.json
                                 [--profiled POINT.log]
    python benchmarks/memory/long_context.py levers MODEL_DIR --lengths 512,4096,8192 [--layers 4]
                                 [--levers defaults,checkpoint_bf16]
    python benchmarks/memory/long_context.py point|plan|levers MODEL_DIR --layers 2 ...

`--layers N` (point, plan): the same shape cut to N layers, random-initialised once into
$TMPDIR/deltatune-reduced/ (a child process builds it): a short memory probe of a wide model
whose per-layer and per-token terms are those of the full depth.

MODEL_DIR is a random-initialised Llama made by `qlora.py make-llama1b DIR` (Llama-3.2-1B's
shape) or `qlora.py make-llama8b DIR` then `qlora.py save-quantized DIR --quantize nf4 --dtype bf16`
(Llama-3.1-8B's shape, quantized once). The work: one row of LENGTH seeded random token ids per
step, the loss on every token, LoRA r=8 (alpha 16) on the seven projections, bf16 weights and bf16
autocast, gradient checkpointing on, batch 1, lr 2e-4. Both tools get the same ids.

`point` runs one tool at one length in this process and prints one JSON line: peak RSS (VmHWM,
loading included, and the training phase's own, reset after loading), real tokens/s over the steps
after the first, the losses. A watchdog thread ends the process (exit 3, "over_cap": true) the
moment its RSS passes --cap-gb, so a probe past the cap never takes the machine's memory.
`sweep` runs one process per point, the tools alternating at each length, and writes the raw
JSON (benchmarks/results/memory/). `longest` bisects each tool's longest length within the cap,
one step per probe. `levers` runs deltatune alone with each lever of LEVERS in turn (the rest at
their defaults) at each length. `plan` is deltatune's own prediction (`plan --max-length auto`) for the same
work: the peak at each length and the longest length within the cap.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S  # noqa: E402  (sets HF_HUB_OFFLINE, puts src/ on the path)
import torch  # noqa: E402

TOOLS = ("deltatune", "peft")
TOKEN_FLOOR = 3  # ids below are the tokenizer's specials
LOAD_PEAK: list[int] = []  # VmHWM once the model is loaded, before the training phase's reset


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def watchdog(cap_bytes: int) -> None:
    """Leave at once (exit 3) when this process's RSS passes the cap: the probe did not fit."""
    def watch() -> None:
        while True:
            rss = _status("VmRSS")
            if rss > cap_bytes:
                print(json.dumps({"over_cap": True, "rss_gb": rss / 2**30}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def token_rows(length: int, steps: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(S.SEED)
    return [torch.randint(TOKEN_FLOOR, vocab, (length,), generator=generator).tolist() for _ in range(steps)]


def run_deltatune(args, rows) -> tuple[list[float], list[float], float]:
    import deltatune as dt
    from deltatune.config.run import build_run_config
    from deltatune.data.dataset import Example
    from deltatune.training.loop import train

    # `--train bf16=false`: fp32 weights and no autocast (CPUs without native bf16, where a bf16
    # product runs hundreds of times slower than an fp32 one)
    bf16 = dict(args.train or []).get("bf16", True)
    model, tokenizer = dt.load_model(args.model, dtype=torch.bfloat16 if bf16 else torch.float32,
                                     quantize=args.quantize)
    loaded = time.perf_counter()
    LOAD_PEAK.append(_status("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the training phase
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = build_run_config({
            "model": args.model, "task": "causal-lm", "output_dir": f"{out}/run",
            "quantize": args.quantize,
            "data": {"train": "unused.jsonl", "format": "text", "max_length": args.length},
            "method": {"name": "lora", "r": S.RANK, "alpha": S.ALPHA, "target_modules": S.LORA_TARGETS},
            "train": {"max_steps": args.steps, "batch_size": 1, "lr": S.LR, "schedule": "linear",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": True,
                      "seed": S.SEED, "log_every": 1, "group_by_length": False,
                      "gradient_checkpointing": True, **dict(args.train or [])},
        })
        dt.apply(model, dt.config_from_dict(config.method))
        dataset = [Example(input_ids=row, labels=list(row)) for row in rows]
        train(model, tokenizer, config, train_dataset=dataset,
              on_step=lambda step: ends.append(time.perf_counter()))
        with open(f"{out}/run/metrics.jsonl") as log:
            losses = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    return [loaded, *ends], losses, loaded


def run_peft(args, rows) -> tuple[list[float], list[float], float]:
    import peft
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    if args.quantize != "none":
        raise SystemExit("peft side: a quantized base on CPU is not measured by this script")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=S.RANK, lora_alpha=S.ALPHA, lora_dropout=0.0, target_modules=S.LORA_TARGETS,
        task_type="CAUSAL_LM"))
    loaded = time.perf_counter()
    LOAD_PEAK.append(_status("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here on: the training phase
    ends: list[float] = []
    losses: list[float] = []

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    data = [{"input_ids": row, "labels": list(row), "attention_mask": [1] * len(row)} for row in rows]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=1, learning_rate=S.LR,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=True, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
            report_to=[], seed=S.SEED, dataloader_num_workers=0, disable_tqdm=True,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            remove_unused_columns=False, train_sampling_strategy="sequential")
        Trainer(model=model, args=targs, train_dataset=data, callbacks=[Timing()]).train()
    return [loaded, *ends], losses, loaded


def reduced_model(model: str, layers: int) -> str:
    """MODEL_DIR's shape with `layers` transformer layers, random bf16 weights, its tokenizer
    (built once, by a child process, so this one's RSS never held it)."""
    path = Path(tempfile.gettempdir()) / "deltatune-reduced" / f"{Path(model).name}-{layers}layers"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, __file__, "reduce", model, "--layers", str(layers),
                        "--out", str(path)], check=True)
    return str(path)


def reduce(args) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model)
    config.num_hidden_layers = args.layers
    torch.manual_seed(S.SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = Path(f"{args.out}.partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(tmp)
    tmp.rename(args.out)
    return {"saved": args.out, "layers": args.layers}


def point(args) -> dict:
    watchdog(int(args.cap_gb * 2**30))
    from transformers import AutoConfig

    vocab = min(AutoConfig.from_pretrained(args.model).vocab_size, 49152)  # the saved tokenizer's ids
    rows = token_rows(args.length, args.steps, vocab)
    started = time.perf_counter()
    runner = run_deltatune if args.tool == "deltatune" else run_peft
    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            times, losses, loaded = runner(args, rows)
        profile = profile_table(prof)
    else:
        times, losses, loaded = runner(args, rows)
    steps = [b - a for a, b in zip(times, times[1:])]
    measured = steps[1:] or steps  # the first step warms up (allocator, kernels)
    result = {"tool": args.tool, "length": args.length, "quantize": args.quantize, "steps": args.steps,
              "model": args.model,
              "train_peak_rss_gb": _status("VmHWM") / 2**30,
              "load_peak_rss_gb": LOAD_PEAK[0] / 2**30,
              "overall_peak_rss_gb": S.peak_rss_gb(),
              "step_s": steps, "tokens_per_s": args.length / statistics.mean(measured),
              "losses": losses, "load_s": loaded - started, "threads": torch.get_num_threads(),
              "train": dict(args.train or [])}
    if profile is not None:
        result["profile"] = profile
    return result


def profile_table(prof, rows: int = 15) -> list[dict]:
    """The ops that took the step's time (self CPU time, whole run after loading)."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:rows]]


def _child(args, tool: str, length: int, steps: int, extra: list[str] = ()) -> dict:
    command = [sys.executable, __file__, "point", args.model, "--tool", tool, "--length", str(length),
               "--steps", str(steps), "--quantize", args.quantize, "--cap-gb", str(args.cap_gb), *extra]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 3:
        return {"tool": tool, "length": length, "over_cap": True}
    if done.returncode != 0 or not lines:
        return {"tool": tool, "length": length, "failed": done.stderr.strip().splitlines()[-3:]}
    return json.loads(lines[-1])


def _write(args, name: str, data: dict, path: Path | None = None) -> Path:
    """The raw result (rewritten in place as a sweep goes on: `path` from the first write)."""
    from common.machine import describe, result_path, write_result

    path = path or result_path("memory", name)
    tmp = path.with_name(f".{path.name}.tmp")
    write_result({**data, "machine": describe(), "cap_gb": args.cap_gb, "cpu_flags": _flags()},
                 "memory", name, path=tmp)
    tmp.replace(path)
    return path


def _flags() -> list[str]:
    from common.machine import cpu_flags

    return cpu_flags()


def sweep(args) -> dict:
    points = []
    for length in [int(n) for n in args.lengths.split(",")]:
        tools = args.tools.split(",")
        if len(points) // max(len(tools), 1) % 2:  # alternate which tool goes first
            tools = tools[::-1]
        for tool in tools:
            points.append(_child(args, tool, length, args.steps,
                                 ["--profile"] if args.profile_at == length and tool == "deltatune" else []))
            print(json.dumps(points[-1]), flush=True)
            path = _write(args, args.name, {"command": "sweep", "model": args.model,
                                            "quantize": args.quantize, "points": points},
                          path if points[1:] else None)
    return {"written": str(path), "points": len(points)}


# Each lever alone, against the defaults (checkpointing on, 1,024-row logits chunks, sdpa): the
# `--train` keys each point gets.
LEVERS = {"defaults": [], "mlp_tile_tokens=1024": ["mlp_tile_tokens=1024"],
          "checkpoint_bf16": ["checkpoint_bf16=true"], "loss_chunk_tokens=256": ["loss_chunk_tokens=256"],
          "loss_chunk_tokens=0": ["loss_chunk_tokens=0"], "attention=eager": ['attention="eager"'],
          "no checkpointing": ["gradient_checkpointing=false"]}


def levers(args) -> dict:
    """deltatune alone, one lever at a time, at each length (one process per point, the lever
    order reversed at every other length): peak RSS, tokens/s and the losses (a lever changes no
    loss beyond round-off)."""
    points, path = [], None
    names = [n for n in LEVERS if n in args.levers.split(",")] if args.levers else list(LEVERS)
    for index, length in enumerate(int(n) for n in args.lengths.split(",")):
        for name in names if index % 2 == 0 else names[::-1]:
            extra = ["--train", *LEVERS[name]] if LEVERS[name] else []
            points.append({"lever": name, **_child(args, "deltatune", length, args.steps, extra)})
            print(json.dumps(points[-1]), flush=True)
            path = _write(args, args.name + "-levers", {"command": "levers", "model": args.model,
                                                        "layers": args.layers, "quantize": args.quantize,
                                                        "points": points}, path)
    return {"written": str(path), "points": len(points)}


def longest(args) -> dict:
    """Bisection on the length: the longest that trains one step within the cap."""
    lo, hi, probes = args.lo, args.hi, []
    while hi - lo > max(args.resolution, lo // 16):
        mid = (lo + hi) // 2
        result = _child(args, args.tool, mid, 1)
        probes.append(result)
        print(json.dumps(result), flush=True)
        if result.get("over_cap") or "failed" in result:
            hi = mid
        else:
            lo = mid
    data = {"command": "longest", "tool": args.tool, "model": args.model, "quantize": args.quantize,
            "longest_fitting": lo, "first_over": hi, "probes": probes}
    _write(args, args.name, data)
    return data


def plan(args) -> dict:
    """deltatune's plan for the same work: the peak at each length, the longest within the cap."""
    from deltatune.compare.max_length import length_plans
    from deltatune.config.run import build_run_config

    lengths = [int(n) for n in args.lengths.split(",")]
    config = build_run_config({
        "model": args.model, "task": "causal-lm", "output_dir": "unused", "quantize": args.quantize,
        "data": {"train": "unused.jsonl", "format": "text", "max_length": lengths[0]},
        "method": {"name": "lora", "r": S.RANK, "alpha": S.ALPHA, "target_modules": S.LORA_TARGETS},
        "train": {"batch_size": 1, "bf16": True, "gradient_checkpointing": True, "max_steps": 1,
                  **dict(args.train or [])},
    })
    plans, peaks = length_plans(config, ["lora"], int(args.cap_gb * 2**30), lengths=lengths,
                                dtype=torch.bfloat16)
    data = {"command": "plan", "model": args.model, "quantize": args.quantize,
            "max_length": plans[0].max_length, "limited_by": plans[0].limited_by,
            "peak_gb_at_max_length": plans[0].peak_bytes / 2**30,
            "baseline_gb": plans[0].baseline_bytes / 2**30,
            "peak_gb": {str(n): peaks["lora"][n] / 2**30 for n in lengths}}
    _write(args, args.name + "-plan", data)
    return data


def mfu(args) -> dict:
    """Model-FLOPs utilisation of the points at --length in a sweep's result (`--result`), and of
    a profiled point's JSON line (`--profiled`, its profile table kept): model FLOPs of the step
    (projections, LoRA, attention, the LM head; not checkpointing's recomputation) over the
    second step's time, against this machine's measured bf16 matmul peak."""
    from transformers import AutoConfig

    from common.flops import Shape, example_flops, measured_peak

    shape = Shape.of(AutoConfig.from_pretrained(args.model))
    flops = example_flops(shape, args.length, args.length - 1, "lora", lora_rank=S.RANK,
                          lora_targets=S.LORA_TARGETS)
    peak = measured_peak(True)
    points = [p for p in json.loads(Path(args.result).read_text())["points"] if p.get("length") == args.length]
    if args.profiled:
        points.append({**json.loads(Path(args.profiled).read_text().strip().splitlines()[-1]),
                       "profiled": True})
    rows = [{"tool": p["tool"], "profiled": p.get("profiled", False), "step_s": p["step_s"][-1],
             "model_tflop": flops / 1e12, "mfu": flops / p["step_s"][-1] / (peak["peak_gflops"] * 1e9),
             "profile": p.get("profile")} for p in points]
    data = {"command": "mfu", "model": args.model, "length": args.length, "peak": peak, "rows": rows}
    _write(args, args.name + "-mfu", data)
    return {k: v for k, v in data.items() if k != "rows"} | {"mfu": [(r["tool"], r["mfu"]) for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["point", "sweep", "longest", "plan", "mfu", "reduce", "levers"])
    parser.add_argument("model")
    parser.add_argument("--tool", default="deltatune", choices=TOOLS)
    parser.add_argument("--tools", default="deltatune,peft")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=20.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-at", type=int, default=0, help="sweep: profile deltatune at this length")
    parser.add_argument("--lo", type=int, default=1024)
    parser.add_argument("--hi", type=int, default=16384)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--name", default="long-context-llama1b-lora-bf16")
    parser.add_argument("--train", nargs="*", type=lambda kv: (kv.split("=")[0], json.loads(kv.split("=")[1])),
                        help="deltatune train keys, e.g. mlp_tile_tokens=2048")
    parser.add_argument("--layers", type=int, default=0, help="point, plan, levers: the shape cut to N layers")
    parser.add_argument("--levers", default="", help="levers: which (comma-separated names of LEVERS; default all)")
    parser.add_argument("--out", help="reduce: where the cut model goes")
    parser.add_argument("--result", help="mfu: a sweep's raw result")
    parser.add_argument("--profiled", help="mfu: the JSON line of a `point --profile` run")
    args = parser.parse_args()
    if args.layers and args.command in ("point", "plan", "levers"):
        args.model = reduced_model(args.model, args.layers)
    result = {"reduce": reduce, "point": point, "sweep": sweep, "longest": longest, "plan": plan, "mfu": mfu,
              "levers": levers}[args.command](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
