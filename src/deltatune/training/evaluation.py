"""Evaluation: accuracy and macro-F1 (classification), perplexity (text), exact match of the final
answer (GSM8K-style data, by greedy generation). Used by the trainer and by `deltatune eval`.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from deltatune.training.distributed import Distributed
from deltatune.errors import DeltatuneError
from deltatune.training.collapse import label_facts

# evaluate_model's keys that describe the eval set and the predictions rather than score them:
# kept in metrics.jsonl and `deltatune eval`'s JSON, left out of the one-line progress messages
NOT_SHOWN = ("examples", "majority_share", "label_entropy", "predicted_classes", "label_classes")
from deltatune.training.losses import IGNORE_INDEX, batch_loss, count_targets

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "exact_match": True, "perplexity": False,
                    "loss": False}


# ----------------------------------------------------------------------------- metric functions
def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if not labels:
        return float("nan")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    scores = []
    for c in range(num_labels):
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        if tp + fp + fn == 0:
            continue  # class absent from both: no evidence either way
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The answer a GSM8K-style solution ends with: the number after the last "####", else the
    last number in the text; normalised (no commas or $, "3.0" -> "3")."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    number = (numbers[0] if "####" in text else numbers[-1]).replace(",", "").replace("$", "")
    try:
        value = float(number)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not references:
        return float("nan")
    hits = sum(1 for p, r in zip(predictions, references) if answers_match(p, r))
    return hits / len(references)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.strip().splitlines()[0] if text.strip() else "").lower().split())


def answers_match(prediction: str, reference: str) -> bool:
    """Numeric references (GSM8K) compare final numbers; word answers (verbalized labels)
    compare the first line, case and punctuation aside."""
    expected = final_answer(reference)
    if expected is not None:
        return final_answer(prediction) == expected
    return _words(prediction) == _words(reference)


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or (isinstance(old, float) and math.isnan(old)):
        return not math.isnan(new)
    return new > old if HIGHER_IS_BETTER[metric] else new < old


def default_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "perplexity"


# ----------------------------------------------------------------------------- evaluation loops
def _length_sorted_batches(dataset, batch_size: int, dist: Distributed) -> list[list[int]]:
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i].input_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return _in_lockstep(batches[dist.rank::dist.world_size], len(batches), dist)


def _in_lockstep(mine: list, total: int, dist: Distributed) -> list:
    """Under lockstep, a rank with fewer batches runs its first one again (marked None in the
    returned list's second half of each pair) so every rank makes the same number of forward
    passes; the repeats are computed and thrown away."""
    if not dist.lockstep:
        return mine
    rounds = -(-total // dist.world_size)
    return mine + [None] * (rounds - len(mine))


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, task: str, collator, *, batch_size: int = 32,
                   dist: Distributed | None = None, bf16: bool = False, tokenizer=None,
                   with_exact_match: bool = False, max_new_tokens: int = 256) -> dict[str, float]:
    """Metrics of `model` on `dataset` (sharded over ranks, gathered on all of them)."""
    dist = dist or Distributed()
    if len(dataset) == 0:
        raise DeltatuneError("evaluation dataset is empty")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loss_sum, targets, rows = 0.0, 0, []
    try:
        for indices in _length_sorted_batches(dataset, batch_size, dist):
            if indices is None:  # lockstep filler: a forward pass whose result is not counted
                _ = model(**{k: v for k, v in _to(collator([dataset[0]]), device).items() if k != "labels"})
                continue
            batch = _to(collator([dataset[i] for i in indices]), device)
            with autocast:
                if task == "classification":
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    logits = model(**inputs).logits.float()          # (batch, num_labels)
                    loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                    rows += list(zip(logits.argmax(-1).tolist(), batch["labels"].tolist()))
                else:
                    loss_sum += float(batch_loss(model, task, batch))
            targets += count_targets(task, batch["labels"])
        totals = dist.all_reduce_sum(torch.tensor([loss_sum, float(targets)], dtype=torch.float64))
        loss_sum, targets = float(totals[0]), int(totals[1])
        metrics = {"loss": loss_sum / max(targets, 1)}
        if task == "classification":
            rows = [r for part in dist.gather(rows) for r in part]
            predictions, labels = [p for p, _ in rows], [y for _, y in rows]
            num_labels = int(getattr(getattr(model, "config", None), "num_labels", 0) or 0)
            metrics["accuracy"] = accuracy(predictions, labels)
            metrics["f1"] = macro_f1(predictions, labels, max(num_labels, max(labels) + 1))
            # what a classifier that learned nothing would score (training/collapse.py)
            metrics.update(label_facts(labels), predicted_classes=len(set(predictions)),
                           label_classes=len(set(labels)))
        else:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
            if with_exact_match:
                if tokenizer is None:
                    raise DeltatuneError("exact_match needs the tokenizer to decode answers")
                metrics["exact_match"] = _exact_match(model, dataset, tokenizer, batch_size, dist,
                                                      autocast, max_new_tokens)
        metrics["examples"] = len(dataset)
    finally:
        model.train(was_training)
    return metrics


def split_prompt(example) -> tuple[list[int], str | list[int]]:
    """(prompt tokens, reference answer) of an instruction example: the answer is the example's
    target text, else the tokens that carry labels (everything before them is the prompt)."""
    input_ids, labels = list(example.input_ids), list(example.labels)
    first = getattr(example, "prompt_length", None)
    if first is None:
        first = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    target = getattr(example, "target", None)
    if target is None:
        target = [t for t, y in zip(input_ids, labels) if y != IGNORE_INDEX]
    return input_ids[:first], target


def _exact_match(model, dataset, tokenizer, batch_size, dist, autocast, max_new_tokens) -> float:
    generated: list[tuple[str, str]] = []
    indices = list(range(len(dataset)))[dist.rank::dist.world_size]
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    references = [split_prompt(dataset[i])[1] for i in indices[:64]]
    if references and all(isinstance(r, str) and final_answer(r) is None for r in references):
        # short word answers (verbalized labels): a few tokens past the longest one suffice
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        max_new_tokens = min(max_new_tokens, longest + 4)
    starts = _in_lockstep(list(range(0, len(indices), batch_size)),
                          -(-len(dataset) // batch_size), dist)
    for start in starts:
        filler = start is None  # lockstep: generate along with the other ranks, keep nothing
        chunk = indices[:1] if filler else indices[start:start + batch_size]
        pairs = [split_prompt(dataset[i]) for i in (chunk or [0])]
        width = max(len(p) for p, _ in pairs)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in pairs], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in pairs], device=device)
        with autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, synced_gpus=dist.lockstep)
        if filler or not chunk:
            continue
        for row, (_, answer) in zip(out[:, width:], pairs):
            reference = answer if isinstance(answer, str) else tokenizer.decode(answer, skip_special_tokens=True)
            generated.append((tokenizer.decode(row, skip_special_tokens=True), reference))
    generated = [g for part in dist.gather(generated) for g in part]
    return exact_match([p for p, _ in generated], [r for _, r in generated])


# ----------------------------------------------------------------------------- command line
def evaluate_from_cli(args: Any) -> dict[str, Any]:
    """`deltatune eval CONFIG.yaml [k=v ...]` or `deltatune eval --model M [--adapter A] --data F`."""
    from deltatune.config.run import FORMATS_BY_TASK, DataConfig, load_run_config
    from deltatune.methods import method_config_for
    from deltatune.data.dataset import Collator, build_dataset, num_labels_of
    from deltatune.training.optimization import resolve_bf16

    adapter = args.adapter
    if args.config:
        config = load_run_config(args.config, args.overrides or [])
        method_config_for(config)  # the config is checked whole, as `deltatune train` checks it
        model_name, task, data = args.model or config.model, config.task, config.data
        if adapter is None and (config.output_dir and _is_saved_delta(config.output_dir)):
            adapter = config.output_dir
        batch_size = config.train.eval_batch_size or config.train.batch_size
    else:
        if not args.model or not args.data:
            raise DeltatuneError("eval: give a run config, or --model and --data")
        task = args.task or _task_from_format(args.format) or _guess_task(args.model, adapter)
        fmt = args.format or FORMATS_BY_TASK[task][0 if task == "classification" else 2]
        data = DataConfig(train=None, eval=args.data, format=fmt)
        model_name, batch_size = args.model, 32
        if data.format not in FORMATS_BY_TASK[task]:
            raise DeltatuneError(f"--format {data.format!r} does not fit task {task!r}")
    model, tokenizer = _load(model_name, task, adapter, data, args,
                             quantize=config.quantize if args.config else None)
    dataset = build_dataset(data, tokenizer, task, "eval")
    if task == "classification":
        expected = model.config.num_labels
        if num_labels_of(dataset) > expected:
            raise DeltatuneError(f"{data.eval}: labels go up to {num_labels_of(dataset) - 1} but the "
                                 f"model has {expected} classes")
    collator = Collator(tokenizer.pad_token_id)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # A run directory's own precision and eval batch size, so `deltatune eval` reproduces the
    # run's final metrics on any machine (bf16 vs fp32 moves a loss by ~1e-5, and under bf16 so
    # does the batch's padded width); otherwise the config's setting, else auto.
    recorded = _run_eval_settings(adapter)
    bf16 = recorded.get("bf16")
    if bf16 is None:
        bf16 = resolve_bf16(config.train.bf16 if args.config else "auto", device)
    metrics = evaluate_model(model, dataset, task, collator,
                             batch_size=recorded.get("batch_size") or batch_size,
                             bf16=bf16, tokenizer=tokenizer, with_exact_match=data.format == "gsm8k")
    return {"model": model_name, "adapter": adapter, "data": data.eval, **metrics}


def _run_eval_settings(directory: str | None) -> dict[str, Any]:
    """{"bf16": ..., "batch_size": ...} as the run in `directory` evaluated (its summary.json and
    config.yaml); empty for a directory that is not a deltatune run."""
    import json
    from pathlib import Path

    import yaml

    if not directory:
        return {}
    settings: dict[str, Any] = {}
    try:
        summary = json.loads((Path(directory) / "summary.json").read_text(encoding="utf-8"))
        if isinstance(summary, dict) and isinstance(summary.get("bf16"), bool):
            settings["bf16"] = summary["bf16"]
        train = yaml.safe_load((Path(directory) / "config.yaml").read_text(encoding="utf-8"))["train"]
        size = train.get("eval_batch_size") or train.get("batch_size")
        if isinstance(size, int) and size > 0:
            settings["batch_size"] = size
    except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError):
        pass  # not a deltatune run (or a damaged one): the caller's defaults hold
    return settings


def _is_saved_delta(directory: str) -> bool:
    from pathlib import Path

    return (Path(directory) / "adapter_config.json").is_file() or (Path(directory) / "config.json").is_file()


def _task_from_format(fmt: str | None) -> str | None:
    from deltatune.config.run import FORMATS_BY_TASK

    return next((t for t, formats in FORMATS_BY_TASK.items() if fmt in formats), None)


def _guess_task(model_name: str, adapter: str | None) -> str:
    """classification for encoders and SEQ_CLS adapters, causal-lm otherwise."""
    import json
    from pathlib import Path

    if adapter and (Path(adapter) / "adapter_config.json").is_file():
        task_type = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("task_type")
        return "classification" if task_type == "SEQ_CLS" else "causal-lm"
    from transformers import AutoConfig

    from deltatune.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(adapter or model_name))
    return "causal-lm" if getattr(config, "is_decoder", False) or config.model_type in (
        "llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "phi3") else "classification"


def _load(model_name: str, task: str, adapter: str | None, data, args, quantize=None):
    """The base model, with the delta in `adapter` when given (a full model directory replaces it).
    An adapter's base is quantized as it was in training; without one, as `quantize` says."""
    import json
    from pathlib import Path

    from deltatune.adapters_io import load_adapter
    from deltatune.models import load_model
    from deltatune.quantization import recorded_quantization

    num_labels = len(data.label_names) if data.label_names else None
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        if not (Path(adapter) / "config.json").is_file():
            raise DeltatuneError(f"{adapter}: not an adapter or model directory")
        return load_model(adapter, task=task, num_labels=num_labels or
                          json.loads((Path(adapter) / "config.json").read_text()).get("num_labels"))
    if adapter and task == "classification" and num_labels is None:
        from deltatune.adapters_io import read_tensors

        # read_tensors: one-line errors for a missing, truncated or pickled weights file
        tensors = read_tensors(Path(adapter) / "adapter_model.safetensors")
        heads = [k for k in tensors if k.endswith(("classifier.weight", "score.weight"))]
        num_labels = tensors[heads[0]].shape[0] if heads else None
    model, tokenizer = load_model(model_name, task=task, num_labels=num_labels,
                                  quantize=recorded_quantization(adapter) if adapter else quantize)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer
