"""generate() latency of the base model vs the same model with a LoRA delta, side by side.

    python benchmarks/serving/generate_latency.py [--rounds 5] [--new-tokens 64]

SmolLM2-135M, LoRA r8 on all seven projections with non-zero B (a trained-looking delta), one
chat-templated alpaca prompt, greedy decoding of exactly --new-tokens tokens (EOS ignored), batch 1.
Variants: the base; LoRA merged with deltatune.merge (wrappers kept, so unmerge/switching still
work); merge_and_unload (plain transformers modules again); LoRA unmerged (the delta computed on
every call). They take turns, round after round; the medians and ratios to the base are printed
as one JSON line.
"""
from __future__ import annotations

import argparse
import copy
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import deltatune as dt
    from deltatune.serving.generate import prompt_ids

    torch.manual_seed(S.SEED)
    base, tokenizer = dt.load_model(S.MODEL)
    lora = dt.apply(copy.deepcopy(base), S.lora_config())
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    merged = dt.merge(copy.deepcopy(lora))
    unloaded = dt.merge_and_unload(copy.deepcopy(lora))
    variants = {"base": base, "lora merged": merged, "lora merge_and_unload": unloaded,
                "lora unmerged": lora}
    ids = prompt_ids(tokenizer, "Give three tips for staying healthy.")  # (1, prompt)
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for round_index in range(args.rounds + 1):  # the first pass warms up
        for name, model in variants.items():
            model.eval()
            with torch.no_grad():
                tick = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
                seconds = time.perf_counter() - tick
            assert out.shape[1] == ids.shape[1] + args.new_tokens
            outputs[name] = out
            if round_index:
                times[name].append(seconds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    from flops import Shape, generate_flops, measured_peak, mfu

    # The base model's FLOPs for every variant: an unmerged delta's side paths are overhead.
    work = generate_flops(Shape.of(base.config), ids.shape[1], args.new_tokens)
    peak = measured_peak(False)  # generate() runs in fp32 here
    print(json.dumps({
        "model_gflop": work / 1e9, **peak,
        "mfu": {name: mfu(work, m, peak["peak_gflops"]) for name, m in medians.items()},
        "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "median_s": medians,
        "ratio_to_base": {name: m / medians["base"] for name, m in medians.items()},
        # merged weights are the unmerged model's: the greedy tokens must agree
        "merged_tokens_equal_unmerged": bool(torch.equal(outputs["lora merged"],
                                                          outputs["lora unmerged"])),
    }))


if __name__ == "__main__":
    main()
