"""Evicted adapters reload from memory: detach_adapter / attach_adapter and the pool's cache."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import randomize_trainable, tiny_llama, token_batch

import deltatune as dt
import deltatune.adapters_io as adapters_io
from deltatune.deltas import attach_adapter, detach_adapter
from deltatune.serving.adapter_pool import AdapterPool

TARGETS = {"a": ["q_proj", "v_proj"], "b": ["v_proj", "o_proj"], "c": ["q_proj"]}


@pytest.fixture()
def saved(tmp_path):
    base = tiny_llama().double()
    for seed, (name, targets) in enumerate(TARGETS.items()):
        model = dt.apply(copy.deepcopy(base), dt.LoraConfig(r=2 + seed, target_modules=targets), name)
        randomize_trainable(model, seed=10 + seed, std=0.3)
        dt.save_adapter(model, tmp_path / name, name=name)
    return base, tmp_path


def logits(model, names) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch(len(names), 6), adapter_names=names).logits


def fresh(base, directory, names) -> torch.Tensor:
    """The same rows on a fresh copy of the base with the adapters loaded from disk."""
    model = copy.deepcopy(base)
    for name in dict.fromkeys(n for n in names if n is not None):
        dt.load_adapter(model, directory / name, name=name)
    return logits(model, names)


@pytest.fixture()
def disk_loads(monkeypatch):
    calls = []
    real = adapters_io.load_adapter
    monkeypatch.setattr(adapters_io, "load_adapter", lambda *a, **k: calls.append(k.get("name")) or real(*a, **k))
    return calls


def with_keeper(base):
    """A copy of the base carrying adapter "keep" on every linear layer, so that removing another
    adapter never unwraps a layer."""
    model = copy.deepcopy(base)
    dt.apply(model, dt.LoraConfig(r=2), "keep")
    randomize_trainable(model, seed=7, std=0.3)
    return model


def test_detach_then_attach_is_the_same_adapter(saved):
    base, directory = saved
    model = with_keeper(base)
    for name in ("a", "b"):
        dt.load_adapter(model, directory / name, name=name)
    names = ["a", "b", None]
    before = logits(model, names)
    detached = detach_adapter(model, "a")
    assert dt.adapter_names(model) == ["keep", "b"] and detached.nbytes() > 0
    assert attach_adapter(model, detached)
    assert sorted(dt.adapter_names(model)) == ["a", "b", "keep"]
    torch.testing.assert_close(logits(model, names), before, rtol=0, atol=0)
    dt.set_adapter(model, "a")  # and it is a normal adapter again: switchable, deletable
    dt.delete_adapter(model, "a")


def test_attach_refuses_when_its_layers_were_unwrapped(saved):
    base, directory = saved
    model = copy.deepcopy(base)
    dt.load_adapter(model, directory / "c", name="c")
    detached = detach_adapter(model, "c")  # the last adapter: every layer unwrapped
    assert not attach_adapter(model, detached)
    assert dt.adapter_names(model) == []


def pool_with_keeper(base, directory, **options) -> AdapterPool:
    """A pool over a model that already carries "keep" (pinned: never evicted), so every eviction
    can be attached again."""
    return AdapterPool(with_keeper(base), "base", adapter_dir=directory, **options)


def test_pool_reloads_an_evicted_adapter_from_memory(saved, disk_loads):
    base, directory = saved
    pool = pool_with_keeper(base, directory, max_adapters=2)
    for name in ("a", "b", "c", "a", "b"):  # c evicts a, a evicts b, b evicts c
        assert pool.preload(name)
    assert disk_loads == ["a", "b", "c"]  # a and b came back from the cache
    assert list(pool.resident) == ["keep", "a", "b"] and list(pool.parked) == ["c"]
    names = ["a", None, "b", "a", "keep"]
    want = fresh(base, directory, [n if n != "keep" else None for n in names])
    got = logits(pool.model, names)
    torch.testing.assert_close(got[:4], want[:4], rtol=0, atol=1e-10)


def test_pool_falls_back_to_disk_when_layers_were_unwrapped(saved, disk_loads):
    base, directory = saved
    model = copy.deepcopy(base)
    pool = AdapterPool(model, "base", adapter_dir=directory, max_adapters=1)
    for name in ("c", "b", "c"):  # b evicts c (its q_proj layers unwrap), c evicts b
        pool.preload(name)
    assert disk_loads == ["c", "b", "c"]
    names = ["c", None]
    torch.testing.assert_close(logits(model, names), fresh(base, directory, names), rtol=0, atol=1e-10)


def test_pool_reads_files_that_changed_since_eviction(saved, disk_loads):
    base, directory = saved
    pool = pool_with_keeper(base, directory, max_adapters=1)
    pool.preload("a")
    pool.preload("b")  # a parked
    other = dt.apply(copy.deepcopy(base), dt.LoraConfig(r=2, target_modules=TARGETS["a"]), "a")
    randomize_trainable(other, seed=99, std=0.3)  # a new version of "a" lands in the directory
    dt.save_adapter(other, directory / "a", name="a")
    weights = directory / "a" / adapters_io.WEIGHTS_NAME
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    pool.preload("a")
    assert disk_loads == ["a", "b", "a"]
    names = ["a", None]
    torch.testing.assert_close(logits(pool.model, names), fresh(base, directory, names), rtol=0, atol=1e-10)


def test_pool_cache_budget(saved, disk_loads):
    base, directory = saved
    pool = pool_with_keeper(base, directory, max_adapters=1, cache_bytes=0)
    for name in ("a", "b", "a"):
        pool.preload(name)
    assert disk_loads == ["a", "b", "a"] and not pool.parked


def test_unloaded_adapter_is_not_kept(saved, disk_loads):
    base, directory = saved
    pool = pool_with_keeper(base, directory, max_adapters=2)
    pool.register("x", directory / "a")
    pool.preload("x")
    pool.preload("b")
    pool.unregister("x")
    pool.sweep()  # x leaves (no rows in flight) and is not parked
    assert "x" not in pool.resident and "x" not in pool.parked
    pool.register("x", directory / "c")  # the name now means another adapter
    pool.preload("x")
    assert disk_loads == ["x", "b", "x"]
