"""The LoRA SFT comparison on a GPU, with a random model of Llama-3.2-1B's shape.

    pip install -r benchmarks/requirements.txt      # TRL, for the third column
    python benchmarks/gpu/gpu_lora_sft.py [--steps 20] [--warmup 3] [--repeats 2] [--tools ...]

Same work as the CPU benchmark (common/sft_setup.py: the alpaca rows tokenized by SmolLM2's tokenizer,
whose ids are valid in the bigger vocabulary; loss on responses; LoRA r8 on the seven projections;
batch 8; max length 512; bf16 autocast over fp32 weights; same rows in the same order), but on
the model shape users fine-tune on GPUs (1.24B parameters, random weights: speed and memory do
not depend on the values). Each run is its own process (`sft_run.py --llama-1b-shape`), tools
alternated; real tokens/s, step time and peak GPU memory (torch.cuda.max_memory_allocated) are
printed and written to benchmarks/results/gpu/<date>-gpu-lora-sft-<gpu>.md. About 6 minutes on one H100/H200-class GPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: the common package
from common import machine  # noqa: E402
NAMES = {"deltatune": "deltatune LoRA", "peft-trainer": "peft + HF Trainer (dynamic padding)",
         "trl": "TRL SFTTrainer (padding_free)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tools", default=",".join(NAMES))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("no GPU visible: this script measures the GPU comparison (see run.py for the CPU one)")
    device = torch.cuda.get_device_name(0)
    results: dict[str, list[dict]] = {}
    commands = []
    for _ in range(args.repeats):
        for tool in args.tools.split(","):
            cmd = [sys.executable, str(HERE.parent / "training" / "sft_run.py"), tool, "--llama-1b-shape",
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            commands.append(" ".join(["python", "benchmarks/training/sft_run.py", *cmd[3:]]))
            print("[gpu]", commands[-1], flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parents[1])
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                continue
            results.setdefault(tool, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
            print("[gpu]  ", {k: results[tool][-1][k] for k in
                              ("real_tokens_per_s", "step_s_median", "peak_memory_gb", "last_loss_mean")},
                  flush=True)
    lines = ["# GPU results: LoRA SFT, random model of Llama-3.2-1B's shape", "",
             f"{device}; {time.strftime('%Y-%m-%d %H:%M')}; {args.steps} steps per run, first "
             f"{args.warmup} not measured; {args.repeats} runs per tool alternated; medians.", "",
             "| tool | real tokens/s | step median (s) | peak GPU memory (GB) | mean loss, last 5 |",
             "|---|---|---|---|---|"]
    summary = {}
    for tool, runs in results.items():
        summary[tool] = {k: statistics.median(r[k] for r in runs)
                         for k in ("real_tokens_per_s", "step_s_median", "peak_memory_gb", "last_loss_mean")}
        s = summary[tool]
        lines.append(f"| {NAMES[tool]} | {s['real_tokens_per_s']:.0f} | {s['step_s_median']:.3f} | "
                     f"{s['peak_memory_gb']:.2f} | {s['last_loss_mean']:.4f} |")
    if "deltatune" in summary:
        for peer in ("peft-trainer", "trl"):
            if peer in summary:
                ours, theirs = summary["deltatune"], summary[peer]
                lines.append(f"\ndeltatune vs {NAMES[peer]}: "
                             f"{ours['real_tokens_per_s'] / theirs['real_tokens_per_s']:.2f}x tokens/s, "
                             f"{ours['peak_memory_gb'] / theirs['peak_memory_gb']:.2f}x peak memory.")
    lines += ["", "```", *commands, "```", ""]
    out = machine.result_path("gpu", "gpu-lora-sft", kind=machine.gpu_kind(device), suffix=".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
