"""The static batching engine (`deltatune serve --engine static`): the comparison baseline.

Requests wait a few milliseconds; the worker then takes everything that arrived (up to
`max_batch`), groups what can share one generate() call (same sampling settings; any mix of LoRA
adapters and the base through `mixed_adapters`, other methods one adapter per call) and runs each
group to its end as one left-padded batch: a request arriving meanwhile waits for the slowest row.
Adapters load at their first request and are never evicted (no --max-adapters here).
"""
from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from deltatune.serving.core import EngineCore
from deltatune.serving.job import Job, TextTracker
from deltatune.serving.scheduler import MIXED, adapters_for
from deltatune.mixed import MIXABLE_METHODS


class RowTracker(StoppingCriteria):
    """Called by generate() after every step: hands each live row's new token to its job and
    tells generate() which rows are finished (EOS, stop string, max_tokens, client gone)."""

    def __init__(self, jobs: list[Job], tracker: TextTracker) -> None:
        self.jobs, self.tracker = jobs, tracker

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for job, token in zip(self.jobs, input_ids[:, -1].tolist()):
            if job.finish_reason is None:
                self.tracker.advance(job, token)
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)


class StaticEngine(EngineCore):
    def __init__(self, *args, batch_wait_ms: float = 5.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool.max_adapters = None
        self.batch_wait = batch_wait_ms / 1000
        self.batches_run = 0          # statistics, for tests and benchmarks
        self.rows_run = 0
        self.mixed_batches = 0        # batches whose rows used more than one adapter
        self.generate_seconds = 0.0   # time spent inside generate()
        self.busy = False             # a batch is being generated right now

    def _collect(self) -> list[Job]:
        with self.cond:
            while not self.waiting and not self.stopping and not self.calls:
                self.cond.wait(0.1)
            deadline = time.monotonic() + self.batch_wait
            while self.waiting and len(self.waiting) < self.max_batch and not self.stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
            jobs = self.waiting[: self.max_batch]
            self.waiting = self.waiting[self.max_batch:]
        return jobs

    def _work(self) -> None:
        while True:
            self._run_calls()
            self._expire_waiting()
            jobs = self._collect()
            if not jobs:
                if self.stopping and not self.waiting:
                    return
                continue
            ready = []
            for job in jobs:
                try:
                    self.pool.acquire(job.adapter)
                    ready.append(job)
                except Exception as exc:
                    self.tracker.fail(job, f"adapter {job.adapter!r} could not be loaded: {exc}")
            for group in self._groups(ready):
                try:
                    self._generate(group)
                except Exception as exc:  # one bad batch must not take the server down
                    self._fail_all(group, exc)
                finally:
                    for job in group:
                        self.pool.release(job.adapter)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            method = self.pool.method(job.adapter)
            kind = MIXED if method is None or method in MIXABLE_METHODS else job.adapter
            groups.setdefault((job.sampling_key(), kind), []).append(job)
        return list(groups.values())

    def _generate(self, jobs: list[Job]) -> None:
        width = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        first = jobs[0]
        sampling = {} if first.temperature == 0 else dict(temperature=first.temperature,
                                                           top_p=first.top_p, top_k=0)
        # eos_token_id=[]: the tracker ends rows itself (some may ignore EOS); generate stops when
        # every row is finished. (None would be filled in from the model's generation_config.)
        config = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs), do_sample=bool(sampling),
                                  pad_token_id=self.pad_id, eos_token_id=[], **sampling)
        device = next(self.model.parameters()).device
        if first.seed is not None:
            torch.manual_seed(first.seed)
        self.batches_run += 1  # counted before generating: replies go out while it runs
        self.rows_run += len(jobs)
        self.mixed_batches += len({j.adapter for j in jobs}) > 1
        self.running_rows, self.busy, start = len(jobs), True, time.perf_counter()
        try:
            with torch.inference_mode(), adapters_for(self.model, [j.adapter for j in jobs]):
                self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config,
                                    stopping_criteria=StoppingCriteriaList([RowTracker(jobs, self.tracker)]))
        finally:
            self.running_rows, self.busy = 0, False
            self.generate_seconds += time.perf_counter() - start
        for job in jobs:  # generate() ended (max_new_tokens) before the tracker saw an end
            if job.finish_reason is None:
                self.tracker.finish(job, "length")
