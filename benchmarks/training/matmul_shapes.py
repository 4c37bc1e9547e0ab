"""The matmul rate at the model's own shapes: the ceiling a training step can reach on this CPU.

    python benchmarks/training/matmul_shapes.py [--tokens 1650,4096] [--precisions bf16,fp32] [--rounds 3]

`deltatune inspect --hardware` measures the peak on square products up to 2048². SmolLM2-135M's
products are thin (hidden 576): a packed SFT batch of 8 alpaca rows is ~1,650 tokens, so a
forward projection is [1650 x 576] @ [576 x 1536]. This times, in one process and interleaved,
every product a LoRA SFT token needs (benchmarks/common/flops.py: each layer's seven projections
forward and input gradient, the tied LM head forward and input gradient in chunks of 1,024
labelled rows), plus the 2048² square for reference. The FLOP-weighted rate of that mix is the
model-shape ceiling: what a step would reach if it did nothing but its matrix products.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SQUARE = 2048
HEAD_ROWS = 1024  # deltatune.training.losses.CHUNK_ROWS
WINDOW_S = 0.05


def rate(a: torch.Tensor, weight: torch.Tensor, dgrad: bool) -> float:
    """GFLOP/s of a forward product a @ weightᵀ (F.linear, weight [out, in]) or of the input
    gradient a @ weight (a = the output gradient), as autograd computes them."""
    flops = 2 * a.shape[0] * weight.shape[0] * weight.shape[1]
    run = (lambda: torch.mm(a, weight)) if dgrad else (lambda: F.linear(a, weight))
    run()  # warm-up: packing, kernel choice
    count, start = 0, time.perf_counter()
    while True:
        run()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= WINDOW_S and count >= 3:
            return flops * count / elapsed / 1e9


def products(shape, tokens: int) -> dict[str, tuple[tuple[int, int], tuple[int, int], float]]:
    """name: (input shape, weight [out, in], FLOPs of this product per token in the mix)."""
    found = {}
    for name, (i, o) in shape.projections().items():
        weight = 2 * i * o * shape.layers
        found[f"{name} fwd"] = ((tokens, i), (o, i), weight)
        found[f"{name} dgrad"] = ((tokens, o), (o, i), weight)
    head = 2 * shape.hidden * shape.vocab * 0.75  # ~75% of positions carry a label
    found["lm_head fwd"] = ((HEAD_ROWS, shape.hidden), (shape.vocab, shape.hidden), head)
    found["lm_head dgrad"] = ((HEAD_ROWS, shape.vocab), (shape.vocab, shape.hidden), head)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1650,4096")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
    from common import sft_setup as S
    from flops import Shape
    from transformers import AutoConfig

    shape = Shape.of(AutoConfig.from_pretrained(S.model_path()))
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    precisions = args.precisions.split(",")
    points = {}  # (precision, tokens, name) -> (a, b, weight in the mix)
    torch.manual_seed(0)
    for precision in precisions:
        dtype = dtypes[precision]
        square = torch.randn(SQUARE, SQUARE).to(dtype)
        points[(precision, 0, f"square {SQUARE}")] = (square, square.clone(), 0.0, False)
        for tokens in map(int, args.tokens.split(",")):
            for name, (a, b, weight) in products(shape, tokens).items():
                points[(precision, tokens, name)] = (torch.randn(*a).to(dtype), torch.randn(*b).to(dtype),
                                                     weight, name.endswith("dgrad"))
    rates = {key: [] for key in points}
    with torch.no_grad():
        for _ in range(args.rounds):  # interleaved: a neighbour's load hits every point alike
            for key, (a, b, _, dgrad) in points.items():
                rates[key].append(rate(a, b, dgrad))
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.rounds} "
          f"interleaved rounds; GFLOP/s")
    for precision in precisions:
        print(f"{precision}: {SQUARE}² square {statistics.median(rates[(precision, 0, f'square {SQUARE}')]):,.0f}")
        for tokens in map(int, args.tokens.split(",")):
            seconds = flops = 0.0
            for (p, t, name), (a, b, weight, dgrad) in points.items():
                if p != precision or t != tokens:
                    continue
                value = statistics.median(rates[(p, t, name)])
                seconds += weight / (value * 1e9)
                flops += weight
                right = f"[{b.shape[0]} x {b.shape[1]}]" if dgrad else f"[{b.shape[1]} x {b.shape[0]}]"
                product = f"[{a.shape[0]} x {a.shape[1]}] @ {right}"
                print(f"  {tokens:5d} tokens  {name:15s} {product:30s} {value:8,.0f}")
            print(f"  {tokens:5d} tokens  model-shape ceiling (FLOP-weighted mix of a LoRA token's "
                  f"products): {flops / seconds / 1e9:,.0f} GFLOP/s")


if __name__ == "__main__":
    main()
