"""What both engines share: the bounded waiting list, graceful stop, calls run on the engine
thread between steps, the adapter pool, metrics, and the tokenizer lock.

Only the engine thread runs the model or changes its adapters; request handlers submit Jobs and
hand model changes (load/unload an adapter) to `call()`, which the engine thread runs between
two steps.
"""
from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.serving.adapter_pool import AdapterPool
from deltatune.serving.job import Job, TextTracker
from deltatune.serving.metrics import ServingMetrics


class QueueFull(Exception):
    """The waiting list is at --max-queue: the caller should retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({depth} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    """The engine is shutting down and takes no new requests."""


class EngineCore:
    def __init__(self, model: nn.Module, tokenizer, pool: AdapterPool | None = None,
                 max_batch: int = 32, max_queue: int | None = None,
                 metrics: ServingMetrics | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise DeltatuneError(f"serve: max_batch must be a positive integer, got {max_batch!r}")
        if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int)
                                      or max_queue < 1):
            raise DeltatuneError(f"serve: max_queue must be a positive integer, got {max_queue!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.metrics = metrics or (pool.metrics if pool is not None else ServingMetrics())
        self.pool = pool or AdapterPool(model, str(getattr(model, "name_or_path", None) or "base"),
                                        metrics=self.metrics)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # A fast tokenizer's Rust state is not safe to share between threads (request handlers
        # encode while this engine decodes): every use goes through this lock.
        self.tokenizer_lock = threading.Lock()
        self.tracker = TextTracker(self.decode, self.eos_ids, on_finish=self._finished)
        self.cond = threading.Condition()
        self.waiting: list[Job] = []
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.stopping = False
        self.running_rows = 0
        self.thread: threading.Thread | None = None
        self.metrics.gauge("deltatune_queue_depth", "Requests waiting to join the batch.", self.queue_depth)
        self.metrics.gauge("deltatune_running_batch_size", "Rows in the running batch.", lambda: self.running_rows)
        self.metrics.gauge("deltatune_adapters_resident", "Adapters in the model now.", self.pool.resident_count)

    # ------------------------------------------------------------ any thread
    def start(self) -> None:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._work, name="deltatune-engine", daemon=True)
            self.thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new jobs; with `drain`, finish every waiting and running job first."""
        with self.cond:
            self.stopping = True
            if not drain:
                for job in self.waiting:
                    job.cancelled = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            self.thread = None

    def submit(self, job: Job) -> Job:
        """Queue `job` (raises QueueFull or Draining); its events tell how it goes."""
        with self.cond:
            if self.stopping:
                raise Draining("the server is shutting down")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFull(len(self.waiting), self.retry_after())
            job.submitted = time.monotonic()
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def queue_depth(self) -> int:
        return len(self.waiting)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved: mean latency x batches ahead, 1..60."""
        latency = self.metrics.latency
        mean = latency.total / latency.count if latency.count else 1.0
        return int(min(60, max(1, math.ceil(mean * len(self.waiting) / self.max_batch))))

    def call(self, fn: Callable[[], Any], timeout: float | None = 600) -> Any:
        """Run `fn` on the engine thread between two steps (model changes); its result."""
        if self.thread is None or not self.thread.is_alive():
            return fn()
        future: Future = Future()
        with self.cond:
            self.calls.append((fn, future))
            self.cond.notify_all()
        return future.result(timeout)

    def decode(self, token_ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------ engine thread
    def _run_calls(self) -> None:
        with self.cond:
            calls, self.calls = self.calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed back to the caller
                future.set_exception(exc)

    def _take_waiting(self, jobs: list[Job]) -> None:
        with self.cond:
            taken = {id(job) for job in jobs}
            self.waiting = [job for job in self.waiting if id(job) not in taken]

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        gone = [job for job in list(self.waiting) if job.cancelled or job.expired(now)]
        for job in gone:
            if job.cancelled:
                self.tracker.finish(job, "cancelled", flush=False)
            else:
                self.tracker.fail(job, f"the request timed out after {job.timeout:g} s in the queue", "timeout")
        if gone:
            self._take_waiting(gone)

    def _idle_wait(self, seconds: float) -> None:
        with self.cond:
            if not self.calls and not self.stopping:
                self.cond.wait(seconds)

    def _finished(self, job: Job) -> None:
        end = job.finished_at or time.monotonic()
        ttft = job.first_token_at - job.submitted if job.first_token_at is not None else None
        self.metrics.finished(job.adapter or self.pool.base_name, job.finish_reason or "stop",
                              len(job.prompt_ids), len(job.token_ids), ttft, end - job.submitted)

    def _fail_all(self, jobs: list[Job], exc: Exception) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for job in jobs:
            self.tracker.fail(job, f"generation failed: {message}")

    def _work(self) -> None:
        raise NotImplementedError
