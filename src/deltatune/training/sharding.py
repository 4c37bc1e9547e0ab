"""How the model is spread over the processes: replicated (one process, or DDP) or sharded (FSDP2).

    parallel = build_parallel(model, dist, "fsdp", bf16=True, cpu_offload=False)
    loss = batch_loss(parallel.forward, ...)           # the module each step calls
    with parallel.accumulating(last=False): ...         # no gradient sync before the last micro-batch
    norm = parallel.clip_grad_norm(trainable, 1.0)      # over the whole (possibly sharded) gradient

`fsdp` applies torch's `fully_shard` to every transformer layer and then to the root, so each
process holds 1/N of every weight, gradient and AdamW moment; the frozen base is sharded too, and
only tensors that require grad ever get a gradient or optimizer state (PEFT stays cheap). The
trainer calls the same five methods in every mode and never learns which method it trains.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.training.distributed import Distributed

# Blocks this large are mmapped by glibc in CPU fsdp processes (see _return_large_blocks).
MMAP_THRESHOLD_BYTES = 128 * 1024


def resolve_mode(setting: str, dist: Distributed) -> str | None:
    """train.distributed -> "ddp", "fsdp" or None (one process: nothing to spread)."""
    if not dist.enabled:
        return None
    return "ddp" if setting == "auto" else setting


class Replicated:
    """Every process holds the whole model; DDP averages the gradients (if there are peers)."""

    sharded = False

    def __init__(self, model: nn.Module, dist: Distributed) -> None:
        self.model, self.dist, self.forward = model, dist, model
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP syncs gradients on the last micro-batch only."""
        return self.forward.no_sync() if self.dist.enabled and not last else contextlib.nullcontext()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def full_weights(self) -> contextlib.AbstractContextManager:
        """The model with whole tensors, on rank 0, for saving (already so)."""
        return contextlib.nullcontext()

    def release_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass


class Sharded(Replicated):
    """FSDP2: every layer and the root sharded over the processes (dim 0 of each tensor)."""

    sharded = True

    def __init__(self, model: nn.Module, dist: Distributed, bf16: bool, cpu_offload: bool) -> None:
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                            fully_shard)

        self.model, self.dist, self.forward = model, dist, model
        # bf16 compute, fp32 gradient reduction: the sum over ranks keeps fp32's precision.
        precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                     if bf16 else MixedPrecisionPolicy())
        offload = CPUOffloadPolicy() if cpu_offload and dist.device.type == "cuda" else OffloadPolicy()
        from deltatune.models import transformer_layers

        try:  # each layer: one all-gather in forward, one reduce-scatter in backward
            layers = list(transformer_layers(model))
        except DeltatuneError as exc:
            raise DeltatuneError(f"train.distributed=fsdp: {exc}; use train.distributed=ddp") from None
        if dist.device.type == "cpu":
            _return_large_blocks()
        for layer in layers:
            fully_shard(layer, mp_policy=precision, offload_policy=offload)
        fully_shard(model, mp_policy=precision, offload_policy=offload)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Before the last micro-batch, gradients accumulate unsharded with no reduce-scatter."""
        return _gradient_sync(self.model, last)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The norm over all shards (torch reduces the DTensor gradients' norms across ranks)."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """Rank 0's model holds whole tensors inside the block (gathered one tensor at a time into
        CPU memory; every rank takes part), so save_adapter / save_pretrained see a plain model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                           cpu_offload=True))
        if not self.dist.is_main:
            yield
            return
        swapped: dict[int, nn.Parameter] = {}
        restore: list[tuple[nn.Module, str, nn.Parameter]] = []
        names = dict(self.model.named_parameters(remove_duplicate=False))
        for name, param in names.items():
            if id(param) not in swapped and name in full:
                swapped[id(param)] = nn.Parameter(full[name], requires_grad=param.requires_grad)
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for leaf, param in list(module._parameters.items()):
                if param is not None and id(param) in swapped:
                    restore.append((module, leaf, param))
                    module._parameters[leaf] = swapped[id(param)]
        # transformers names the architecture after the class: hide FSDP's subclass meanwhile.
        fsdp_class = type(self.model)
        self.model.__class__ = _unsharded_class(fsdp_class)
        try:
            yield
        finally:
            self.model.__class__ = fsdp_class
            for module, leaf, param in restore:
                module._parameters[leaf] = param

    def release_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the AdamW moments before the final gather: rank 0 then holds its shards plus one
        whole copy of the weights, never the moments on top."""
        optimizer.state.clear()


def _return_large_blocks() -> None:
    """CPU: every layer's gathered weights, and the activations of every step, are allocated and
    freed again each forward and backward. glibc raises its mmap threshold after the first such
    free and from then on keeps the blocks in its heap, so the process's RSS grows by the
    gathered bytes step after step (measured: 2.78 GB instead of 3.53 GB peak after two SmolLM2
    steps with the threshold fixed at 1 MiB). A threshold fixed at 128 KiB also returns the
    activations (a row of 128 tokens x 576 floats is 288 KiB) instead of leaving the heap
    fragmented: peak RSS per rank over 6 SmolLM2 full fine-tuning steps 1915 MB vs 2142 MB with
    1 MiB, for ~8% of the job's tokens/s (69.0 vs 74.7, means of 3 alternated runs: fresh pages
    fault in each step; 256 KiB: 1940 MB, no faster).
    Large blocks stay mmapped, returned to the OS when freed."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD


def _unsharded_class(cls: type) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def build_parallel(model: nn.Module, dist: Distributed, setting: str, *, bf16: bool,
                   cpu_offload: bool = False) -> Replicated:
    """Wrap `model` (already on its device) for train.distributed = `setting`."""
    mode = resolve_mode(setting, dist)
    if mode == "fsdp":
        return Sharded(model, dist, bf16, cpu_offload)
    return Replicated(model, dist)


def describe(parallel: Any) -> str | None:
    if not parallel.dist.enabled:
        return None
    return "fsdp" if parallel.sharded else "ddp"
