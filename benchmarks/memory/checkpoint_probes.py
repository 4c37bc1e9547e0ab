"""What a gradient-checkpointed step keeps: short one-step memory probes of real model widths
beside `deltatune plan`'s prediction for each (the `--max-length auto` curve, one row, batch 1).

    python benchmarks/memory/checkpoint_probes.py measure MODEL_DIR --layers 2 --lengths 1024,2048,4096
                                 [--train loss_chunk_tokens=256] [--train bf16=false] >> probes.jsonl
    python benchmarks/memory/checkpoint_probes.py plan probes.jsonl [--sweep SWEEP.json]
                                 [--name checkpoint-probes-lora-bf16]

`measure` runs `long_context.py point` (LoRA r=8 on the seven projections, bf16, checkpointing
on, one step, --layers N: MODEL_DIR's shape cut to N layers) once per length, each in its own
process, and prints its JSON line. `plan` loads each probed model once, computes plan's one-step
peak at each probed length (compare/max_length.py's curve, as `plan --max-length auto` does) and
writes the raw result: every probe's measured and planned peak, the model's shape, and plan's
measured baseline (what tests/test_plan_checkpointing.py recomputes from the shape alone).
`--sweep`: a `long_context.py sweep` result whose deltatune rows are planned the same way.
Run the probes one at a time with OMP_NUM_THREADS=1: peak RSS does not depend on CPU contention.
`--train bf16=false` probes fp32 weights without autocast: the precision deltatune trains at on a
CPU without native bf16, where one bf16 product runs hundreds of times slower than in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S  # noqa: E402  (sets HF_HUB_OFFLINE, puts src/ on the path)
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "model_type")


def measure(args) -> None:
    extra = ["--train", *args.train] if args.train else []
    for length in [int(n) for n in args.lengths.split(",")]:
        command = [sys.executable, str(HERE / "long_context.py"), "point", args.model, "--length",
                   str(length), "--steps", "1", "--layers", str(args.layers), "--cap-gb", "20", *extra]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"length": length, "failed": done.stderr[-300:]}),
              flush=True)


def run_config(model: str, train: dict, length: int):
    from deltatune.config.run import build_run_config

    return build_run_config({
        "model": model, "task": "causal-lm", "output_dir": "unused",
        "data": {"train": "unused.jsonl", "format": "text", "max_length": length},
        "method": {"name": "lora", "r": S.RANK, "alpha": S.ALPHA, "target_modules": S.LORA_TARGETS},
        "train": {"batch_size": 1, "bf16": True, "gradient_checkpointing": True, "max_steps": 1, **train},
    })


def planned(model_dir: str, train: dict, lengths: list[int]) -> dict:
    """plan's one-step peak at each length, its measured baseline, the model's shape."""
    from deltatune.compare.max_length import peak_curve
    from deltatune.compare.plan import current_rss, touch_weights
    from deltatune.models import load_model, release_freed_memory
    from deltatune.training import loop as _train  # noqa: F401  (as length_plans: the baseline counts it)

    process = before = current_rss()
    model, tokenizer = load_model(model_dir, task="causal-lm",
                                  dtype=torch.bfloat16 if train.get("bf16", True) else torch.float32)
    touch_weights(model)
    baseline = process + max(0, current_rss() - before)
    config = run_config(model_dir, train, max(lengths))
    values = {"name": "lora", **{k: v for k, v in config.method.items() if k != "name"}}
    curve, _ = peak_curve(model, values, config, config.train, baseline, tokenizer.pad_token_id)
    shape = {k: getattr(model.config, k, None) for k in SHAPE_KEYS}
    peaks = {n: curve(n) for n in lengths}
    del model, curve
    release_freed_memory()
    return {"baseline_bytes": baseline, "shape": shape, "planned_bytes": peaks}


def precision(rows: list[dict]) -> str:
    kinds = {"bf16 weights, bf16 autocast" if r["train"].get("bf16", True) else "fp32" for r in rows}
    return " and ".join(sorted(kinds))


def plan(args) -> dict:
    from common.machine import cpu_flags, describe, write_result

    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for path in args.points:
        for line in Path(path).read_text().splitlines():
            if line.startswith("{") and "train_peak_rss_gb" in (point := json.loads(line)):
                key = (point["model"], json.dumps(point.get("train", {}), sort_keys=True))
                groups.setdefault(key, {})[point["length"]] = {"steps": point["steps"], **point}
    if args.sweep:
        sweep = json.loads(Path(args.sweep).read_text())
        for point in sweep["points"]:
            if point.get("tool") == "deltatune" and "train_peak_rss_gb" in point:
                key = (sweep["model"], json.dumps(point.get("train", {}), sort_keys=True))
                groups.setdefault(key, {})[point["length"]] = {**point, "sweep": args.sweep}
    rows = []
    for (model_dir, train), points in sorted(groups.items()):
        # each model planned in a fresh process: its baseline is that of a process that has
        # loaded nothing else (as `deltatune plan` is)
        done = subprocess.run([sys.executable, __file__, "plan-one", model_dir, "--train-json", train,
                               "--lengths", ",".join(map(str, sorted(points)))],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["planned_bytes"] = {int(k): v for k, v in result["planned_bytes"].items()}
        for length, point in sorted(points.items()):
            measured = point["train_peak_rss_gb"] * 2**30
            predicted = result["planned_bytes"][length]
            rows.append({"model": model_dir, "shape": result["shape"], "train": json.loads(train),
                         "length": length, "steps": point["steps"], "measured_bytes": int(measured),
                         "planned_bytes": int(predicted), "error": predicted / measured - 1,
                         "baseline_bytes": result["baseline_bytes"], "from": point.get("sweep", "point")})
            print(json.dumps({k: rows[-1][k] for k in ("model", "length", "error")}), flush=True)
    data = {"command": "plan", "method": "lora", "rank": S.RANK, "alpha": S.ALPHA,
            "targets": S.LORA_TARGETS, "precision": precision(rows),
            "threads": 1, "rows": rows, "machine": describe(), "cpu_flags": cpu_flags()}
    path = write_result(data, "memory", args.name)
    return {"written": str(path), "rows": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["measure", "plan", "plan-one"])
    parser.add_argument("model_or_points", nargs="+")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--train", nargs="*", default=[])
    parser.add_argument("--sweep", help="plan: a long_context.py sweep result to plan too")
    parser.add_argument("--name", default="checkpoint-probes-lora-bf16")
    parser.add_argument("--train-json", default="{}", help="plan-one: the probes' train keys")
    args = parser.parse_args()
    if args.command == "plan-one":  # one model's plan, in this (fresh) process
        lengths = [int(n) for n in args.lengths.split(",")]
        print(json.dumps(planned(args.model_or_points[0], json.loads(args.train_json), lengths)))
    elif args.command == "measure":
        args.model = args.model_or_points[0]
        measure(args)
    else:
        args.points = args.model_or_points
        print(json.dumps(plan(args)))


if __name__ == "__main__":
    main()
