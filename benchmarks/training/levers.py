"""Each speed lever of a LoRA SFT step measured on its own, in one process, variants taking turns.

    python benchmarks/training/levers.py [--batches 3] [--rounds 2]

Same model, LoRA and batches for every variant (the first batches of the SFT benchmark, see
common/sft_setup.py); each variant runs forward + backward + fused AdamW on each batch, round after round,
so machine noise hits them alike. Reported: median step time, real (non-padding) tokens/s and
the step loss (identical batches => the losses must agree).
"""
from __future__ import annotations

import argparse
import contextlib
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
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.data.dataset import Collator
    from deltatune.training.losses import batch_loss, count_targets
    from deltatune.training.optimization import build_optimizer
    from deltatune.training.packed_attention import packed_attention

    torch.manual_seed(S.SEED)
    base, tokenizer = dt.load_model(S.MODEL)
    dataset = S.load_examples(tokenizer)
    examples = S.step_examples(dataset, args.batches)
    padded = [Collator(tokenizer.pad_token_id)(b) for b in examples]
    packed = [Collator(tokenizer.pad_token_id, packing=True, max_length=10**9)(b) for b in examples]
    import peft

    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=S.RANK, lora_alpha=S.ALPHA, lora_dropout=0.0, target_modules=S.LORA_TARGETS,
        task_type="CAUSAL_LM")).train()
    peft_start = copy.deepcopy({k: v for k, v in peft_model.state_dict().items() if "lora_" in k})
    peft_optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                       lr=S.LR, fused=True)
    model = dt.apply(base, S.lora_config())
    start_state = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" in k})
    optimizer = build_optimizer(model, S.LR, 0.0)
    model.train()
    from deltatune.training.speed import hold_frozen_weights_in_bf16

    lean = copy.deepcopy(model)  # the same model with its frozen weights stored in bf16
    hold_frozen_weights_in_bf16(lean)
    lean_optimizer = build_optimizer(lean, S.LR, 0.0)

    def peft_step(batch):  # peft's LoRA layers, transformers' loss over full logits
        return peft_model(**batch).loss

    def hf_logits_loss(batch):  # what peft + HF Trainer compute: full logits, mean over targets
        return model(**batch).loss

    def chunked(batch):
        return batch_loss(model, "causal-lm", batch) / count_targets("causal-lm", batch["labels"])

    def per_example(batch):
        with packed_attention(model):
            return chunked(batch)

    def per_example_lean(batch):
        with packed_attention(lean):
            return batch_loss(lean, "causal-lm", batch) / count_targets("causal-lm", batch["labels"])

    owners = {peft_step: (peft_model, peft_optimizer, peft_start),
              per_example_lean: (lean, lean_optimizer, start_state)}
    variants = {  # name: (batches, loss function, bf16 autocast)
        "peft LoRA, padded, full-logits loss": (padded, peft_step, True),
        "padded, full-logits loss (HF)": (padded, hf_logits_loss, True),
        "padded, chunked loss": (padded, chunked, True),
        "one packed row, dense block mask": (packed, chunked, True),
        "one packed row, per-example attention": (packed, per_example, True),
        "one packed row, per-example, fp32": (packed, per_example, False),
        "one packed row, per-example, frozen bf16": (packed, per_example_lean, True),
    }
    times = {name: [] for name in variants}
    losses = {name: [] for name in variants}
    for round_index in range(args.rounds + 1):  # the first pass warms up
        for name, (batches, loss_fn, bf16) in variants.items():
            for k, batch in enumerate(batches):
                owner, opt, start = owners.get(loss_fn, (model, optimizer, start_state))
                owner.load_state_dict(start, strict=False)
                tick = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - tick
                if round_index:
                    times[name].append(seconds)
                    losses[name].append(float(loss.detach()))
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    width = sum(b["input_ids"].numel() for b in padded)
    print(f"SmolLM2-135M LoRA r{S.RANK} all-linear, {args.batches} batches of {S.BATCH} alpaca rows "
          f"({real} real tokens, {width} padded), {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    from flops import Shape, batch_flops, measured_peak, mfu

    work = sum(batch_flops(Shape.of(base.config), b, "lora", lora_rank=S.RANK,
                           lora_targets=S.LORA_TARGETS) for b in examples) / args.batches
    peaks = {bf16: measured_peak(bf16) for bf16 in (True, False)}
    print(f"  model FLOPs per step {work / 1e9:.1f} GFLOP (benchmarks/common/flops.py); measured peak "
          f"bf16 {peaks[True]['peak_gflops']:,.0f} / fp32 {peaks[False]['peak_gflops']:,.0f} GFLOP/s "
          f"(flags: {' '.join(peaks[True]['cpu_flags'])})")
    reference = statistics.median(times["peft LoRA, padded, full-logits loss"])
    print("  (x: speed relative to the peft variant; MFU against the peak at the variant's precision)")
    for name, (_, _, bf16) in variants.items():
        step = statistics.median(times[name])
        print(f"  {name:40s} step {step:6.2f} s   {real / args.batches / step:6.0f} real tok/s   "
              f"x{reference / step:4.2f}   MFU {100 * mfu(work, step, peaks[bf16]['peak_gflops']):5.1f}%   "
              f"mean loss {statistics.mean(losses[name]):.4f}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
