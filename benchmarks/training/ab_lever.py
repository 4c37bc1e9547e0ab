"""One speed lever of the LoRA SFT step, on and off, in one process, taking turns.

    python benchmarks/training/ab_lever.py LEVER [--batches 4] [--rounds 3]
    LEVER: attention | explicit_backward | lora_input | lora_scale | compile   (see LEVERS below)

The step is the SFT benchmark's (common/sft_setup.py: SmolLM2-135M, LoRA r8 on every projection, packed
rows of 8 alpaca examples, per-example attention, chunked loss, bf16 autocast, frozen weights in
bf16): forward + backward on each of the first `--batches` batches, `off` then `on`, round after
round (the first pass warms up and is not counted), so machine noise hits both alike. No optimizer
step: the weights never change, so both variants see the same numbers and their losses must
agree to bf16 rounding. Printed: median seconds per batch, real tokens/s, the ratio, the losses.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch


def _old_attention(on: bool) -> None:
    """off: the per-example loop through SDPA with autograd over every slice;
    on: one autograd node per layer over the same flash kernels (flash backward everywhere)."""
    from deltatune.training import packed_attention as pa

    pa._CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16) if on else ()
    pa.EXPLICIT_BACKWARD_TOKENS = 0


def _explicit_backward(on: bool) -> None:
    """on: short examples' attention backward recomputed with batched products (off: flash's)."""
    from deltatune.training import packed_attention as pa

    pa.EXPLICIT_BACKWARD_TOKENS = 224 if on else 0


def _lora_input(on: bool) -> None:
    from deltatune.methods import lora

    lora.CAST_INPUT_ONCE = on


def _lora_scale(on: bool) -> None:
    from deltatune.methods import lora

    lora.SCALE_AT_RANK = on


def _compile(on: bool) -> None:
    from deltatune.training import compiled

    compiled.ENABLED = on


LEVERS = {"attention": _old_attention, "explicit_backward": _explicit_backward, "lora_input": _lora_input, "lora_scale": _lora_scale,
          "compile": _compile}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lever", choices=sorted(LEVERS))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.training.losses import batch_loss, count_targets
    from deltatune.training.packed_attention import packed_attention
    from deltatune.training.speed import hold_frozen_weights_in_bf16

    model, tokenizer, dataset, batches = S.packed_batches(args.batches)
    model = dt.apply(model, S.lora_config())
    hold_frozen_weights_in_bf16(model)
    model.train()
    stack = contextlib.ExitStack()  # held to the end: a dropped context manager would exit
    if args.lever == "compile":
        from deltatune.training.compiled import compiled_elementwise

        stack.enter_context(compiled_elementwise(model))
    toggle = LEVERS[args.lever]
    times = {False: [], True: []}
    cpu = {False: [], True: []}  # process CPU seconds: less sensitive to neighbours on the cores
    losses = {False: [], True: []}
    first = {}
    for round_index in range(args.rounds + 1):
        for on in (False, True):
            toggle(on)
            for batch in batches:
                tick, cpu_tick = time.perf_counter(), time.process_time()
                with packed_attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = batch_loss(model, "causal-lm", batch) / count_targets("causal-lm", batch["labels"])
                loss.backward()
                model.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - tick
                if round_index:
                    times[on].append(seconds)
                    cpu[on].append(time.process_time() - cpu_tick)
                    losses[on].append(float(loss.detach()))
                else:
                    first.setdefault(on, 0.0)
                    first[on] += seconds
    tokens = sum(int(b["input_ids"].numel()) for b in batches) / len(batches)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"lever {args.lever}: {args.batches} batches x {args.rounds} rounds, {tokens:.0f} tokens "
          f"a batch, {torch.get_num_threads()} threads, load {load}, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    threads = torch.get_num_threads()
    for on in (False, True):
        step = statistics.median(times[on])
        print(f"  {'on ' if on else 'off'}  median {step:6.3f} s  {tokens / step:6.0f} tok/s  CPU "
              f"{statistics.median(cpu[on]):6.3f} s ({statistics.median(cpu[on]) / step / threads:.2f} "
              f"of the cores)  warm-up round {first[on]:7.1f} s  mean loss {statistics.mean(losses[on]):.6f}")
    print(f"  on/off speed ratio {statistics.median(times[False]) / statistics.median(times[True]):.3f} "
          f"(wall), {statistics.median(cpu[False]) / statistics.median(cpu[True]):.3f} (CPU seconds)")


if __name__ == "__main__":
    main()
