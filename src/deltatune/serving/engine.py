"""The serving engine: a batching queue in front of one model carrying many adapters.

Requests wait a few milliseconds in a queue; the worker thread then takes everything that
arrived (up to `max_batch`), groups what can share one generate() call — same sampling settings;
any mix of LoRA adapters and the base through `mixed_adapters`, other methods one adapter per
call — and runs each group as one left-padded batch. Tokens go back to each request as they are
produced (for streaming), through the request's asyncio queue.
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from deltatune.deltas import disable_adapters, set_adapter
from deltatune.methods.base import delta_state
from deltatune.mixed import MIXABLE_METHODS, mixed_adapters


@dataclass
class Job:
    """One completion request on its way through the engine."""

    prompt_ids: list[int]
    adapter: str | None          # None: the base model
    max_tokens: int
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None   # ("text", str) ... then ("done", reason) or ("error", msg)
    # filled in by the worker
    token_ids: list[int] = field(default_factory=list)
    text: str = ""               # text handed out so far
    finish_reason: str | None = None
    cancelled: bool = False      # the client went away: stop spending compute on this row

    def sampling_key(self) -> tuple:
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)

    def send(self, *event) -> None:
        if self.loop is None or self.events is None:
            return
        with contextlib.suppress(RuntimeError):  # the server's loop is already closed
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still turn into a stop string (or an unfinished
    multi-byte character), and so must not be streamed yet."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class RowTracker(StoppingCriteria):
    """Called by generate() after every step: hands each live row's new token to its job and
    tells generate() which rows are finished (EOS, stop string, max_tokens, client gone)."""

    def __init__(self, jobs: list[Job], tokenizer, eos_ids: set[int], tokenizer_lock: threading.Lock) -> None:
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.tokenizer_lock = tokenizer_lock

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new_tokens = input_ids[:, -1].tolist()
        for job, token in zip(self.jobs, new_tokens):
            if job.finish_reason is None:
                self._advance(job, token)
        return torch.tensor([job.finish_reason is not None for job in self.jobs], device=input_ids.device)

    def _advance(self, job: Job, token: int) -> None:
        if job.cancelled:
            job.finish_reason = "cancelled"
            return
        if token in self.eos_ids and not job.ignore_eos:
            self.finish(job, "stop")
            return
        job.token_ids.append(token)
        text = self.decode(job.token_ids)
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                self._emit(job, text[:at])
                self.finish(job, "stop", flush=False)
                return
        if len(job.token_ids) >= job.max_tokens:
            self._emit(job, text)
            self.finish(job, "length", flush=False)
            return
        self._emit(job, text[: len(text) - held_back(text, job.stop)])

    def decode(self, token_ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _emit(self, job: Job, text: str) -> None:
        if text.startswith(job.text) and len(text) > len(job.text):
            job.send("text", text[len(job.text):])
            job.text = text

    def finish(self, job: Job, reason: str, flush: bool = True) -> None:
        if flush:
            self._emit(job, self.decode(job.token_ids))
        job.finish_reason = reason
        job.send("done", reason)


class BatchingEngine:
    """Owns the model: only its worker thread runs it, so requests never race on adapter state."""

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 8, batch_wait_ms: float = 5.0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.queue: queue.Queue[Job | None] = queue.Queue()
        # A fast tokenizer's Rust state is not safe to share between threads (request handlers
        # encode while this engine decodes): every use goes through this lock.
        self.tokenizer_lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.batches_run = 0          # statistics, for tests and benchmarks
        self.rows_run = 0
        self.mixed_batches = 0        # batches whose rows used more than one adapter
        self.generate_seconds = 0.0   # time spent inside generate()
        self.busy = False             # a batch is being generated right now

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="deltatune-engine", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=30)
            self.thread = None

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    # ---------------------------------------------------------------- worker thread
    def _collect(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=max(remaining, 0)) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # stop after this batch
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            for group in self._groups(jobs):
                try:
                    self._generate(group)
                except Exception as exc:  # one bad batch must not take the server down
                    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    for job in group:
                        if job.finish_reason is None:
                            job.finish_reason = "error"
                            job.send("error", f"generation failed: {message}")

    def _mixable(self, adapter: str | None) -> bool:
        configs = delta_state(self.model).configs
        return adapter is None or configs[adapter].method in MIXABLE_METHODS

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            adapter_key = "mixed" if self._mixable(job.adapter) else job.adapter
            groups.setdefault((job.sampling_key(), adapter_key), []).append(job)
        return list(groups.values())

    @contextlib.contextmanager
    def _adapters(self, names: list[str | None]) -> Iterator[None]:
        if len(set(names)) > 1:
            with mixed_adapters(self.model, names):
                yield
        elif names[0] is None:
            with disable_adapters(self.model):
                yield
        else:
            set_adapter(self.model, names[0])
            yield

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
        tracker = RowTracker(jobs, self.tokenizer, self.eos_ids, self.tokenizer_lock)
        device = next(self.model.parameters()).device
        if first.seed is not None:
            torch.manual_seed(first.seed)
        self.batches_run += 1  # counted before generating: replies go out while it runs
        self.rows_run += len(jobs)
        self.mixed_batches += len({j.adapter for j in jobs}) > 1
        start, self.busy = time.perf_counter(), True
        try:
            with torch.inference_mode(), self._adapters([j.adapter for j in jobs]):
                self.model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    generation_config=config,
                                    stopping_criteria=StoppingCriteriaList([tracker]))
        finally:
            self.generate_seconds += time.perf_counter() - start
            self.busy = False
        for job in jobs:  # generate() ended (max_new_tokens) before the tracker saw an end
            if job.finish_reason is None:
                tracker.finish(job, "length")
