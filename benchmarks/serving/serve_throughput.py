"""Throughput of `deltatune serve` with many LoRA adapters in one batch vs one adapter.

Starts the real server (uvicorn on 127.0.0.1, a free port) on a base model carrying 4 LoRA
adapters, then sends the same concurrent load through the official openai client three ways:

    mixed     requests spread round-robin over the 4 adapters (batched via mixed_adapters)
    single    every request for adapter 0 (batched, one adapter: the plain LoRA forward)
    unbatched every request for adapter 0, the engine limited to one request per generate()

Each request generates exactly --max-tokens tokens (ignore_eos), greedy. Scenarios alternate
over --repeats rounds and the median is reported, since timings on a shared CPU wander.

    python benchmarks/serving/serve_throughput.py [--json PATH]

The result goes to benchmarks/results/serving/<date>-serve-throughput-<cpu kind>.json unless --json
names a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402
import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.serving.app import build_app  # noqa: E402
from deltatune.serving.server import ServerThread  # noqa: E402

PROMPTS = [
    "Write a short note about the history of the printing press and why it mattered.",
    "List three reasons why people enjoy hiking in the mountains during the summer.",
    "Explain in simple words how a refrigerator keeps food cold.",
    "Give me a friendly reminder to drink water and take a short walk today.",
]


def add_adapters(model, count: int, rank: int, seed: int) -> list[str]:
    """`count` LoRA adapters with small random weights (so each one changes the outputs)."""
    generator = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        name = f"adapter{i}"
        dt.apply(model, dt.LoraConfig(r=rank, alpha=2 * rank,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), name)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        names.append(name)
    return names


def run_load(client, models: list[str], requests: int, max_tokens: int) -> dict:
    def one(i: int):
        return client.completions.create(model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)],
                                         max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True})

    start = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    tokens = sum(r.usage.completion_tokens for r in results)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def generate_only(model, names: list[str], rows: int, tokens: int, repeats: int) -> dict:
    """The same comparison without HTTP: one generate() of `rows` rows, mixed vs one adapter."""
    from transformers import GenerationConfig

    vocab = model.config.vocab_size
    ids = torch.randint(vocab // 10, vocab, (rows, 24), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=0, eos_token_id=[])
    times: dict[str, list[float]] = {"mixed": [], "single": []}
    for _ in range(repeats):
        for scenario in times:  # alternate, so drifting load hits both alike
            if scenario == "mixed":
                context = dt.mixed_adapters(model, [names[i % len(names)] for i in range(rows)])
            else:
                dt.set_adapter(model, names[0])
                context = torch.inference_mode()
            start = time.perf_counter()
            with torch.inference_mode(), context:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
            times[scenario].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"rows": rows, "tokens": tokens, "seconds": times, "median_seconds": median,
            "mixed_over_single_speed": median["single"] / median["mixed"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is steadier when other jobs share the CPU)")
    parser.add_argument("--json", default=None, help="default: benchmarks/results/serving/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import openai

    model, tokenizer = dt.load_model(args.model)
    names = add_adapters(model, args.adapters, args.rank, seed=0)
    direct = generate_only(model, names, args.max_batch, args.max_tokens, args.repeats)
    print(f"generate() alone, {args.max_batch} rows x {args.max_tokens} tokens: mixed "
          f"{direct['median_seconds']['mixed']:.2f} s, single {direct['median_seconds']['single']:.2f} s "
          f"(mixed speed / single speed = {direct['mixed_over_single_speed']:.2f})", flush=True)
    app = build_app(model, tokenizer, base_name=args.model, max_batch=args.max_batch,
                    batch_wait_ms=args.batch_wait_ms, engine="static")
    engine = app.state.engine
    server = ServerThread(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    scenarios = {"mixed": (names, args.max_batch), "single": (names[:1], args.max_batch),
                 "unbatched": (names[:1], 1)}
    results: dict[str, list[dict]] = {name: [] for name in scenarios}
    try:
        run_load(client, names, len(names), 4)  # warm-up: every adapter once
        order = list(scenarios)
        for round_ in range(args.repeats):
            # rotate the order every round so that drifting CPU load hits every scenario alike
            for scenario in order[round_ % len(order):] + order[:round_ % len(order)]:
                models, max_batch = scenarios[scenario]
                engine.max_batch = max_batch
                batches_before, busy_before = engine.batches_run, engine.generate_seconds
                result = run_load(client, models, args.requests, args.max_tokens)
                while engine.busy or engine.queue_depth():  # replies leave before generate() ends
                    time.sleep(0.01)
                result["batches"] = engine.batches_run - batches_before
                result["generate_seconds"] = engine.generate_seconds - busy_before
                results[scenario].append(result)
                print(f"round {round_ + 1} {scenario:>9}: {result['tokens_per_s']:7.1f} tokens/s "
                      f"({result['tokens']} tokens in {result['seconds']:.1f} s, "
                      f"{result['batches']} batches, {result['generate_seconds']:.1f} s in generate)",
                      flush=True)
    finally:
        server.stop()
    median = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in results.items()}
    summary = {
        "model": args.model, "adapters": args.adapters, "rank": args.rank,
        "requests": args.requests, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
        "torch_threads": torch.get_num_threads(), "median_tokens_per_s": median,
        "mixed_over_single": median["mixed"] / median["single"],
        "single_over_unbatched": median["single"] / median["unbatched"],
        "generate_only": direct,
        "runs": results,
    }
    print(f"median tokens/s: mixed {median['mixed']:.1f}, single {median['single']:.1f}, "
          f"unbatched {median['unbatched']:.1f}")
    print(f"mixed / single = {summary['mixed_over_single']:.2f}; "
          f"single batched / unbatched = {summary['single_over_unbatched']:.2f}")
    machine.write_result(dict(summary, cpu_flags=machine.cpu_flags(), args=vars(args)), "serving",
                         "serve-throughput", args.json)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
