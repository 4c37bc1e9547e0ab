"""The continuous-batching engine: one model, many adapters, rows joining and leaving every step.

In-process use (the web UI's playground, notebooks, tests) needs no HTTP:

    from deltatune.serving.engine import ContinuousEngine, Job
    from deltatune.serving.adapter_pool import AdapterPool

    pool = AdapterPool(model, "base", adapters={"sst2": "runs/sst2/adapter"},
                       adapter_dir="adapters/", max_adapters=4)     # both optional
    engine = ContinuousEngine(model, tokenizer, pool, max_batch=32, max_queue=256)
    engine.start()
    job = engine.submit(Job(prompt_ids=tokenizer("Hello").input_ids, adapter="sst2",
                            max_tokens=32, temperature=0.0, stop=["\\n"]))
    for piece in job.stream():          # text pieces as they are generated (blocking)
        print(piece, end="")
    text, reason = job.result()         # or: the whole text and "stop" / "length"
    job.token_ids                       # the generated ids (job.token_logprobs with logprobs=k)
    job.cancelled = True                # drops the row at the next step
    engine.stop()                       # finishes what is queued or running, then returns

Inside a running asyncio loop use `Job.for_loop(...)` and `await job.events.get()` for
("text", piece) ... ("done", reason) | ("error", message). `submit` raises core.QueueFull when
`max_queue` jobs are waiting and core.Draining after stop(). Load or unload adapters while it runs
with `engine.call(lambda: ...)`, which runs on the engine thread between two steps.

Each step the engine thread: runs pending calls; drops cancelled or timed-out waiting jobs;
admits waiting jobs while the batch has room (resident adapters' jobs first, then the adapter
most jobs wait for; loading adapters as needed and, with every slot busy, swapping one out by
demand: adapter_pool.plan_drain) and prefills them together;
then runs one decoding step of the whole batch, hands each row its token and drops finished rows. Greedy rows produce exactly the tokens of the
library's generate() for their adapter (see kvcache for why).
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from deltatune.errors import DeltatuneError
from deltatune.serving.core import Draining, EngineCore, QueueFull
from deltatune.serving.job import GenerationFailed, Job
from deltatune.serving.sampling import next_tokens, row_generator
from deltatune.serving.scheduler import Row, RunningBatch

__all__ = ["ContinuousEngine", "Job", "QueueFull", "Draining", "GenerationFailed"]

# These change the sequence itself (virtual tokens, prefixes), which the shared padded cache
# cannot hold per row; the static engine (generate()) serves them.
SEQUENCE_METHODS = ("prompt", "ptuning", "prefix")
# About this many prompt tokens are prefilled between two decoding steps (one prompt at least),
# so a burst of long prompts delays the running rows by one bounded prefill at a time.
PREFILL_TOKENS = 4096
# A job waiting this long is admitted before any other (arrival order among such jobs), whatever
# the adapters resident: the priority for resident adapters below must not starve anyone.
STARVING_S = 10.0


class ContinuousEngine(EngineCore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch = RunningBatch(self.model, self.pool, self.pad_id)

    # statistics for tests and benchmarks
    @property
    def steps(self) -> int:
        return self.batch.steps

    @property
    def mixed_steps(self) -> int:
        return self.batch.mixed_steps

    @property
    def joins_while_running(self) -> int:
        return self.batch.joins_while_running

    def _admit(self) -> list[Row]:
        """Waiting jobs that join now (see the order below); stops at the first job that needs a
        different kind of batch (so that kind gets its turn once the batch drains)."""
        room = self.max_batch - len(self.batch.rows)
        group = self.batch.group
        admitted: list[Row] = []
        dropped: list[Job] = []
        tokens = 0
        with self.cond:
            candidates = list(self.waiting)
        demand = Counter(job.adapter for job in candidates)
        wanted = frozenset(demand)
        now = time.monotonic()
        left = self._tokens_left()
        starving = {job.adapter for job in candidates if now - job.submitted >= STARVING_S}
        self.pool.plan_drain(demand, left, starving)
        # Jobs of resident adapters first, then those of the adapter most jobs wait for (it takes
        # the next free slot), arrival order within each; a job waiting STARVING_S goes first.
        # Under swapping this keeps the batch fuller: what can run now runs, and a freed slot
        # goes where it lets the most rows join.
        def priority(job: Job) -> tuple:
            if now - job.submitted >= STARVING_S:
                return (0,)  # arrival order among these, whatever their adapter
            resident = self.pool.is_resident(job.adapter)
            return 1, not resident, 0 if resident else -demand[job.adapter]

        candidates.sort(key=priority)  # stable: arrival order within equal priority
        for job in candidates:
            if room <= 0:
                break
            # A draining adapter takes only jobs that end no later than its running rows do.
            if job.adapter is not None and job.adapter == self.pool.draining \
                    and job.max_tokens - 1 > left.get(job.adapter, 0):
                continue
            try:
                if not self.pool.acquire(job.adapter, wanted):
                    continue
            except DeltatuneError as exc:
                self.tracker.fail(job, f"adapter {job.adapter!r} could not be loaded: {exc}")
                dropped.append(job)
                continue
            if self.pool.method(job.adapter) in SEQUENCE_METHODS:
                self.pool.release(job.adapter)
                self.tracker.fail(job, f"adapter {job.adapter!r} ({self.pool.method(job.adapter)}) "
                                       f"changes the input sequence; serve it with --engine static")
                dropped.append(job)
                continue
            kind = self.batch.group_of(job.adapter)
            tokens += len(job.prompt_ids)
            if (group is not None and kind != group) or (admitted and tokens > PREFILL_TOKENS):
                self.pool.release(job.adapter)  # another kind of batch, or prefill enough for one step
                break
            group = kind
            admitted.append(Row(job, row_generator(job, job.choice)))
            left[job.adapter] = max(left.get(job.adapter, 0), job.max_tokens - 1)
            room -= 1
        self._take_waiting(dropped + [row.job for row in admitted])
        return admitted

    def _tokens_left(self) -> dict[str | None, int]:
        """Per adapter, the most decoding steps any of its running rows may still take."""
        left: dict[str | None, int] = {}
        for row in self.batch.rows:
            job = row.job
            left[job.adapter] = max(left.get(job.adapter, 0), job.max_tokens - len(job.token_ids))
        return left

    def _prefill_groups(self, rows: list[Row]) -> list[list[Row]]:
        """The admitted rows by prompt length, in groups of at most PREFILL_TOKENS padded tokens
        with at most half as much padding as real tokens: padding costs prefill compute like real
        tokens do, and so does each extra forward call."""
        groups: list[list[Row]] = []
        real = 0
        for row in sorted(rows, key=lambda r: len(r.job.prompt_ids)):
            length = len(row.job.prompt_ids)
            padded = length * (len(groups[-1]) + 1) if groups else 0
            if not groups or padded > PREFILL_TOKENS or padded > 1.5 * (real + length):
                groups.append([row])
                real = length
            else:
                groups[-1].append(row)
                real += length
        return groups

    def _first_tokens(self, rows: list[Row]) -> None:
        start = time.perf_counter()
        for group in self._prefill_groups(rows):
            try:
                self._prefill(group)
            except Exception as exc:  # one bad prefill must not take the server down
                self._fail_batch(group, exc)
            self.metrics.prefill_forwards.inc()
        self.metrics.engine_seconds.inc("prefill", by=time.perf_counter() - start)

    def _prefill(self, rows: list[Row]) -> None:
        logits, cache, mask = self.batch.prefill(rows)
        self.batch.join(rows, self._advance(rows, logits), cache, mask)

    def _decode(self) -> None:
        start = time.perf_counter()
        rows = self.batch.rows
        logits = self.batch.step()
        self.metrics.decode_steps.inc()
        self.batch.keep(self._advance(rows, logits))
        self.metrics.engine_seconds.inc("decode", by=time.perf_counter() - start)

    def _advance(self, rows: list[Row], logits) -> list[int]:
        """Each row takes its next token; the indices of the rows that go on (finished rows
        give their adapter back to the pool)."""
        tokens = next_tokens(logits, [r.job for r in rows], [r.generator for r in rows])
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            row.last_token = token
            if self.tracker.advance(row.job, token):
                self.pool.release(row.job.adapter)
            else:
                keep.append(i)
        return keep

    def _fail_batch(self, rows: list[Row], exc: Exception) -> None:
        self._fail_all([row.job for row in rows], exc)
        for row in rows:
            self.pool.release(row.job.adapter)

    def _work(self) -> None:
        while True:
            self._run_calls()
            self._expire_waiting()
            if self.stopping and not self.waiting and not self.batch.rows:
                return
            admitted = self._admit()
            with torch.inference_mode():
                if admitted:
                    self._first_tokens(admitted)
                if self.batch.rows:
                    try:
                        self._decode()
                    except Exception as exc:
                        self._fail_batch(self.batch.rows, exc)
                        self.batch.keep([])
            self.running_rows = len(self.batch.rows)
            self.pool.sweep()
            if not self.batch.rows and not admitted:
                start = time.perf_counter()
                self._idle_wait(0.05 if not self.waiting else 0.005)
                self.metrics.engine_seconds.inc("idle", by=time.perf_counter() - start)
