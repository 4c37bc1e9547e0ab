"""Train-step time of every method at its defaults, as a ratio to LoRA's, on one model.

    python benchmarks/training/method_step_time.py --model minilm --methods lora,oft,boft,...
    python benchmarks/training/method_step_time.py --model smollm2-135m --seq 128 --batch 16

Every method gets its own copy of the same pretrained model, wrapped at the method's defaults
(`dt.config_from_dict({"name": m})`), its own AdamW, and the same random batches. The copies take
turns step by step in one process, so whatever else loads the machine hits them alike; the ratio
to LoRA is the median over rounds of (this method's step / LoRA's step in the same round), which
keeps a burst of load that lasts a few rounds out of the ratio even when it moves the medians. A step is the trainer's: the loss through
`training.losses.batch_loss` (chunked for decoders) under bf16 autocast when the CPU has native
bf16, the method's own loss term and after-step hook (AdaLoRA), backward, AdamW. Medians over
the steps after the warm-up are written, with the machine, to
benchmarks/results/training/<date>-method-step-time-<model>-<cpu kind>.json.
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
from deltatune.deltas import after_optimizer_step, training_loss_term
from deltatune.hardware import bf16_auto
from deltatune.methods import default_lr_for
from deltatune.training.losses import batch_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402

METHODS = "lora,oft,boft,loha,lokr,vera,adalora,ln-tuning,bitfit"


def random_batch(model, task: str, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator) if task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Variant:
    """One method on its own copy of the model, stepping like the trainer does."""

    def __init__(self, base, method: str, total_steps: int):
        config = dt.config_from_dict({"name": method})
        self.model = dt.apply(copy.deepcopy(base), config)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=default_lr_for(config))
        self.trainable = sum(p.numel() for p in self.params)
        self.total_steps, self.step_count, self.times = total_steps, 0, []

    def step(self, task: str, batch: dict, bf16: bool) -> float:
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(self.model, task, batch, head_owner=self.model)
        if (extra := training_loss_term(self.model)) is not None:
            loss = loss + extra
        loss.backward()
        self.optimizer.step()
        self.step_count += 1
        after_optimizer_step(self.model, self.step_count, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - tick


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="a preset: minilm (classification) or a decoder")
    parser.add_argument("--methods", default=METHODS, help="comma-separated; lora is added as the reference")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method, after the warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 autocast where the CPU has native bf16, as train.bf16: auto")
    args = parser.parse_args(argv)
    task = "classification" if args.model == "minilm" else "causal-lm"
    methods = list(dict.fromkeys(["lora", *args.methods.split(",")]))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_auto(torch.device("cpu")))
    torch.manual_seed(0)
    base, _ = dt.load_model(args.model, task=task, num_labels=2 if task == "classification" else None)
    total = args.warmup + args.steps
    variants = {}
    for method in methods:
        try:
            variants[method] = Variant(base, method, total)
        except dt.DeltatuneError as error:  # e.g. bitfit on a model without biases
            print(f"{method}: not measured: {error}")
    batches = [random_batch(base, task, args.batch, args.seq, seed) for seed in range(total)]
    for i, batch in enumerate(batches):
        for name, variant in variants.items():  # alternate: noise hits every method alike
            seconds = variant.step(task, batch, bf16)
            if i >= args.warmup:
                variant.times.append(seconds)
    reference = variants["lora"].times
    rows = []
    for name, variant in variants.items():
        median = statistics.median(variant.times)
        ratio = statistics.median(t / r for t, r in zip(variant.times, reference))
        rows.append({"method": name, "trainable_params": variant.trainable, "median_step_s": round(median, 4),
                     "vs_lora": round(ratio, 3), "step_times_s": [round(t, 4) for t in variant.times]})
        print(f"{name:10s} {variant.trainable:>11,d} params  {median:7.3f} s/step  {ratio:5.2f}x LoRA")
    machine.write_result({
        "machine": machine.describe(), "cpu_flags": machine.cpu_flags(),
        "precision": "bf16 autocast" if bf16 else "fp32", "model": args.model, "task": task,
        "batch": args.batch, "seq": args.seq, "warmup": args.warmup,
        "command": "python benchmarks/training/method_step_time.py " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }, "training", f"method-step-time-{args.model}")


if __name__ == "__main__":
    main()
