"""What a training run holds between its steps: where it is (saved in every checkpoint), the
metrics window, and the run's parts (built once by the loop's `_setup`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config.run import RunConfig, TrainConfig
from deltatune.training.distributed import Distributed
from deltatune.training.optimization import BatchStream
from deltatune.training.progress import RunLog
from deltatune.training.sharding import Replicated


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    step: int = 0                 # optimizer steps done
    batch: int = 0                # global batches consumed (the data position)
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    # [step, why it shows nothing learned (None: it shows something)] per evaluation (collapse.py)
    evaluations: list = field(default_factory=list)


@dataclass
class Window:
    """What the next metrics.jsonl line averages over (reset after each log line)."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    """Everything one training run holds between its steps (built once by `_setup`)."""

    config: RunConfig
    tokenizer: Any
    dist: Distributed
    run_dir: Path
    final_dir: Path
    model: nn.Module              # the bare model (sharded in place under fsdp): saved, evaluated
    parallel: Replicated          # how it is spread over the ranks; .forward is what a step calls
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[torch.Tensor]
    stream: BatchStream
    total_steps: int
    lr: float
    collator: Any
    eval_collator: Any
    train_dataset: Any
    eval_dataset: Any
    bf16: bool
    metric: str
    log: RunLog
    progress: Progress
    started: float
    window: Window = field(default_factory=Window)

    @property
    def tc(self) -> TrainConfig:
        return self.config.train
