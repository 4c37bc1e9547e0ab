"""LoftQ vs the plain LoRA init on SmolLM2's nf4 base, beside dense LoRA: the loss before training
and after the QLoRA bench's steps (`make bench`'s `qlora.py train smollm2-135m`: 14 steps, batch
8 x 512, LoRA r=8 alpha 16 on the seven projections, lr 2e-4, bf16 autocast, seed 0).

Rows: dense LoRA (default init), nf4 + default init, nf4 + init loftq (loftq_iter 1, and with
--iterations N also loftq_iter N). Per row, one process-local run:
  start_loss   model + fresh adapter, forward only, on the rows of the run's last 5 steps (the
               rows nf4_gap.py measures the base on: the start the adapter gives)
  last5_loss   mean training loss of the last 5 of the 14 steps (what qlora.py reports)

    python benchmarks/quality/loftq_init.py [--iterations 5] [--steps 14] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine, sft_setup as S  # noqa: I001
import torch


def start_loss(model, tokenizer, dataset, steps: int) -> float:
    from deltatune.training.batching import training_collator
    from deltatune.training.losses import batch_loss, count_targets

    collate = training_collator(model, tokenizer.pad_token_id, "causal-lm", S.data_config(S.MAX_LENGTH),
                                SimpleNamespace(padding_free=True))
    rows = S.row_order(len(dataset), steps, S.BATCH)
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in range(steps - 5, steps):
            batch = collate([dataset[i] for i in rows[k * S.BATCH:(k + 1) * S.BATCH]])
            losses.append(batch_loss(model, "causal-lm", batch).item()
                          / count_targets("causal-lm", batch["labels"]))
    return statistics.mean(losses)


def run_row(quantize: str, init: str, iterations: int, steps: int) -> dict:
    import deltatune as dt
    from deltatune.config.run import build_run_config
    from deltatune.training.loop import train as train_loop

    torch.manual_seed(S.SEED)
    model, tokenizer = dt.load_model(S.MODEL, quantize=quantize)
    dataset = S.load_examples(tokenizer, S.MAX_LENGTH)
    method = {"name": "lora", "r": S.RANK, "alpha": S.ALPHA, "target_modules": S.LORA_TARGETS,
              "init": init, "loftq_iter": iterations}
    started = time.perf_counter()
    dt.apply(model, dt.config_from_dict(method))
    init_s = time.perf_counter() - started
    before = start_loss(model, tokenizer, dataset, steps)
    with tempfile.TemporaryDirectory() as out:
        config = build_run_config({
            "model": S.MODEL, "task": "causal-lm", "output_dir": f"{out}/run", "quantize": quantize,
            "data": {"train": str(S.DATA), "format": "alpaca", "max_length": S.MAX_LENGTH},
            "method": method,
            "train": {"max_steps": steps, "batch_size": S.BATCH, "lr": S.LR, "schedule": "linear",
                      "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": True,
                      "seed": S.SEED, "log_every": 1, "group_by_length": False, "save_every": None},
        })
        train_loop(model, tokenizer, config, train_dataset=dataset)
        with open(f"{out}/run/metrics.jsonl") as log:
            losses = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    return {"quantize": quantize, "init": init, "loftq_iter": iterations, "init_s": init_s,
            "start_loss": before, "losses": losses, "last5_loss": statistics.mean(losses[-5:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=None, help="also a loftq row with this loftq_iter")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = [("dense-lora", "none", "default", 1), ("nf4-lora", "nf4", "default", 1),
            ("nf4-loftq-it1", "nf4", "loftq", 1)]
    if args.iterations:
        rows.append((f"nf4-loftq-it{args.iterations}", "nf4", "loftq", args.iterations))
    results: dict = {}
    for name, quantize, init, iterations in rows:
        results[name] = run_row(quantize, init, iterations, args.steps)
        print(name, {k: v for k, v in results[name].items() if k != "losses"}, flush=True)
    dense = results["dense-lora"]
    for row in results.values():
        row["start_vs_dense"] = row["start_loss"] / dense["start_loss"] - 1
        row["last5_vs_dense"] = row["last5_loss"] / dense["last5_loss"] - 1
    results["settings"] = {"steps": args.steps, "batch": S.BATCH, "max_length": S.MAX_LENGTH,
                           "rank": S.RANK, "alpha": S.ALPHA, "lr": S.LR, "precision": "bf16 autocast"}
    print(json.dumps(results, indent=1))
    machine.write_result(results, "quality", "loftq-init", args.json)


if __name__ == "__main__":
    main()
