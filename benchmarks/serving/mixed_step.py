"""One decoding step of a 32-row batch: one adapter vs every row mixed over 4 or 8 LoRA adapters.

The mixed step runs each LoRA layer's update as one product for all rows (methods/lora_rows.py);
"per-adapter loop" forces the older path (one product per adapter present, rows gathered and
copied back) for comparison. Rounds alternate the variants; the median step of each is reported.

    python benchmarks/serving/mixed_step.py [--rows 14] [--json PATH]

The result goes to benchmarks/results/serving/<date>-mixed-step-<cpu kind>.json unless --json names a file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402
import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.methods import lora_rows  # noqa: E402
from deltatune.serving import kvcache  # noqa: E402
from deltatune.serving.scheduler import adapters_for  # noqa: E402


def decode_steps(model, names: list[str], prompt: int, steps: int) -> list[float]:
    """Seconds of each decoding step after a prefill of `prompt` tokens per row."""
    rows = len(names)
    ids = torch.randint(10, 10000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, prompt, dtype=torch.long)
    cache = kvcache.new_cache(model)
    times = []
    with torch.inference_mode():
        with adapters_for(model, names):
            out = model(input_ids=ids, attention_mask=mask, position_ids=kvcache.positions(mask, prompt),
                        cache=cache, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            with adapters_for(model, names):  # entered every step, as the engine does
                out = model(input_ids=token, attention_mask=mask, position_ids=kvcache.positions(mask, 1),
                            cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    flags = machine.cpu_flags()
    print(f"cpu flags: {' '.join(flags)}; torch threads {torch.get_num_threads()}", flush=True)
    model, _ = dt.load_model(args.model, task="causal-lm")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    for i in range(8):
        dt.apply(model, dt.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]), f"a{i}")
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.03)
    dt.set_adapter(model, "a0")  # "one adapter" is the active one: the plain single-adapter path
    variants = {
        "one adapter": (["a0"] * args.rows, False),
        "mixed over 4": ([f"a{i % 4}" for i in range(args.rows)], False),
        "mixed over 8": ([f"a{i % 8}" for i in range(args.rows)], False),
        "mixed over 8, per-adapter loop": ([f"a{i % 8}" for i in range(args.rows)], True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (names, loop) in variants.items():
            with mock.patch.object(lora_rows, "bank_of", lambda layer: None) if loop else contextlib.nullcontext():
                times[name] += decode_steps(model, names, args.prompt, args.steps)
    base = statistics.median(times["one adapter"])
    result = {"cpu_flags": flags, "args": vars(args), "median_step_ms": {}, "over_one_adapter": {}}
    for name, values in times.items():
        median = statistics.median(values)
        result["median_step_ms"][name] = median * 1000
        result["over_one_adapter"][name] = median / base
        print(f"{name:>32}: {median * 1000:7.1f} ms per step ({median / base:.2f}x one adapter)", flush=True)
    machine.write_result(result, "serving", "mixed-step", args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
