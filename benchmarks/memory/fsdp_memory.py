"""SmolLM2-135M full fine-tuning: one process vs FSDP over 2 vs DDP over 2 (CPU, gloo), and the
plan's per-process prediction for each.

    python benchmarks/memory/fsdp_memory.py [--steps 6] [--rows 48]

Same rows, same global batch (4 x <=128 tokens, padding-free), fp32, AdamW. Reports each
process's peak RSS (VmHWM, summary.json's peak_memory_bytes_by_rank), the whole job's tokens/s,
and `deltatune plan --world-size N --distributed MODE` beside it. "one-malloc" is the single
process again with the allocator setting CPU fsdp processes use (glibc's mmap threshold fixed at
128 KiB, training/sharding.py): the ratio to it is what sharding alone buys. About 6-8 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the common package
sys.path.insert(0, str(ROOT / "src"))
from common import machine  # noqa: E402
from deltatune.training.sharding import MMAP_THRESHOLD_BYTES  # noqa: E402
DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.jsonl"


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text()
    return " ".join(sorted({f for f in ("avx512_bf16", "amx_tile", "avx2") if f" {f}" in text}))


def plan_mb(config: Path, procs: int, mode: str, env: dict) -> float:
    """`deltatune plan --world-size procs --distributed mode`'s peak for full fine-tuning."""
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "plan", str(config), "--methods", "full",
                          "--world-size", str(procs), "--distributed", mode], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return float(next(line for line in out.splitlines() if line.startswith("full ")).split()[-2])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/memory/")
    parser.add_argument("--model", default="smollm2-135m", help="a preset or directory (tests: tiny)")
    parser.add_argument("--runs", default="one,fsdp,ddp,one-malloc")
    parser.add_argument("--no-plan", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    config = work / "full.yaml"
    config.write_text(yaml.safe_dump({
        "model": args.model, "task": "causal-lm", "output_dir": str(work / "unused"),
        "method": {"name": "full"},
        "data": {"train": str(DATA), "format": "alpaca", "max_length": 128,
                 "max_train_rows": args.rows},
        "train": {"batch_size": 4, "max_steps": args.steps, "lr": 2e-5, "bf16": False,
                  "log_every": 1, "seed": 0, "warmup_ratio": 0.0}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    # "one-malloc": the single process with the allocator setting fsdp runs use on CPU
    # (training/sharding.py), so the ratio to it is what sharding alone buys.
    malloc = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    runs = [r for r in [("one process", 1, "ddp", {}), ("fsdp x2", 2, "fsdp", {}),
                        ("ddp x2", 2, "ddp", {}), ("one-malloc process", 1, "ddp", malloc)]
            if r[0].split()[0] in args.runs.split(",")]
    results = []
    for name, procs, mode, extra in runs:
        out = work / name.replace(" ", "-")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable])
        # one thread per process in every run (torchrun's default), so the work per core matches
        tick = time.time()
        subprocess.run([*launcher, "-m", "deltatune.cli", "train", str(config), f"output_dir={out}",
                        f"train.distributed={mode}"], env={**env, **extra, "OMP_NUM_THREADS": "1"},
                       check=True, cwd=ROOT)
        summary = json.loads((out / "summary.json").read_text())
        peaks = summary.get("peak_memory_bytes_by_rank") or [summary["peak_memory_bytes"]]
        key = (procs, mode if procs > 1 else None)  # a rerun of a planned shape: same plan
        same = [r["plan_mb"] for r in results if (r["processes"], r["mode"]) == key]
        predicted_mb = 0.0 if args.no_plan else same[0] if same else plan_mb(config, procs, mode, env)
        results.append({"run": name, "processes": procs, "mode": mode if procs > 1 else None,
                        "malloc_env": extra, "load_average": os.getloadavg(),
                        "peak_rss_mb_by_rank": [round(p / 2**20) for p in peaks],
                        "plan_mb": predicted_mb,
                        "tokens_per_s": summary["tokens_per_s"], "wall_s": round(time.time() - tick, 1),
                        "final_loss": summary["final_eval"].get("loss") if summary["final_eval"] else None})
        print(json.dumps(results[-1]), flush=True)
    single = max(results[0]["peak_rss_mb_by_rank"])
    tuned = next((max(r["peak_rss_mb_by_rank"]) for r in results if r["malloc_env"]), None)
    print(f"\nCPU flags: {cpu_flags()}; {args.steps} steps, global batch 4 x <=128 tokens, fp32; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| run | peak RSS per process (MB) | vs one process | vs one-malloc | plan (MB) | plan error "
          "| tokens/s (job) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        peak = max(r["peak_rss_mb_by_rank"])
        print(f"| {r['run']} | {' / '.join(map(str, r['peak_rss_mb_by_rank']))} | {peak / single:.2f}x | "
              f"{f'{peak / tuned:.2f}x' if tuned else '-'} | {r['plan_mb']:.0f} | "
              f"{100 * (r['plan_mb'] - peak) / peak:+.0f}% | {r['tokens_per_s']:.0f} |")
    machine.write_result({"cpu_flags": cpu_flags(), "steps": args.steps, "results": results},
                         "memory", "fsdp-memory", args.out)


if __name__ == "__main__":
    main()
