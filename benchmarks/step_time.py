"""Train-step time of LoRA vs full fine-tuning (and peft's LoRA) on MiniLM, side by side.

    python benchmarks/step_time.py [--steps 8] [--batch 32] [--seq 64]

All variants live in one process and take turns step by step, so machine noise hits them
alike; the medians and their ratios are printed (and appended to benchmarks/RESULTS-steps.md
with --write).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import deltatune as dt


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


if __name__ == "__main__":
    main()
