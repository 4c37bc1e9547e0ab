"""Where one LoRA SFT step's time goes: torch.profiler over the trainer's own step.

    python benchmarks/training/profile_step.py [--batch 0] [--fp32] [--frozen-fp32] [--compile] [--top 25]

The step is the SFT benchmark's (common/sft_setup.py: SmolLM2-135M, LoRA r8 on every projection, one
packed row of 8 alpaca examples, per-example attention, chunked loss, fused AdamW), under bf16
autocast with frozen weights in bf16 unless told otherwise. One warm-up step, then one profiled
step. Printed: the step's wall time, the self-CPU time of each operator (top N) and the shares
of the groups that matter for MFU: matrix products, attention, casts and copies, the rest.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch

GROUPS = {  # operator -> group (self CPU time: a parent's children are not double counted)
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                        "mkldnn", "onednn"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "PerExampleFlash"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone",
                         "aten::contiguous", "aten::cat", "aten::index", "aten::empty_strided"),
    "optimizer": ("_fused_adamw", "adamw", "Optimizer"),
}


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS.items():
        if any(key.lower() in lowered for key in keys):
            return group
    return "everything else (norms, rotary, SiLU, adds, loss, autograd)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=0, help="which batch of the benchmark")
    parser.add_argument("--fp32", action="store_true", help="no autocast")
    parser.add_argument("--frozen-fp32", action="store_true", help="frozen weights stay fp32")
    parser.add_argument("--compile", action="store_true", help="train.compile: compiled norms, SwiGLU, rotary")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.data.dataset import Collator
    from deltatune.training.losses import batch_loss, count_targets
    from deltatune.training.optimization import build_optimizer
    from deltatune.training.packed_attention import packed_attention
    from deltatune.training.speed import hold_frozen_weights_in_bf16

    torch.manual_seed(S.SEED)
    model, tokenizer = dt.load_model(S.MODEL)
    dataset = S.load_examples(tokenizer)
    order = S.row_order(len(dataset), args.batch + 1)
    rows = [dataset[i] for i in order[args.batch * S.BATCH:(args.batch + 1) * S.BATCH]]
    batch = Collator(tokenizer.pad_token_id, packing=True, max_length=10**9)(rows)
    model = dt.apply(model, S.lora_config())
    if not args.fp32 and not args.frozen_fp32:
        hold_frozen_weights_in_bf16(model)
    optimizer = build_optimizer(model, S.LR, 0.0)
    model.train()
    if args.compile:
        import contextlib

        from deltatune.training.compiled import compiled_elementwise

        stack = contextlib.ExitStack()  # held to the end of main
        stack.enter_context(compiled_elementwise(model))

    def step() -> float:
        with packed_attention(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = batch_loss(model, "causal-lm", batch) / count_targets("causal-lm", batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up
    tick = time.perf_counter()
    step()
    plain = time.perf_counter() - tick
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        tick = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - tick
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    tokens = int(batch["input_ids"].numel())
    print(f"one step, {tokens} tokens in one packed row, {'fp32' if args.fp32 else 'bf16 autocast'}"
          f"{', frozen weights fp32' if args.frozen_fp32 and not args.fp32 else ''}, "
          f"{torch.get_num_threads()} threads: {plain:.2f} s wall "
          f"({seconds:.2f} s under the profiler), loss {loss:.4f}")
    groups = defaultdict(float)
    for event in events:
        groups[group_of(event.key)] += event.self_cpu_time_total
    for group, value in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {group:60s} {value / 1e6:7.2f} s  {100 * value / total:5.1f}%")
    # The matrix products split by kind: a base projection's product, the LoRA side paths'
    # rank-r products (memory-bound: a full activation read for 8 outputs), the LM head.
    kinds = defaultdict(lambda: [0.0, 0, 0.0])  # kind -> [seconds, calls, FLOPs]
    for event in prof.key_averages(group_by_input_shape=True):
        shapes = event.input_shapes
        if event.key != "aten::mm" or len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
            continue
        (m, k), (_, n) = shapes[0], shapes[1]
        rank = min(m, k, n)
        kind = ("LM head" if max(m, k, n) >= 32000 else
                f"rank-{S.RANK} LoRA side paths" if rank <= 64 else "base projections")
        kinds[kind][0] += event.self_cpu_time_total / 1e6
        kinds[kind][1] += event.count
        kinds[kind][2] += 2 * m * k * n * event.count
    print("aten::mm by kind:")
    for kind, (sec, calls, flops) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kind:30s} {calls:5d} calls  {sec:6.3f} s  {flops / 1e9:7.1f} GFLOP  "
              f"{flops / max(sec, 1e-9) / 1e9:8,.0f} GFLOP/s")
    print(f"top {args.top} operators by self CPU time:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {event.key:45s} {event.count:6d} calls  {event.self_cpu_time_total / 1e6:7.3f} s  "
              f"{100 * event.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()
