"""One point of a scaling table, in its own process (so its peak RSS is its own); prints JSON.

    python benchmarks/training/scaling.py seq 1024            # LoRA r8, batch 8 x 1024 tokens
    python benchmarks/training/scaling.py rank 32             # LoRA r32, batch 8 x 512
    python benchmarks/training/scaling.py prompt 64           # prompt tuning, 64 virtual tokens, 8 x 256
    python benchmarks/training/scaling.py prefix 64           # prefix tuning, 64 virtual tokens, 8 x 256

SmolLM2-135M, random token rows of the given length (every row full, so padding plays no part),
loss on every token; deltatune's training step as the trainer runs it: bf16 autocast where `bf16:
auto` picks it (the machine's measured probe), the LM head
and loss chunked, fused AdamW over the trainable parameters. `--steps` steps after one warm-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("axis", choices=("seq", "rank", "prompt", "prefix"))
    parser.add_argument("value", type=int)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=S.BATCH)
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.training.losses import batch_loss, count_targets
    from deltatune.training.optimization import build_optimizer, resolve_bf16
    from deltatune.training.packed_attention import packed_attention

    torch.manual_seed(S.SEED)
    model, _ = dt.load_model(S.MODEL)
    length = {"seq": args.value, "rank": 512}.get(args.axis, 256)
    if args.axis in ("seq", "rank"):
        rank = args.value if args.axis == "rank" else S.RANK
        config = dt.LoraConfig(r=rank, alpha=2 * rank, target_modules=S.LORA_TARGETS)
    elif args.axis == "prompt":
        config = dt.PromptTuningConfig(num_virtual_tokens=args.value)
    else:
        config = dt.PrefixConfig(num_virtual_tokens=args.value)
    dt.apply(model, config)
    optimizer = build_optimizer(model, 1e-4, 0.0)
    model.train()
    ids = torch.randint(100, 40000, (args.batch, length))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    targets = count_targets("causal-lm", batch["labels"])
    bf16 = resolve_bf16("auto", torch.device("cpu"))  # the machine's measured choice
    times, cpu_seconds = [], 0.0
    for step in range(args.steps + 1):
        cpu_tick = time.process_time()
        tick = time.perf_counter()
        with packed_attention(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(model, "causal-lm", batch) / targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - tick)
            cpu_seconds += time.process_time() - cpu_tick
    step = statistics.median(times)
    from flops import Shape, example_flops, measured_peak, mfu

    method = ({"lora_rank": config.r, "lora_targets": S.LORA_TARGETS} if args.axis in ("seq", "rank")
              else {"virtual_tokens": args.value} if args.axis == "prompt" else {"prefix": args.value})
    training = "lora" if args.axis in ("seq", "rank") else "frozen"  # prompt/prefix: input grads only
    step_flops = args.batch * example_flops(Shape.of(model.config), length, length - 1, training, **method)
    peak = measured_peak(bf16)
    print(json.dumps({"mfu": mfu(step_flops, step, peak["peak_gflops"]),
                      "model_gflops": step_flops / step / 1e9, **peak,"axis": args.axis, "value": args.value, "batch": args.batch,
                      "seq": length, "step_s": step, "tokens_per_s": ids.numel() / step,
                      "peak_rss_gb": S.peak_rss_gb(), "threads": torch.get_num_threads(),
                      # about 1 when the step had the cores to itself (see sft_run.py)
                      "cpu_utilization": cpu_seconds / (sum(times) * torch.get_num_threads())}))


if __name__ == "__main__":
    main()
