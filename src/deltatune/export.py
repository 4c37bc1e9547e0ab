"""Export: fold an adapter into its base and write a plain transformers directory.

`deltatune merge --model M --adapter A --out DIR` -> DIR holds config.json, model.safetensors and
the tokenizer; `AutoModelFor*.from_pretrained(DIR)` needs neither deltatune nor peft. Written to a
temp directory beside DIR and renamed into place, so an interrupted export leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from deltatune.adapters_io import (CONFIG_NAME, WEIGHTS_NAME, atomic_directory, commit_directory,
                          directory_size, load_adapter, read_adapter_config, read_tensors)
from deltatune.deltas import merge_and_unload
from deltatune.errors import DeltatuneError
from deltatune.methods import get_method, method_for_peft_type
from deltatune.methods.base import PEFT_PREFIX, count_parameters, delta_state
from deltatune.quantization import quantization_error, recorded_quantization

HEAD_NAMES = ("classifier", "score")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def save_merged(model: nn.Module, tokenizer, directory: str | os.PathLike,
                overwrite: bool = False) -> Path:
    """Merge the active adapter into `model` (in place: it becomes a plain transformers model)
    and write model + tokenizer to `directory` atomically."""
    final = Path(directory)
    if final.exists() and not overwrite:
        raise DeltatuneError(f"{final}: already exists; pass --overwrite to replace it")
    state = delta_state(model)
    if state.active is not None:
        method = get_method(state.configs[state.active].method)
        if method.merge is None:
            raise DeltatuneError(f"cannot merge a {method.name} adapter into the base weights: "
                                 f"{method.why_no_merge}")
        model = merge_and_unload(model)
    for attribute in ("deltatune_base",):  # our bookkeeping; a plain model does not need it
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    tmp = atomic_directory(final)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _num_labels(tensors: dict, source: str) -> int:
    """A classification adapter saves its head: the head's weight has one row per label."""
    for key, tensor in tensors.items():
        parts = key[len(PEFT_PREFIX):].split(".") if key.startswith(PEFT_PREFIX) else key.split(".")
        if parts[-1] == "weight" and any(p in HEAD_NAMES for p in parts[:-1]):
            return int(tensor.shape[0])
    raise DeltatuneError(f"{source}: a SEQ_CLS adapter without its classification head "
                         f"(no classifier/score weight), so the number of labels is unknown")


def merge_from_cli(model: str, adapter: str, out: str, overwrite: bool = False) -> Path:
    """`deltatune merge`: load `model` + `adapter`, fold the adapter in, write a plain model."""
    from deltatune.models import load_model, resolve_model_path

    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        raise DeltatuneError(f"{adapter_dir}: adapter directory not found")
    if Path(out).exists() and not overwrite:
        raise DeltatuneError(f"{out}: already exists; pass --overwrite to replace it")
    if not (adapter_dir / CONFIG_NAME).exists():
        if (adapter_dir / "config.json").exists():
            raise DeltatuneError(f"{adapter_dir}: cannot merge a full fine-tuning result: "
                                 f"{get_method('full').why_no_merge}")
        raise DeltatuneError(f"{adapter_dir}: no {CONFIG_NAME} (not an adapter directory)")
    values = read_adapter_config(adapter_dir)
    method = method_for_peft_type(values["peft_type"], str(adapter_dir / CONFIG_NAME))
    if method.merge is None:
        raise DeltatuneError(f"{adapter_dir}: cannot merge a {method.name} adapter into the base "
                             f"weights: {method.why_no_merge}")
    tensors = read_tensors(adapter_dir / WEIGHTS_NAME)
    task = "classification" if values.get("task_type") == "SEQ_CLS" else "causal-lm"
    num_labels = _num_labels(tensors, str(adapter_dir / WEIGHTS_NAME)) if task == "classification" else None
    quantization = recorded_quantization(adapter_dir)  # trained on a quantized base: rebuild it
    base, tokenizer = load_model(model, task=task, num_labels=num_labels, quantize=quantization)
    load_adapter(base, adapter_dir)
    adapter_params = sum(t.numel() for t in tensors.values())
    error = quantization_error(base, resolve_model_path(model)) if quantization is not None else None
    final = save_merged(base, tokenizer, out, overwrite=overwrite)
    full_params = count_parameters(base)[1]
    adapter_bytes = directory_size(adapter_dir)
    full_bytes = sum(f.stat().st_size for f in final.glob("*.safetensors"))
    print(f"merged {adapter_dir} ({method.name}) into {model} -> {final}")
    if quantization is not None:
        print(f"the base was quantized ({quantization.type}), as in training: dequantized it to "
              f"{base.dtype} and added the delta; the export is a dense model")
        if error is not None:  # what the export inherits from training on a quantized base
            print(f"{quantization.type} vs the original dense weights: relative error "
                  f"{error[0]:.4f} over {error[1]} weight matrices")
    print(f"adapter:    {human_size(adapter_bytes):>10}  {adapter_params:>13,} parameters")
    print(f"full model: {human_size(full_bytes):>10}  {full_params:>13,} parameters")
    print(f"the adapter is {100 * adapter_bytes / full_bytes:.2f}% of the full model's size")
    return final
