"""Train-step time of LoRA vs full fine-tuning (and peft's LoRA) on MiniLM, side by side.

    python benchmarks/training/step_time.py [--steps 8] [--batch 32] [--seq 64] [--json PATH]

All variants live in one process and take turns step by step, so machine noise hits them
alike; the medians and their ratios are printed and written to
benchmarks/results/training/<date>-step-time-<cpu kind>.json (or --json PATH).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import deltatune as dt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402


def make_variants():
    base, _ = dt.load_model("minilm", task="classification", num_labels=2)
    variants = {
        "deltatune lora r8 q,v": dt.apply(copy.deepcopy(base), dt.LoraConfig(r=8, alpha=16)),
        "deltatune full": dt.apply(copy.deepcopy(base), dt.FullConfig()),
    }
    try:
        import peft
        variants["peft lora r8 q,v"] = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    except ImportError:
        pass
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--json", default=None, help="default: benchmarks/results/training/")
    args = parser.parse_args()
    torch.manual_seed(0)
    variants = make_variants()
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, m in variants.items()}
    ids = torch.randint(1000, 20000, (args.batch, args.seq))
    labels = torch.randint(0, 2, (args.batch,))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(args.steps + 1):  # step 0 is a warm-up
        for name, model in variants.items():
            model.train()
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    full = medians["deltatune full"]
    print(f"MiniLM-L6, batch {args.batch} x {args.seq}, fwd+bwd+AdamW, {args.steps} steps each, "
          f"{torch.get_num_threads()} threads")
    for name, median in medians.items():
        print(f"  {name:24s} median {median:.3f} s   ratio to full {median / full:.2f}")
    machine.write_result({"cpu_flags": machine.cpu_flags(), "precision": "fp32", "args": vars(args),
                          "threads": torch.get_num_threads(), "median_step_s": medians,
                          "ratio_to_full": {k: v / full for k, v in medians.items()}},
                         "training", "step-time", args.json)


if __name__ == "__main__":
    main()
