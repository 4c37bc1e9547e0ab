"""The pieces of a training step that are not the loop: optimizer, learning-rate schedule,
precision, seeding, gradient checkpointing and the order in which rows are visited."""
from __future__ import annotations

import math
import random
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import nn

from deltatune.errors import DeltatuneError


# ----------------------------------------------------------------------------- optimizer
def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for everything that trains, each tensor once (tied weights share one)."""
    seen: set[int] = set()
    found = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            found.append((name, param))
    return found


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and other vectors: decaying them only hurts (they set scale/offset).
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    lr_multiplier: Callable[[str, nn.Parameter], float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no optimizer state).

    `lr_multiplier` (from the method, e.g. LoRA+): each parameter's lr is lr x its factor; one
    parameter group per (factor, decay or not), so the schedule scales every group alike."""
    params = trainable_parameters(model)
    if not params:
        raise DeltatuneError("nothing to train: no parameter requires grad (apply a method first)")
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in params:
        factor = float(lr_multiplier(name, param)) if lr_multiplier is not None else 1.0
        grouped.setdefault((factor, _no_decay(name, param)), []).append(param)
    groups = [{"params": grouped[(factor, no_decay)], "lr": lr * factor,
               "weight_decay": 0.0 if no_decay else weight_decay}
              for factor, no_decay in sorted(grouped)]
    # The fused kernel updates every tensor in one pass (CPU and CUDA); foreach is the fallback.
    fused_ok = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for _, p in params)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=fused_ok or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup rises linearly to 1 at step warmup_steps - 1; then linear / cosine decay towards 0
    (never exactly 0 at the last step, which would waste it) or constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                           schedule=schedule))


# ----------------------------------------------------------------------------- precision, seeds
def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """train.bf16: true / false, or auto = on where bf16 matmuls are measured faster than fp32
    (deltatune/hardware.py: a cached per-machine probe; on CUDA, where the GPU supports bf16)."""
    if setting is True or setting is False:
        return setting
    from deltatune.hardware import bf16_auto

    return bf16_auto(device)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute layer activations in backward; works with a frozen base.

    Non-reentrant checkpointing needs no grad-requiring input; `enable_input_require_grads` also
    covers models whose checkpointing is reentrant (with frozen embeddings their output would
    otherwise not require grad, and the deltas inside the checkpointed layers get no gradient).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DeltatuneError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


# ----------------------------------------------------------------------------- row order
class BatchStream:
    """Global batches of row indices over endless epochs; batch k is a pure function of
    (seed, k), so the data position of a checkpoint is one integer.

    Each epoch is a fresh seeded permutation. With `lengths` (group by length), the permutation
    is cut into mega-batches of MEGA_BATCHES batches, each sorted by length and cut into batches,
    and the batches are shuffled again: rows of similar length share a batch, so dynamic padding
    wastes little (SST-2: ~13 real tokens per row; random batches pad to ~40). A final batch
    smaller than the number of processes is dropped (some rank would get no rows).

    MEGA_BATCHES trades padding for randomness. At 50 (the HF Trainer's multiplier) SST-2's
    batches compute 1.05 tokens per real token but each holds rows of nearly one length; at 8 they
    compute 1.28 (unsorted batches: 3.0) and each spans an eighth of the length distribution. On
    examples/sst2-minilm-lora.yaml in bf16 at lr 1e-3, 50 left seed 0 at the majority class after
    a gradient spike in warmup; 8 learned on seeds 0-2. Grouping still costs that example about a
    point of accuracy and one seed its 85%, so the example turns it off
    (benchmarks/quality/examples_seeds.py).
    """

    MEGA_BATCHES = 8

    def __init__(self, num_rows: int, batch_size: int, seed: int, world_size: int = 1,
                 lengths: list[int] | None = None) -> None:
        if batch_size % world_size:
            raise DeltatuneError(f"train.batch_size: {batch_size} must be divisible by the number "
                                 f"of processes ({world_size}); it is the global batch")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.world_size, self.lengths = world_size, lengths
        full, rest = divmod(num_rows, batch_size)
        self.per_epoch = full + (1 if rest >= world_size else 0)
        if self.per_epoch == 0:
            raise DeltatuneError(f"training data has {num_rows} rows: fewer than the "
                                 f"{world_size} processes")
        self._epoch, self._batches = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        size = self.batch_size
        if self.lengths is None:
            return [order[i:i + size] for i in range(0, len(order), size)]
        mega = size * self.MEGA_BATCHES
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
        # Keep the one short batch last (it is the one dropped when too small for the ranks).
        short = [b for b in batches if len(b) < size]
        full = [b for b in batches if len(b) == size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return shuffled + short

    def rows(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._epoch_batches(epoch), epoch
        return self._batches[position]
