"""Adapters on demand: which adapters the server knows by name, and which sit in the model now.

Known adapters come from `--adapter name=DIR`, from `--adapter-dir DIR` (every subdirectory with
an adapter_config.json, looked up by name at request time, so adapters added there later are
served too), from POST /v1/load_lora_adapter, and from adapters already on the model when the
server starts (those cannot be reloaded, so they are never evicted and do not count against
`max_adapters`).

At most `max_adapters` stay resident. An adapter is loaded at its first request; when the model
is full, the least recently used adapter with no rows in the running batch leaves. When every
resident adapter has rows in flight, one of them (fewest rows, then least recently used) is
marked draining: the scheduler admits no new rows for it, and once its last row finishes it
leaves and the waiting adapter comes in. Only the engine thread calls the methods that touch the
model (acquire, release, sweep); the rest are safe from any thread.
"""
from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import delta_state
from deltatune.serving.metrics import ServingMetrics

CONFIG_NAME = "adapter_config.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AdapterPool:
    def __init__(self, model: nn.Module, base_name: str, adapters: dict[str, str | Path] | None = None,
                 adapter_dir: str | Path | None = None, max_adapters: int | None = None,
                 metrics: ServingMetrics | None = None) -> None:
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

    def unregister(self, name: str) -> None:
        """Stop serving `name`; it leaves the model once its running rows finish."""
        with self.lock:
            if name in self.retired or not (name in self.sources or name in self.pinned
                                            or name in self.resident):
                raise DeltatuneError(f"adapter {name!r} is not loaded")
            self.sources.pop(name, None)
            self.pinned.discard(name)
            self.retired.add(name)

    def forget(self, name: str) -> None:
        """Undo register() for an adapter that failed to load."""
        with self.lock:
            self.sources.pop(name, None)

    def admissible(self, name: str | None) -> bool:
        """May a new row for `name` join the batch now? (Not while its adapter drains.)"""
        return name is None or name != self.draining

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
            busy = [n for n in self.resident if n not in self.pinned]
            if busy and self.draining is None:  # make room: one nobody waits for, emptying soonest
                order = list(self.resident)
                self.draining = min(busy, key=lambda n: (n in wanted, self.in_use[n], order.index(n)))
            return False
        self.resident.move_to_end(name)
        self.in_use[name] += 1
        return True

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

        with self.lock:
            path = self.sources.get(name) or self._from_dir(name)
        if path is None:
            raise DeltatuneError(f"adapter {name!r} is not known to this server")
        load_adapter(self.model, path, name=name)
        self.resident[name] = None
        self.metrics.adapter_loads.inc()

    def _evict(self, name: str) -> None:
        from deltatune.deltas import delete_adapter

        delete_adapter(self.model, name)
        del self.resident[name]
        self.in_use.pop(name, None)
        self.pinned.discard(name)
        if self.draining == name:
            self.draining = None
        self.metrics.adapter_evictions.inc()
