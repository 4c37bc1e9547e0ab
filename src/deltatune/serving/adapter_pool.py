"""Adapters on demand: which adapters the server knows by name, and which sit in the model now.

Known adapters come from `--adapter name=DIR`, from `--adapter-dir DIR` (every subdirectory with
an adapter_config.json, looked up by name at request time, so adapters added there later are
served too), from POST /v1/load_lora_adapter, and from adapters already on the model when the
server starts (those cannot be reloaded, so they are never evicted and do not count against
`max_adapters`).

At most `max_adapters` stay resident. An adapter is loaded at its first request; when the model
is full, the least recently used adapter with no rows in the running batch leaves. When every
resident adapter has rows in flight, `plan_drain` swaps by demand: if more requests wait for an
adapter outside than the least-held resident one has waiting and running (or a request has waited
too long), that one is marked draining: the scheduler gives it no new rows (except ones that end
before its last running row does), and once its last row finishes it leaves and the waiting
adapter comes in. Only the engine thread calls the methods that touch the model (acquire,
release, sweep, plan_drain); the rest are safe from any thread.

An evicted LoRA or (IA)³ adapter keeps its modules in a small cache (`cache_bytes`, least recently
evicted leave first): loading it again attaches them (~1 ms) instead of reading, parsing and
applying it (~50 ms on SmolLM2-135M, mostly walks over the model), unless its files changed since.
"""
from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Collection, Mapping, NamedTuple

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import delta_state
from deltatune.serving.metrics import ServingMetrics

CONFIG_NAME = "adapter_config.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CACHE_BYTES = 256 * 2**20  # evicted adapters kept ready to attach again (8 LoRA r=8 of SmolLM2: ~23 MB)


class Parked(NamedTuple):
    adapter: object      # deltas.DetachedAdapter
    files: tuple         # (path, mtime_ns, size) of what it was loaded from: changed files reload


class AdapterPool:
    def __init__(self, model: nn.Module, base_name: str, adapters: dict[str, str | Path] | None = None,
                 adapter_dir: str | Path | None = None, max_adapters: int | None = None,
                 metrics: ServingMetrics | None = None, cache_bytes: int = CACHE_BYTES) -> None:
        if max_adapters is not None and (isinstance(max_adapters, bool) or not isinstance(max_adapters, int)
                                         or max_adapters < 1):
            raise DeltatuneError(f"--max-adapters: must be a positive integer, got {max_adapters!r}")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise DeltatuneError(f"--adapter-dir {adapter_dir}: directory not found")
        self.model, self.base_name, self.max_adapters = model, base_name, max_adapters
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.metrics = metrics or ServingMetrics()
        self.lock = threading.Lock()
        self.sources: dict[str, Path] = {}
        self.pinned = set(delta_state(model).configs)  # on the model already: no directory to reload
        self.resident: OrderedDict[str, None] = OrderedDict((name, None) for name in self.pinned)
        self.in_use: Counter[str] = Counter()
        self.retired: set[str] = set()  # unloaded by request: leave once their rows finish
        self.draining: str | None = None
        self.cache_bytes = cache_bytes
        self.parked: OrderedDict[str, Parked] = OrderedDict()
        self.loaded_from: dict[str, tuple] = {}
        for name, directory in (adapters or {}).items():
            self.register(name, directory)

    # ------------------------------------------------------------ any thread
    def _from_dir(self, name: str) -> Path | None:
        if self.adapter_dir is None or not NAME.match(name):
            return None
        path = self.adapter_dir / name
        return path if (path / CONFIG_NAME).is_file() else None

    def known(self, name: str) -> bool:
        with self.lock:
            if name in self.retired:
                return False
            return name in self.sources or name in self.pinned or self._from_dir(name) is not None

    def names(self) -> list[str]:
        """The base model's name, then every adapter a request may name."""
        with self.lock:
            found = list(self.pinned) + list(self.sources)
            if self.adapter_dir is not None:
                found += sorted(p.name for p in self.adapter_dir.iterdir() if self._from_dir(p.name))
            return [self.base_name] + [n for n in dict.fromkeys(found) if n not in self.retired]

    def register(self, name: str, directory: str | Path) -> None:
        """Make `name` servable from `directory` (loaded at its first request)."""
        if not isinstance(name, str) or not NAME.match(name):
            raise DeltatuneError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-'")
        if name == self.base_name:
            raise DeltatuneError(f"adapter name {name!r} is the base model's name; pick another")
        path = Path(directory)
        if not (path / CONFIG_NAME).is_file():
            raise DeltatuneError(f"{directory}: no {CONFIG_NAME} (not an adapter directory)")
        with self.lock:
            if name in self.sources or name in self.pinned:
                raise DeltatuneError(f"adapter {name!r} is already loaded; unload it first")
            self.sources[name] = path
            self.retired.discard(name)
            self.parked.pop(name, None)  # a name served from another directory now

    def unregister(self, name: str) -> None:
        """Stop serving `name`; it leaves the model once its running rows finish."""
        with self.lock:
            if name in self.retired or not (name in self.sources or name in self.pinned
                                            or name in self.resident):
                raise DeltatuneError(f"adapter {name!r} is not loaded")
            self.sources.pop(name, None)
            self.pinned.discard(name)
            self.retired.add(name)
            self.parked.pop(name, None)

    def forget(self, name: str) -> None:
        """Undo register() for an adapter that failed to load."""
        with self.lock:
            self.sources.pop(name, None)

    def is_resident(self, name: str | None) -> bool:
        """Can a row of `name` join without loading anything? (None: the base model, always.)"""
        return name is None or name in self.resident

    def method(self, name: str | None) -> str | None:
        return None if name is None else delta_state(self.model).configs[name].method

    def resident_count(self) -> int:
        return len(self.resident)

    # ------------------------------------------------------------ engine thread only
    def preload(self, name: str, wanted: frozenset = frozenset()) -> bool:
        """Load `name` now if there is room (evicting an idle adapter, one not `wanted` by a
        waiting request first); False: every slot busy."""
        if name in self.resident:
            return True
        if name in self.retired:
            raise DeltatuneError(f"adapter {name!r} was unloaded")
        if self.max_adapters is not None and len(self.resident) - len(self.pinned) >= self.max_adapters:
            idle = [n for n in self.resident if not self.in_use[n] and n not in self.pinned]
            if not idle:
                return False
            self._evict(min(idle, key=lambda n: n in wanted))  # stable: least recently used first
        self._load(name)
        return True

    def acquire(self, name: str | None, wanted: frozenset = frozenset()) -> bool:
        """Pin `name` for one more row, loading it if needed; False: no room yet (try later).
        `wanted`: the adapters waiting requests ask for (they are the last to be made to leave)."""
        if name is None:
            return True
        if not self.preload(name, wanted):
            return False  # no room yet: plan_drain makes some when demand says so
        self.resident.move_to_end(name)
        self.in_use[name] += 1
        return True

    def plan_drain(self, demand: Mapping[str, int], left: Mapping[str, int],
                   urgent: Collection[str] = ()) -> None:
        """With every slot held by running rows, mark one resident adapter draining when a waiting
        adapter needs its slot more. `demand`: jobs waiting per adapter; `left`: per resident
        adapter, the most tokens any of its running rows may still take; `urgent`: adapters with
        a job waiting too long (they get a slot whatever the counts, so nobody starves). The one
        to leave holds the fewest jobs (waiting + running), then empties soonest, then is least
        recently used; it drains when the most-demanded adapter outside has more jobs waiting."""
        if self.draining is not None or self.max_adapters is None:
            return
        outside = [n for n in demand if n is not None and n not in self.resident and n not in self.retired]
        busy = [n for n in self.resident if n not in self.pinned]
        if not outside or len(busy) < self.max_adapters or not all(self.in_use[n] for n in busy):
            return  # nobody waits outside, or a slot is free / idle (acquire takes it)
        order = list(self.resident)

        def held(n: str) -> int:
            return demand.get(n, 0) + self.in_use[n]

        leaving = min(busy, key=lambda n: (held(n), left.get(n, 0), order.index(n)))
        if max(demand[n] for n in outside) > held(leaving) or any(n in urgent for n in outside):
            self.draining = leaving

    def release(self, name: str | None) -> None:
        if name is not None:
            self.in_use[name] -= 1

    def sweep(self) -> None:
        """Unload retired adapters and a draining one once nothing runs through them."""
        for name in list(self.resident):
            if self.in_use[name] == 0 and (name in self.retired or name == self.draining):
                self._evict(name)
        with self.lock:
            self.retired -= {n for n in self.retired if n not in self.resident}

    def _load(self, name: str) -> None:
        from deltatune.adapters_io import load_adapter
        from deltatune.deltas import attach_adapter

        with self.lock:
            path = self.sources.get(name) or self._from_dir(name)
        if path is None:
            raise DeltatuneError(f"adapter {name!r} is not known to this server")
        files = _files(path)
        with self.lock:
            parked = self.parked.pop(name, None)
        if parked is None or parked.files != files or not attach_adapter(self.model, parked.adapter):
            load_adapter(self.model, path, name=name)
        self.loaded_from[name] = files
        self.resident[name] = None
        self.metrics.adapter_loads.inc()

    def _evict(self, name: str) -> None:
        from deltatune.deltas import detach_adapter

        detached = detach_adapter(self.model, name)
        files = self.loaded_from.pop(name, None)
        with self.lock:
            if detached is not None and files is not None and name not in self.retired:
                self.parked[name] = Parked(detached, files)
                while self.parked and sum(p.adapter.nbytes() for p in self.parked.values()) > self.cache_bytes:
                    self.parked.popitem(last=False)
        del self.resident[name]
        self.in_use.pop(name, None)
        self.pinned.discard(name)
        if self.draining == name:
            self.draining = None
        self.metrics.adapter_evictions.inc()


def _files(directory: Path) -> tuple:
    """What an adapter directory holds, cheaply: a changed file means reading it again."""
    found: list = [str(Path(directory).resolve())]
    for file in sorted(Path(directory).iterdir()):
        if file.is_file():
            stat = file.stat()
            found.append((file.name, stat.st_mtime_ns, stat.st_size))
    return tuple(found)
