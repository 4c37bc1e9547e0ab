"""Where a LoRA step's time goes next to full fine-tuning, in one process, variants taking turns.

    python benchmarks/training/lora_vs_full.py [--batches 3] [--rounds 2] [--fp32]

The first batches of the SFT benchmark (common/sft_setup.py) as deltatune trains them (one padding-free
row, per-example attention, chunked loss, bf16 autocast unless --fp32, fused AdamW). Variants: full
fine-tuning; LoRA r8 on all seven projections; the frozen model with nothing to train but the
gradient still flowing to the input (the floor a LoRA step can reach: its forward and its
input-gradient backward). Each step is split into forward, backward and optimizer time.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.training.losses import batch_loss, count_targets
    from deltatune.training.optimization import build_optimizer
    from deltatune.training.packed_attention import packed_attention

    base, tokenizer, dataset, batches = S.packed_batches(args.batches)

    full = dt.apply(copy.deepcopy(base), dt.FullConfig())
    lora = dt.apply(copy.deepcopy(base), S.lora_config())
    frozen = copy.deepcopy(base).requires_grad_(False)
    frozen.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    variants = {"full fine-tuning": full, "LoRA r8 all-linear": lora, "frozen (input grad only)": frozen}
    optimizers = {name: build_optimizer(m, S.LR, 0.0) if any(p.requires_grad for p in m.parameters())
                  else None for name, m in variants.items()}
    parts = {name: {"forward": [], "backward": [], "optimizer": [], "step": []} for name in variants}
    for round_index in range(args.rounds + 1):  # the first pass warms up
        for name, model in variants.items():
            model.train()
            for batch in batches:
                t0 = time.perf_counter()
                with packed_attention(model), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                  enabled=not args.fp32):
                    loss = batch_loss(model, "causal-lm", batch) / count_targets("causal-lm", batch["labels"])
                t1 = time.perf_counter()
                with packed_attention(model):
                    loss.backward()
                t2 = time.perf_counter()
                if optimizers[name] is not None:
                    optimizers[name].step()
                    optimizers[name].zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                if round_index:
                    for key, value in (("forward", t1 - t0), ("backward", t2 - t1),
                                       ("optimizer", t3 - t2), ("step", t3 - t0)):
                        parts[name][key].append(value)
    tokens = sum(b["input_ids"].numel() for b in batches) / len(batches)
    print(f"SmolLM2-135M, {args.batches} padding-free batches of {S.BATCH} alpaca rows "
          f"(~{tokens:.0f} tokens each), {'fp32' if args.fp32 else 'bf16 autocast'}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    reference = statistics.median(parts["full fine-tuning"]["step"])
    for name, p in parts.items():
        m = {k: statistics.median(v) for k, v in p.items()}
        print(f"  {name:26s} step {m['step']:6.2f} s (x{m['step'] / reference:4.2f} of full)  "
              f"forward {m['forward']:5.2f}  backward {m['backward']:5.2f}  optimizer {m['optimizer']:5.2f}")


if __name__ == "__main__":
    main()
