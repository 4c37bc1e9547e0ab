"""Training step time of LoRA vs DoRA vs (IA)³ vs prefix tuning (plain and LSTM), side by side.

    python benchmarks/training/dora_step_time.py [--rounds 6] [--steps 4]

MiniLM (the `minilm` preset) on SST-2 batches of 32 rows x up to 64 tokens, as the MiniLM
comparison trains: forward, loss, backward, AdamW step. Every variant holds its own copy of the
model and optimizer; they take turns, `--steps` steps each per round, so load from other work
falls on all alike. Prints the CPU flags, the medians, and each variant's ratio to LoRA's step,
as one JSON line at the end. DoRA's extra cost is the row norms of W + s·B·A of every adapted
layer, recomputed each step (and the rescaling of the base output).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2" / "train.jsonl"


def cpu_flags() -> str:
    out = subprocess.run("grep -o -w 'avx512_bf16\\|amx_tile\\|avx2' /proc/cpuinfo | sort -u",
                         shell=True, capture_output=True, text=True).stdout
    return " ".join(out.split())


def batches(tokenizer, count: int, rows: int = 32) -> list[dict]:
    lines = DATA.read_text().splitlines()[: count * rows]
    records = [json.loads(line) for line in lines]
    out = []
    for i in range(count):
        chunk = records[i * rows:(i + 1) * rows]
        encoded = tokenizer([r["text"] for r in chunk], padding=True, truncation=True,
                            max_length=64, return_tensors="pt")
        encoded["labels"] = torch.tensor([int(r["label"]) for r in chunk])
        out.append(dict(encoded))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import deltatune as dt

    torch.manual_seed(0)
    base, tokenizer = dt.load_model("minilm", task="classification", num_labels=2)
    configs = {
        "lora": dt.LoraConfig(r=8),                       # all-linear, the method's default
        "dora": dt.LoraConfig(r=8, use_dora=True),
        "ia3": dt.IA3Config(),
        "prefix": dt.PrefixConfig(),
        "prefix-lstm": dt.PrefixConfig(projection="lstm"),
    }
    lrs = {"lora": 1e-3, "dora": 1e-3, "ia3": 3e-3, "prefix": 3e-2, "prefix-lstm": 1e-3}
    runs = {}
    for name, config in configs.items():
        model = dt.apply(copy.deepcopy(base), config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs[name])
        runs[name] = (model, optimizer)
    data = batches(tokenizer, args.steps)

    def step(model, optimizer, batch) -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_use: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # the first pass warms up
        for name, (model, optimizer) in runs.items():
            for batch in data:
                wall, cpu = time.perf_counter(), time.process_time()
                step(model, optimizer, batch)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if round_index:
                    times[name].append(wall)
                    cpu_use[name].append(cpu / (wall * torch.get_num_threads()))
        if round_index:  # progress, so a run cut short still says something
            print(f"round {round_index}: " + ", ".join(
                f"{n} {statistics.median(t):.3f}s" for n, t in times.items()), flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
        "steps_per_variant": len(times["lora"]), "batch": "32 x <=64 tokens (SST-2, padded per batch)",
        "median_step_s": {k: round(v, 4) for k, v in medians.items()},
        "ratio_to_lora": {k: round(v / medians["lora"], 3) for k, v in medians.items()},
        "cpu_use": {k: round(statistics.median(v), 2) for k, v in cpu_use.items()},
        "trainable": {k: dt.count_parameters(m)[0] for k, (m, _) in runs.items()},
    }
    for name in runs:
        print(f"{name:12s} median step {medians[name]:.4f} s  x{medians[name] / medians['lora']:.3f} "
              f"of LoRA  (CPU use {result['cpu_use'][name]})", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
