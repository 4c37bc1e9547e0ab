"""Training checkpoints: everything `--resume` needs to continue a run bit for bit.

    run_dir/checkpoints/step-N/
        adapter/              the delta, exactly as save_adapter writes it (usable on its own)
        trainer_state.pt      optimizer + scheduler state, RNG states of every rank, data position,
                              best metric so far (torch tensors and plain Python: weights_only)
    run_dir/checkpoints/step-N/ of a sharded (FSDP) run:
        sharded/              torch.distributed.checkpoint: each rank's shard of the trainable
                              tensors and their AdamW moments (+ .metadata); loads at any world size
        trainer_state.pt      scheduler, RNG states, data position (no optimizer: it is sharded)

Each checkpoint is written to a temp directory and renamed into place, so a crash mid-write
leaves the previous checkpoint intact; only the newest `keep` are kept.
"""
from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deltatune.adapters_io import CONFIG_NAME, WEIGHTS_NAME, atomic_directory, commit_directory, read_tensors, save_adapter
from deltatune.deltas import active_config
from deltatune.errors import DeltatuneError
from deltatune.methods import get_method

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
SHARDED = "sharded"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The state of every random generator the training loop draws from (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy(), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_to_bytes(state: dict[str, Any]) -> bytes:
    """For sending between ranks (all_gather_object cannot carry these tensors in torch 2.13)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def rng_from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), weights_only=True)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------- directories
def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints under run_dir, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-<step>/ atomically, then drop all but the newest `keep`."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{step}"
    tmp = atomic_directory(final)
    try:
        save_adapter(model, tmp / "adapter", trainable_form=True)  # resumes on the same (changed) base
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    **trainer_state}, tmp / STATE_FILE)
        commit_directory(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a lost mount: say so, and what is still safe
            previous = latest_checkpoint(run_dir)
            safe = (f"the last complete checkpoint, {previous.name}, is intact" if previous
                    else "no earlier checkpoint exists")
            raise DeltatuneError(f"{final}: cannot write the checkpoint ({exc.strerror or exc}); "
                                 f"{safe} — free the space and rerun with --resume") from None
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore the delta, optimizer and scheduler from `directory`; returns the trainer state."""
    directory = Path(directory)
    if (directory / SHARDED).is_dir():
        load_sharded(directory / SHARDED, model, optimizer)
    elif any(hasattr(p, "full_tensor") for p in model.parameters()):  # a DTensor: fsdp run
        raise DeltatuneError(f"{directory}: written by a one-process or DDP run, which fsdp cannot "
                             "continue; resume it with train.distributed=ddp")
    else:
        restore_delta(model, directory / "adapter")
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, in one line
        raise DeltatuneError(f"{directory / STATE_FILE}: unreadable checkpoint state "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if "optimizer" not in state:  # sharded: restored with the weights
        scheduler.load_state_dict(state.pop("scheduler"))
        return state
    try:
        optimizer.load_state_dict(state.pop("optimizer"))
    except (ValueError, KeyError) as exc:
        raise DeltatuneError(f"{directory / STATE_FILE}: optimizer state does not fit this run's "
                             f"trainable parameters ({exc}) — was the method changed?") from None
    scheduler.load_state_dict(state.pop("scheduler"))
    return state


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any,
                            trainer_state: dict[str, Any], keep: int, dist: Any) -> None:
    """Every rank writes its shard into one temp directory (on a filesystem all nodes share);
    rank 0 then adds trainer_state.pt and renames it into place, as save_checkpoint does."""
    import torch.distributed.checkpoint as dcp

    final = Path(run_dir) / CHECKPOINTS / f"step-{step}"
    tmp = Path(dist.broadcast(str(atomic_directory(final)) if dist.is_main else None))
    try:
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDED))
        if dist.is_main:
            torch.save({"scheduler": scheduler.state_dict(), **trainer_state}, tmp / STATE_FILE)
            commit_directory(tmp, final)
            for old in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The trainable tensors (by their names in the model) and their optimizer state: the same
    keys whether the model is sharded over N ranks or whole in one process."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    weights = {k: v for k, v in get_model_state_dict(model).items() if k in trainable}
    return {"model": weights, "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a sharded checkpoint into this run's model and optimizer, resharding to this world
    size (one process included)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = _sharded_state(model, optimizer)  # a fresh AdamW's moments are created (zeros) here
    try:
        dcp.load(state, checkpoint_id=str(directory),
                 no_dist=not torch.distributed.is_initialized())  # one process: read every shard
    except Exception as exc:
        raise DeltatuneError(f"{directory}: unreadable sharded checkpoint ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:160]})") from None
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_latest_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any) -> tuple[Path, dict[str, Any], list[str]]:
    """Restore the newest checkpoint that loads: (its directory, its trainer state, the errors of
    newer ones that did not). A checkpoint is renamed into place only once written, but a power
    loss can still leave its files empty on disk; the one before it is then the last good one."""
    damaged: list[str] = []
    for directory in reversed(checkpoint_dirs(run_dir)):
        try:  # each load replaces the whole delta, optimizer and scheduler state
            return directory, load_checkpoint(directory, model, optimizer, scheduler), damaged
        except DeltatuneError as exc:
            damaged.append(str(exc))
    raise DeltatuneError(damaged[0] if damaged else f"{run_dir}: no checkpoint to resume from")


def restore_delta(model: nn.Module, directory: Path) -> None:
    """Copy the tensors saved in `directory` into the model's live (already applied) delta."""
    name, config = active_config(model)
    if (directory / CONFIG_NAME).is_file():
        tensors = read_tensors(directory / WEIGHTS_NAME)
        get_method(config.method).load_state_dict(model, name, tensors, str(directory / WEIGHTS_NAME))
        return
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DeltatuneError(f"{directory}: checkpoint holds no weights")
    live = model.state_dict()
    for file in files:
        for key, value in read_tensors(file).items():
            if key not in live or tuple(live[key].shape) != tuple(value.shape):
                raise DeltatuneError(f"{file}: tensor {key!r} does not fit this model")
            with torch.no_grad():
                live[key].copy_(value)
