"""Swapping adapters under --max-adapters: which resident adapter drains for a waiting one, that a
draining adapter only takes jobs that end before its running rows, that an adapter with rows in
flight is never evicted and that nobody starves; greedy ids still equal generate()'s.

Reuses test_serve_continuous's tiny float64 Llama and its four saved LoRA adapters.
"""
from __future__ import annotations

import copy
import time
from collections import Counter

from test_serve_continuous import PROMPTS, library_ids, setup  # noqa: F401 (setup: the fixture)

from deltatune.serving import engine as engine_module
from deltatune.serving.adapter_pool import AdapterPool
from deltatune.serving.engine import ContinuousEngine, Job
from deltatune.serving.scheduler import Row


def pool_with(setup, resident: dict[str, int], max_adapters: int) -> AdapterPool:
    """A pool holding `resident` adapters, each with that many rows in flight."""
    pool = AdapterPool(copy.deepcopy(setup["base"]), "tiny", adapter_dir=setup["dir"], max_adapters=max_adapters)
    for name, rows in resident.items():
        for _ in range(rows):
            assert pool.acquire(name)
    return pool


def test_plan_drain_swaps_by_demand(setup):
    # "b" holds 1 job (running), "a" 2: three waiting for "c" outweigh "b" -> "b" drains
    pool = pool_with(setup, {"a": 2, "b": 1}, max_adapters=2)
    pool.plan_drain(Counter(c=3), left={"a": 5, "b": 9})
    assert pool.draining == "b"
    # one job for "c" does not outweigh "b"'s one running row...
    pool = pool_with(setup, {"a": 2, "b": 1}, max_adapters=2)
    pool.plan_drain(Counter(c=1), left={"a": 5, "b": 9})
    assert pool.draining is None
    # ...unless it waited too long (urgent); ties go to the adapter whose rows end soonest
    pool = pool_with(setup, {"a": 1, "b": 1}, max_adapters=2)
    pool.plan_drain(Counter(c=1), left={"a": 7, "b": 3}, urgent={"c"})
    assert pool.draining == "b"
    # waiting jobs count for the resident adapter too: "a" (1 running + 3 waiting) stays
    pool = pool_with(setup, {"a": 1, "b": 2}, max_adapters=2)
    pool.plan_drain(Counter(a=3, c=3), left={"a": 1, "b": 9})
    assert pool.draining == "b"
    # an idle slot (no rows in flight) or a free one: nothing drains, acquire just takes it
    pool = pool_with(setup, {"a": 2, "b": 0}, max_adapters=2)
    pool.plan_drain(Counter(c=5), left={"a": 5})
    assert pool.draining is None
    pool = pool_with(setup, {"a": 2}, max_adapters=2)
    pool.plan_drain(Counter(c=5), left={"a": 5})
    assert pool.draining is None


def test_draining_adapter_takes_only_jobs_that_end_before_its_rows(setup):
    model, tokenizer = copy.deepcopy(setup["base"]), setup["tokenizer"]
    pool = AdapterPool(model, "tiny", adapter_dir=setup["dir"], max_adapters=1)
    engine = ContinuousEngine(model, tokenizer, pool, max_batch=8)  # not started: _admit by hand
    ids = tokenizer("hi").input_ids
    running = Job(prompt_ids=ids, adapter="a", max_tokens=10)
    running.token_ids = [5] * 4  # 6 tokens still to come
    assert pool.acquire("a")
    engine.batch.rows = [Row(running, None)]
    pool.draining = "a"  # (as plan_drain would mark it with more jobs waiting for "b")
    engine.waiting = [Job(prompt_ids=ids, adapter=a, max_tokens=k) for a, k in
                      [("b", 4), ("b", 4), ("a", 8), ("a", 7), ("a", 3)]]
    rows = engine._admit()
    # 7 tokens = the first from the prefill + 6 steps: ends with the running row; 8 would not
    assert [(r.job.adapter, r.job.max_tokens) for r in rows] == [("a", 7), ("a", 3)]
    assert [(j.adapter, j.max_tokens) for j in engine.waiting] == [("b", 4), ("b", 4), ("a", 8)]


def test_busy_adapter_never_evicted_and_nobody_starves(setup, monkeypatch):
    """One slot; jobs for "a" keep coming (8 in the engine at any time, so "a" always outweighs
    the one job for "b" and demand alone would keep it resident until they stop): the "b" job is
    served once it has waited STARVING_S, long before the stream ends; no adapter leaves with
    rows in flight; every greedy reply equals generate()'s."""
    monkeypatch.setattr(engine_module, "STARVING_S", 0.05)
    model, tokenizer = copy.deepcopy(setup["base"]), setup["tokenizer"]
    pool = AdapterPool(model, "tiny", adapter_dir=setup["dir"], max_adapters=1)
    evicted_busy = []
    evict = pool._evict

    def checked_evict(name):
        if pool.in_use[name]:
            evicted_busy.append(name)
        evict(name)

    monkeypatch.setattr(pool, "_evict", checked_evict)
    engine = ContinuousEngine(model, tokenizer, pool, max_batch=4)

    def job(adapter, i):
        return Job(prompt_ids=tokenizer(PROMPTS[i % 4]).input_ids, adapter=adapter, max_tokens=6 + i % 5)

    engine.start()
    try:
        a_jobs = [engine.submit(job("a", i)) for i in range(4)]
        while not a_jobs[0].token_ids:  # "a" is resident and running
            time.sleep(0.001)
        b = engine.submit(job("b", 1))
        while len(a_jobs) < 160:
            if sum(j.finish_reason is None for j in a_jobs) < 8:
                a_jobs.append(engine.submit(job("a", len(a_jobs))))
            time.sleep(0.0005)
        for j in a_jobs + [b]:
            j.result(timeout=120)
    finally:
        engine.stop()
    assert b.finish_reason == "length" and not evicted_busy
    assert sum(j.finished_at > b.finished_at for j in a_jobs) >= 40  # "b" did not wait for the stream
    for j in a_jobs[::7] + [b]:
        assert j.token_ids == library_ids(setup, j.adapter, j.prompt_ids, j.max_tokens), j.adapter
