"""Save and load a delta in PEFT's on-disk layout: adapter_config.json + adapter_model.safetensors.

Loading never unpickles: only JSON and safetensors are read. Full fine-tuning saves a plain
transformers directory instead (config.json + model.safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.deltas import active_config, apply, set_adapter
from deltatune.errors import DeltatuneError
from deltatune.methods import get_method, method_for_peft_type
from deltatune.methods.base import DEFAULT_ADAPTER, delta_state, task_of
from deltatune.methods.full import FullConfig
from deltatune.quantization import recorded_quantization, write_record

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def atomic_directory(final: Path):
    """A temp directory beside `final`; `commit(tmp)` renames it into place (replacing `final`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_directory(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                 trainable_form: bool = False) -> Path:
    """Write the active (or named) delta to `directory`, atomically.

    A delta that changed its base (LoRA with init pissa/olora) is written as plain LoRA of twice
    the rank that loads on the unmodified base, as PEFT's `path_initial_model_for_weight_conversion`
    converts it; `trainable_form=True` keeps it as it trains (rank r, its init recorded: what
    checkpoints resume from; load_adapter converts it on the unmodified base)."""
    state = delta_state(model)
    name = name or active_config(model)[0]
    if name not in state.configs:
        raise DeltatuneError(f"save_adapter: no adapter named {name!r} on this model")
    config = state.configs[name]
    method = get_method(config.method)
    final = Path(directory)
    tmp = atomic_directory(final)
    try:
        if config.method == "full":
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            tensors = {k: v.detach().contiguous().cpu() for k, v in method.state_dict(model, name).items()}
            peft_config = {
                "peft_type": config.peft_type,
                "task_type": PEFT_TASK_TYPES[task_of(model)],
                "base_model_name_or_path": getattr(model, "name_or_path", None),
                "inference_mode": True,
                "modules_to_save": config.modules_to_save or None,
                **method.to_peft(config, model, name),
            }
            if method.export_form is not None and not trainable_form:
                tensors, peft_config = method.export_form(model, name, tensors, peft_config)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
            write_record(model, tmp)
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeltatuneError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DeltatuneError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    values = _read_json(path)
    if not isinstance(values, dict) or "peft_type" not in values:
        raise DeltatuneError(f"{path}: no 'peft_type' key — not an adapter config")
    return values


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        bin_path = path.with_suffix(".bin")
        if bin_path.exists():
            raise DeltatuneError(f"{bin_path}: pickle files are never loaded (they can run code); "
                                 f"save the adapter as {path.name}")
        raise DeltatuneError(f"{path}: missing (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DeltatuneError(f"{path}: corrupt or truncated safetensors file ({str(exc).splitlines()[0]})") from None


def config_from_peft(method: Any, values: dict[str, Any], path: Path) -> Any:
    """The method config an adapter_config.json describes; errors name that file."""
    try:
        return method.from_peft(values)
    except KeyError as exc:
        raise DeltatuneError(f"{path}: missing key {exc.args[0]!r} for a {values['peft_type']} "
                             f"adapter") from None
    except DeltatuneError as exc:
        if CONFIG_NAME in str(exc):
            raise
        raise DeltatuneError(f"{path}: {exc}") from None


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise DeltatuneError(f"{directory}: adapter directory not found")


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Add the delta saved in `directory` to `model` under `name` and make it active."""
    directory = Path(directory)
    _check_directory(directory)
    if not (directory / CONFIG_NAME).exists():
        if (directory / "config.json").exists():
            return _load_full(model, directory, name)
        raise DeltatuneError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
    values = read_adapter_config(directory)
    method = method_for_peft_type(values["peft_type"], str(directory / CONFIG_NAME))
    tensors = read_tensors(directory / WEIGHTS_NAME)
    if method.import_form is not None:  # e.g. a PiSSA file as the plain LoRA it is on this base
        values, tensors = method.import_form(model, values, tensors)
    config = config_from_peft(method, values, directory / CONFIG_NAME)
    try:
        apply(model, config, name)
    except DeltatuneError as exc:  # e.g. its target modules do not exist in this architecture
        raise DeltatuneError(f"{directory}: adapter saved for base "
                             f"{values.get('base_model_name_or_path')!r} does not fit this model "
                             f"({exc})") from None
    try:
        method.load_state_dict(model, name, tensors, str(directory / WEIGHTS_NAME))
    except DeltatuneError:
        from deltatune.deltas import delete_adapter
        delete_adapter(model, name)
        raise
    set_adapter(model, name)
    return model


def _full_weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DeltatuneError(f"{directory}: no *.safetensors weights (pickled weights are never loaded)")
    return files


def _load_full(model: nn.Module, directory: Path, name: str) -> nn.Module:
    live = model.state_dict()
    for file in _full_weight_files(directory):
        for key, value in read_tensors(file).items():
            if key not in live:
                continue
            if tuple(value.shape) != tuple(live[key].shape):
                raise DeltatuneError(f"{file}: tensor {key!r} has shape {tuple(value.shape)} but this "
                                     f"base model expects {tuple(live[key].shape)}")
            with torch.no_grad():
                live[key].copy_(value)
    apply(model, FullConfig(), name)
    return model


def directory_size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def _base_directory_without_converting(base: str) -> Path | None:
    from deltatune.models import _smollm2_gguf, gguf_cache_path, resolve_model_path

    try:
        if base == "smollm2-135m" or base.endswith(".gguf"):
            return gguf_cache_path(_smollm2_gguf() if base == "smollm2-135m" else Path(base))
        return Path(resolve_model_path(base))
    except (DeltatuneError, OSError):
        return None


def inspect_adapter(directory: str | os.PathLike) -> dict[str, Any]:
    """What a saved delta is: method, base, options, parameter count, size vs its base model."""
    directory = Path(directory)
    _check_directory(directory)
    if (directory / CONFIG_NAME).exists():
        values = read_adapter_config(directory)
        method = method_for_peft_type(values["peft_type"], str(directory / CONFIG_NAME))
        tensors = read_tensors(directory / WEIGHTS_NAME)
        info = {"method": method.name, "peft_type": values["peft_type"],
                "base_model": values.get("base_model_name_or_path"),
                "task_type": values.get("task_type"),
                "options": config_from_peft(method, values, directory / CONFIG_NAME).to_dict()}
    else:
        if not (directory / "config.json").is_file():
            raise DeltatuneError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
        tensors = {}
        for file in _full_weight_files(directory):
            tensors.update(read_tensors(file))
        config = _read_json(directory / "config.json")
        info = {"method": "full", "peft_type": None,
                "base_model": config.get("deltatune_base") or config.get("_name_or_path"),
                "task_type": (config.get("architectures") or ["?"])[0], "options": {}}
    quantization = recorded_quantization(directory)
    info["base_quantization"] = quantization.to_dict() if quantization is not None else None
    info["parameters"] = sum(t.numel() for t in tensors.values())
    info["tensors"] = len(tensors)
    info["size_bytes"] = directory_size(directory)
    info["base_size_bytes"] = None
    base = info["base_model"]
    if base:
        base_dir = _base_directory_without_converting(base)
        if base_dir is not None and base_dir.is_dir():
            info["base_size_bytes"] = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) or None
    return info
