"""The running batch of the continuous engine: rows, their KV cache, one forward per step.

Rows join after a prefill of their prompts (all rows admitted at one step prefill together) and
leave the moment they finish. Every row runs through its own adapter: LoRA rows and base rows
share each forward through `mixed_adapters`; an adapter of another method (bottleneck adapters,
prompt methods, ...) changes every row alike, so while one runs the batch holds only its rows
(the batch's `group`: "mixed" or that adapter's name).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from deltatune.deltas import disable_adapters, set_adapter
from deltatune.methods.base import delta_state
from deltatune.methods.lora_rows import fixed_adapter_weights
from deltatune.mixed import MIXABLE_METHODS, mixed_adapters
from deltatune.serving import kvcache
from deltatune.serving.adapter_pool import AdapterPool
from deltatune.serving.job import Job

MIXED = "mixed"
_SEVERAL = object()  # rows of more than one adapter (an adapter may well be named "mixed")


@dataclass
class Row:
    job: Job
    generator: torch.Generator | None
    last_token: int = 0


@contextlib.contextmanager
def adapters_for(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Each row through its adapter. One adapter for all rows takes the plain path when it is the
    active one; switching the active adapter walks the whole model (~40 ms on SmolLM2 with 8
    adapters), so a LoRA or (IA)³ adapter that is not active runs as a mixed batch instead (a
    prefill group of one request, a batch whose rows all use one adapter for a moment)."""
    state = delta_state(model)
    single = names[0] if len(set(names)) == 1 else _SEVERAL
    if single is None:
        with disable_adapters(model):
            yield
    elif single is not _SEVERAL and state.active == single and not state.disabled:
        yield
    elif single is _SEVERAL or state.configs[single].method in MIXABLE_METHODS:
        # served adapters change as whole modules (the pool loads and evicts), never in place
        with mixed_adapters(model, names), fixed_adapter_weights():
            yield
    else:
        set_adapter(model, single)
        yield


class RunningBatch:
    def __init__(self, model: nn.Module, pool: AdapterPool, pad_id: int) -> None:
        self.model, self.pool, self.pad_id = model, pool, pad_id
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.steps = 0          # statistics, for tests and benchmarks
        self.mixed_steps = 0    # steps whose rows used more than one adapter
        self.joins_while_running = 0

    @property
    def group(self) -> str | None:
        return self.group_of(self.rows[0].job.adapter) if self.rows else None

    def group_of(self, adapter: str | None) -> str:
        method = self.pool.method(adapter)
        return MIXED if method is None or method in MIXABLE_METHODS else adapter

    def prefill(self, rows: list[Row]) -> tuple[torch.Tensor, object, torch.Tensor]:
        """Logits of each new row's last prompt token, with the new rows' own cache and mask."""
        width = max(len(row.job.prompt_ids) for row in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r.job.prompt_ids)) + r.job.prompt_ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.job.prompt_ids)) + [1] * len(r.job.prompt_ids) for r in rows])
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = kvcache.new_cache(self.model)
        with adapters_for(self.model, [r.job.adapter for r in rows]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=kvcache.positions(mask, width),
                             cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache, mask

    def join(self, rows: list[Row], keep: list[int], cache, mask: torch.Tensor) -> None:
        """Add `rows[i] for i in keep` (still running after their first token) to the batch."""
        if not keep:
            return
        if len(keep) < len(rows):
            cache, mask = kvcache.keep_rows(cache, mask, keep)
        self.joins_while_running += bool(self.rows)
        self.cache, self.mask = kvcache.merge(self.cache, self.mask, cache, mask)
        self.rows += [rows[i] for i in keep]

    def step(self) -> torch.Tensor:
        """One forward of every row's last token: logits (rows, vocab)."""
        ids = torch.tensor([[row.last_token] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        names = [row.job.adapter for row in self.rows]
        self.steps += 1
        self.mixed_steps += len(set(names)) > 1
        with adapters_for(self.model, names):
            out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=kvcache.positions(self.mask, 1),
                             cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def keep(self, indices: list[int]) -> None:
        """Only rows[i] for i in `indices` stay."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if self.rows:
            self.cache, self.mask = kvcache.keep_rows(self.cache, self.mask, indices)
        else:
            self.cache, self.mask = None, None
