"""One LoRA SFT run of one tool, in this process; prints one JSON line of measurements.

    python benchmarks/training/sft_run.py deltatune|peft-trainer|trl|deltatune-full [--steps 14] [--warmup 2]
                                 [--max-length 512] [--rank 8]

The work is common/sft_setup.py's. Step times are the intervals between consecutive ends of optimizer
steps (data loading, logging and everything else a step costs included); the first `--warmup`
steps are not measured. Real tokens are the non-padding tokens of the step's examples, counted
from the examples themselves, so every tool is credited alike. Peak RSS is the process's
(model loading included, as for every tool).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import sft_setup as S
import torch

TOOLS = ("deltatune", "peft-trainer", "trl", "deltatune-full", "deltatune-frozen-fp32")
LLAMA_1B_SHAPE = S.LLAMA_1B_SHAPE
RANDOM_1B = False  # set by --llama-1b-shape
# Every tool computes in the precision `train.bf16: auto` picks on this machine (the measured
# probe: bf16 where its matmuls are faster, fp32 on AVX2-only CPUs where bf16 is emulated).
BF16 = True
FROZEN_BF16 = True  # --no-frozen-bf16: frozen weights stay fp32 (the lever measured alone)
COMPILE = None  # --compile true|false: train.compile (None: the config's default)
CPU: list[float] = []  # process CPU seconds at each step end: shows whether others took the cores


def load_base():
    """The model every tool starts from: SmolLM2-135M, or a random model of Llama-3.2-1B's shape."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not RANDOM_1B:
        return AutoModelForCausalLM.from_pretrained(S.model_path(), dtype=torch.float32)
    torch.manual_seed(S.SEED)
    return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_1B_SHAPE), dtype=torch.float32)


def peak_memory_gb() -> float:
    """Peak accelerator memory on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return S.peak_rss_gb()


def run_deltatune(dataset, order, args, method: dict) -> tuple[list[float], list[float]]:
    import deltatune as dt
    from deltatune.config.run import build_run_config
    from deltatune.training.loop import train

    ends: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        config = build_run_config({
            "model": S.MODEL, "task": "causal-lm", "output_dir": f"{out}/run",
            "data": {"train": str(S.DATA), "format": "alpaca", "max_length": args.max_length},
            "method": method,
            "train": {"max_steps": args.steps, "batch_size": S.BATCH, "lr": S.LR,
                      "schedule": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0,
                      "max_grad_norm": 1.0, "bf16": BF16, "seed": S.SEED, "log_every": 1,
                      "group_by_length": False,
                      **({} if COMPILE is None else {"compile": COMPILE})},
        })
        model, tokenizer = dt.load_model(S.MODEL)
        if RANDOM_1B:
            model = load_base()
        dt.apply(model, dt.config_from_dict(config.method))
        if FROZEN_BF16 and BF16:  # as train_from_config does (deltatune/training/speed.py)
            from deltatune.training.speed import hold_frozen_weights_in_bf16

            hold_frozen_weights_in_bf16(model)
        train(model, tokenizer, config, train_dataset=dataset,
              on_step=lambda step: (ends.append(time.perf_counter()), CPU.append(cpu_seconds())))
        with open(f"{out}/run/metrics.jsonl") as log:
            losses = [r["loss"] for r in map(json.loads, log) if "loss" in r]
    return ends, losses


class _Ordered(torch.utils.data.Dataset):
    """The examples in training order, as the token ids / labels / masks the peers take."""

    def __init__(self, dataset, order, trl: bool) -> None:
        self.rows = []
        for i in order:
            example = dataset[i]
            if trl:  # TRL derives labels itself from the completion mask (response tokens)
                mask = [int(label != -100) for label in example.labels]
                self.rows.append({"input_ids": example.input_ids, "completion_mask": mask})
            else:
                self.rows.append({"input_ids": example.input_ids, "labels": example.labels,
                                  "attention_mask": [1] * len(example.input_ids)})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timing_callback(ends: list[float], losses: list[float]):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            CPU.append(cpu_seconds())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Timing()


def _peer_arguments(cls, out: str, steps: int, **extra):
    return cls(output_dir=out, max_steps=steps, per_device_train_batch_size=S.BATCH,
               learning_rate=S.LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
               max_grad_norm=1.0, bf16=BF16, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no",
               report_to=[], seed=S.SEED, dataloader_num_workers=0, disable_tqdm=True,
               train_sampling_strategy="sequential", **extra)


def _peft_lora(rank: int):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                           target_modules=S.LORA_TARGETS, task_type="CAUSAL_LM")


def run_peft_trainer(dataset, order, args) -> tuple[list[float], list[float]]:
    import peft
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    ends: list[float] = []
    losses: list[float] = []
    path = S.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peft.get_peft_model(load_base(), _peft_lora(args.rank))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model, args=_peer_arguments(TrainingArguments, out, args.steps,
                                              remove_unused_columns=False),
            train_dataset=_Ordered(dataset, order, trl=False),
            # dynamic padding: each batch padded to its longest row, labels with -100
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
            callbacks=[_timing_callback(ends, losses)])
        trainer.train()
    return ends, losses


def run_trl(dataset, order, args) -> tuple[list[float], list[float]]:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    ends: list[float] = []
    losses: list[float] = []
    path = S.model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_base()
    rows = _Ordered(dataset, order, trl=True).rows
    train_dataset = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        # the examples are already cut to max_length (TRL refuses max_length with padding_free)
        config = _peer_arguments(SFTConfig, out, args.steps, max_length=None,
                                 padding_free=True, completion_only_loss=True,
                                 # TRL turns checkpointing on by default; off is faster here
                                 gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset,
                             processing_class=tokenizer, peft_config=_peft_lora(args.rank),
                             callbacks=[_timing_callback(ends, losses)])
        trainer.train()
    return ends, losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tool", choices=TOOLS)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=S.MAX_LENGTH)
    parser.add_argument("--rank", type=int, default=S.RANK)
    parser.add_argument("--last", type=int, default=5, help="steps averaged for the final loss")
    parser.add_argument("--bf16", default="auto", type=lambda v: {"true": True, "false": False}.get(v, v),
                        help="auto (the machine's measured choice), true or false")
    parser.add_argument("--no-frozen-bf16", action="store_true",
                        help="keep frozen weights fp32 under bf16 (to measure that lever alone)")
    parser.add_argument("--llama-1b-shape", action="store_true",
                        help="a random model of Llama-3.2-1B's shape instead of SmolLM2-135M")
    parser.add_argument("--compile", choices=("true", "false"),
                        help="train.compile for deltatune's runs (default: the config's default)")
    args = parser.parse_args()
    global RANDOM_1B, BF16, FROZEN_BF16, COMPILE
    COMPILE = None if args.compile is None else args.compile == "true"
    RANDOM_1B = args.llama_1b_shape
    FROZEN_BF16 = not args.no_frozen_bf16
    from deltatune.training.optimization import resolve_bf16

    BF16 = resolve_bf16(args.bf16, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(S.SEED)
    from transformers import AutoTokenizer

    dataset = S.load_examples(AutoTokenizer.from_pretrained(S.model_path()), args.max_length)
    order = S.row_order(len(dataset), args.steps)
    started = time.perf_counter()
    if args.tool == "deltatune-frozen-fp32":  # the LoRA run before the frozen-bf16 lever
        FROZEN_BF16 = False
    if args.tool in ("deltatune", "deltatune-frozen-fp32"):
        ends, losses = run_deltatune(dataset, order, args, {
            "name": "lora", "r": args.rank, "alpha": 2 * args.rank, "target_modules": S.LORA_TARGETS})
    elif args.tool == "deltatune-full":
        ends, losses = run_deltatune(dataset, order, args, {"name": "full"})
    elif args.tool == "peft-trainer":
        ends, losses = run_peft_trainer(dataset, order, args)
    else:
        ends, losses = run_trl(dataset, order, args)
    if len(ends) != args.steps:
        sys.exit(f"{args.tool}: {len(ends)} step ends recorded, expected {args.steps}")
    step_times = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])] \
        if args.warmup else [ends[0] - started] + [b - a for a, b in zip(ends, ends[1:])]
    step_tokens = [sum(len(dataset[i].input_ids) for i in order[k * S.BATCH:(k + 1) * S.BATCH])
                   for k in range(args.warmup, args.steps)]
    # Model FLOPs of the measured steps (benchmarks/common/flops.py: real tokens, head on labelled
    # positions only) over the machine's measured peak at this precision = MFU.
    from flops import Shape, batch_flops, measured_peak, mfu
    from transformers import AutoConfig, LlamaConfig

    shape = Shape.of(LlamaConfig(**LLAMA_1B_SHAPE) if RANDOM_1B else AutoConfig.from_pretrained(S.model_path()))
    training = "full" if args.tool == "deltatune-full" else "lora"
    step_flops = [batch_flops(shape, [dataset[i] for i in order[k * S.BATCH:(k + 1) * S.BATCH]],
                              training, lora_rank=args.rank, lora_targets=S.LORA_TARGETS)
                  for k in range(args.warmup, args.steps)]
    peak = measured_peak(BF16)
    # CPU seconds used / (wall seconds x threads) over the measured steps: ~1 when the run had the
    # cores to itself, well below 1 when other processes competed for them.
    window = ends[-1] - ends[args.warmup - 1] if args.warmup else ends[-1] - started
    used = CPU[-1] - CPU[args.warmup - 1] if args.warmup else CPU[-1]
    print(json.dumps({
        "cpu_utilization": used / (window * torch.get_num_threads()),
        "tool": args.tool, "steps": args.steps, "warmup": args.warmup, "rank": args.rank,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(step_times),
        "real_tokens_per_s": sum(step_tokens) / sum(step_times),
        "peak_rss_gb": S.peak_rss_gb(), "peak_memory_gb": peak_memory_gb(), "losses": losses,
        "model": "random Llama-3.2-1B shape" if RANDOM_1B else S.MODEL,
        "last_loss_mean": statistics.mean(losses[-args.last:]), "step_s": step_times,
        "bf16": BF16, "frozen_bf16": FROZEN_BF16 and BF16, "compile": COMPILE,
        "first_steps_s": ends[args.warmup - 1] - started if args.warmup else None,
        "model_gflop_per_token": sum(step_flops) / sum(step_tokens) / 1e9,
        "model_gflops": sum(step_flops) / sum(step_times) / 1e9, **peak,
        "mfu": mfu(sum(step_flops), sum(step_times), peak["peak_gflops"]),
    }))


if __name__ == "__main__":
    main()
