"""LoRA on a dense base vs QLoRA (nf4 base) on the same SFT work, one run per process.

    python benchmarks/memory/qlora.py make-llama1b DIR             # random Llama-3.2-1B-shaped model, saved once
    python benchmarks/memory/qlora.py make-llama3b DIR             # the same in Llama-3.2-3B's shape
    python benchmarks/memory/qlora.py make-llama8b DIR             # Llama-3.1-8B's shape, written shard by shard
    python benchmarks/memory/qlora.py save-quantized MODEL --quantize nf4 --dtype bf16 --out DIR
                                           # the base as users keep it: saved quantized, reloaded as is
    python benchmarks/memory/qlora.py train MODEL --quantize nf4 [--dtype bf16] [--steps 14] [--batch 8]
                                           [--max-length 512] [--method lora|full]
    python benchmarks/memory/qlora.py plan  MODEL (same options) [--in-place]   # deltatune's plan for that run
    python benchmarks/memory/qlora.py base-loss MODEL --quantize nf4 --steps 14
                                           # the untrained base's loss on each step's rows

MODEL is `smollm2-135m` or a saved directory. The work is common/sft_setup.py's (alpaca demo rows, chat
template, loss on responses, LoRA r=8 on all seven projections, bf16 autocast, lr 2e-4); only the
batch, length and step count change for the bigger model. Each command prints one JSON line:
peak RSS from VmHWM (the process's own high-water mark, loading included), real tokens/s over the
steps after the warmup, mean loss of the last 5 steps; or the plan's predicted peak.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch

# Llama-3.2-3B's published shape (3.21B parameters, 28 layers, tied 128k x 3072 embedding)
LLAMA_1B_SHAPE = S.LLAMA_1B_SHAPE
LLAMA_3B_SHAPE = dict(LLAMA_1B_SHAPE, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, head_dim=128)
# Llama-3.1-8B's published shape (8.03B parameters, 32 layers, untied 128k x 4096 embedding and head)
LLAMA_8B_SHAPE = dict(LLAMA_1B_SHAPE, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
SHAPES = {"make-llama1b": LLAMA_1B_SHAPE, "make-llama3b": LLAMA_3B_SHAPE, "make-llama8b": LLAMA_8B_SHAPE}
STREAMED = {"make-llama8b"}  # written tensor by tensor: the 16 GB model is never whole in memory


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_llama(directory: str, shape: dict) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(S.SEED)
    model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(directory)
    # SmolLM2's tokenizer: its 49,152 ids all exist in the 128,256-row embedding
    AutoTokenizer.from_pretrained(S.model_path()).save_pretrained(directory)
    print(json.dumps({"saved": directory, "params": sum(p.numel() for p in model.parameters())}))


def write_llama_shards(directory: str, shape: dict, shard_bytes: int = 2 * 2**30) -> None:
    """A random bf16 model of `shape` written shard by shard (safetensors + index), with the same
    initialisation transformers gives a fresh Llama (weights N(0, 0.02), norms 1): a model too big
    to build whole in memory on this machine."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(S.SEED)
    names = [(n, p.shape) for n, p in skeleton.named_parameters()]  # a tied head is listed once
    weight_map, shard, size, total, files = {}, {}, 0, 0, []

    def flush():
        nonlocal shard, size
        if shard:
            files.append((f"model-{len(files) + 1:05d}.safetensors", shard))
            save_file(shard, out / files[-1][0], metadata={"format": "pt"})
            weight_map.update({name: files[-1][0] for name in shard})
            shard, size = {}, 0

    for name, tensor_shape in names:
        tensor = torch.empty(tensor_shape, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            for rows in torch.split(torch.arange(tensor_shape[0]), 4096):  # fp32 scratch stays small
                tensor[rows[0]:rows[-1] + 1] = torch.randn((len(rows), *tensor_shape[1:]), generator=generator) * 0.02
        nbytes = tensor.numel() * 2
        if size + nbytes > shard_bytes:
            flush()
        shard[name], size, total = tensor, size + nbytes, total + nbytes
    flush()
    final = {f"model-{k + 1:05d}-of-{len(files):05d}.safetensors": name for k, (name, _) in enumerate(files)}
    for new_name, old_name in final.items():
        (out / old_name).rename(out / new_name)
    renamed = {old: new for new, old in final.items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(S.model_path()).save_pretrained(out)
    print(json.dumps({"saved": directory, "params": sum(p.numel() for p in skeleton.parameters()),
                      "safetensors_gb": total / 2**30}))


def save_quantized(args) -> dict:
    model, tokenizer = load(args)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    files = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    return {"saved": args.out, "safetensors_gb": files / 2**30}


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_config(args, out: str):
    from deltatune.config.run import build_run_config

    method = ({"name": "full"} if args.method == "full" else
              {"name": "lora", "r": S.RANK, "alpha": S.ALPHA, "target_modules": S.LORA_TARGETS})
    return build_run_config({
        "model": args.model, "task": "causal-lm", "output_dir": f"{out}/run", "quantize": args.quantize,
        "data": {"train": str(S.DATA), "format": "alpaca", "max_length": args.max_length},
        "method": method,
        "train": {"max_steps": args.steps, "batch_size": args.batch, "lr": S.LR, "schedule": "linear",
                  "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "bf16": True,
                  "seed": S.SEED, "log_every": 1, "group_by_length": False, "save_every": None},
    })


def load(args):
    import deltatune as dt

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return dt.load_model(args.model, dtype=dtype, quantize=args.quantize)


def train(args) -> dict:
    import deltatune as dt
    from deltatune.training.loop import train as train_loop
    from deltatune.training.optimization import BatchStream

    model, tokenizer = load(args)
    load_peak, after_load = vm_hwm_bytes(), rss_bytes()
    # Linux: writing 5 to clear_refs resets VmHWM, so the training phase's own peak is measured
    # too (loading a checkpoint maps the whole file: its pages count while quantizing it)
    Path("/proc/self/clear_refs").write_text("5")
    dataset = S.load_examples(tokenizer, args.max_length)
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = run_config(args, out)
        dt.apply(model, dt.config_from_dict(config.method))
        started = time.perf_counter()
        train_loop(model, tokenizer, config, train_dataset=dataset,
                   on_step=lambda step: ends.append(time.perf_counter()))
        with open(f"{out}/run/metrics.jsonl") as log:
            losses = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    stream = BatchStream(len(dataset), args.batch, S.SEED)
    step_tokens = [sum(len(dataset[i].input_ids) for i in stream.rows(k))
                   for k in range(args.warmup, args.steps)]
    step_times = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])]
    train_peak = vm_hwm_bytes()
    return {"load_peak_rss_gb": load_peak / 2**30, "rss_after_load_gb": after_load / 2**30,
            "train_peak_rss_gb": train_peak / 2**30,
            "overall_peak_rss_gb": max(load_peak, train_peak) / 2**30,
            "real_tokens_per_s": sum(step_tokens) / sum(step_times),
            "step_s_median": statistics.median(step_times), "losses": losses,
            "last5_loss": statistics.mean(losses[-5:]), "wall_s": time.perf_counter() - started}


def base_loss(args) -> dict:
    """The base model's own loss (no delta, no training) on the rows of each of the run's steps,
    under the trainer's autocast: how much of a loss gap the quantization brings before training."""
    from types import SimpleNamespace

    from deltatune.training.batching import training_collator
    from deltatune.training.losses import batch_loss, count_targets

    model, tokenizer = load(args)
    dataset = S.load_examples(tokenizer, args.max_length)
    collate = training_collator(model, tokenizer.pad_token_id, "causal-lm", S.data_config(args.max_length),
                                SimpleNamespace(padding_free=True))
    rows = S.row_order(len(dataset), args.steps, args.batch)
    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for k in range(args.steps):
            batch = collate([dataset[i] for i in rows[k * args.batch:(k + 1) * args.batch]])
            losses.append(batch_loss(model, "causal-lm", batch).item() / count_targets("causal-lm", batch["labels"]))
    return {"base_losses": losses, "base_last5_loss": statistics.mean(losses[-5:])}


def mem_available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def plan(args) -> dict:
    from deltatune.compare.plan import current_rss, plan_method, predicted_base_bytes, touch_weights

    if args.method == "full" and mem_available_bytes() < 16 * 2**30:
        # planning full FT copies the fp32 model once more (~2x its 5 GB): not on a shared machine
        # short of memory
        return {"skipped": f"only {mem_available_bytes() / 2**30:.1f} GB available"}
    model, tokenizer = load(args)
    if args.in_place:
        # plan_method adapts a deep copy so the caller's model stays as it was; this process drops
        # the model after planning, so the copy (16 GB for the 8B shape's dense base) is skipped
        import copy

        deepcopy = copy.deepcopy
        copy.deepcopy = lambda value, memo=None: value if value is model else deepcopy(value, memo)
    touch_weights(model)  # as plan_methods: the trainer touches every page of the weights
    baseline = current_rss()
    dataset = S.load_examples(tokenizer, args.max_length)
    with tempfile.TemporaryDirectory() as out:
        config = run_config(args, out)
        p = plan_method(model, config.method, dataset, tokenizer.pad_token_id, config, config.train, baseline)
    return {"predicted_peak_gb": p.predicted_peak_bytes / 2**30, "baseline_gb": baseline / 2**30,
            "activation_gb": p.activation_bytes / 2**30, "allocator_fill": p.allocator_fill,
            "logit_gb": p.logit_bytes / 2**30,
            "base_weight_gb": predicted_base_bytes(model) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=[*SHAPES, "save-quantized", "train", "plan", "base-loss"])
    parser.add_argument("model")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=S.BATCH)
    parser.add_argument("--max-length", type=int, default=S.MAX_LENGTH)
    parser.add_argument("--out", help="save-quantized: the directory to write")
    parser.add_argument("--in-place", action="store_true",
                        help="plan: adapt the loaded model itself, not a copy (a base too big to copy here)")
    args = parser.parse_args()
    if args.command in STREAMED:
        return write_llama_shards(args.model, SHAPES[args.command])
    if args.command in SHAPES:
        return make_llama(args.model, SHAPES[args.command])
    result = {"train": train, "plan": plan, "save-quantized": save_quantized,
              "base-loss": base_loss}[args.command](args)
    result.update(command=args.command, model=args.model, quantize=args.quantize, dtype=args.dtype,
                  method=args.method, batch=args.batch, max_length=args.max_length, steps=args.steps,
                  threads=torch.get_num_threads(), peak_rss_gb=vm_hwm_bytes() / 2**30)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
