"""Serving metrics in Prometheus' text exposition format (version 0.0.4), without a client library.

    deltatune_requests_total{adapter,finish_reason}     counter   finished requests
    deltatune_prompt_tokens_total{adapter}              counter
    deltatune_generation_tokens_total{adapter}          counter
    deltatune_rejected_requests_total{status}           counter   401 / 400 / 413 / 429 / 503 ...
    deltatune_time_to_first_token_seconds               histogram submission -> first token
    deltatune_request_latency_seconds                   histogram submission -> last token
    deltatune_queue_depth                               gauge     waiting, not yet in the batch
    deltatune_running_batch_size                        gauge     rows in the running batch
    deltatune_adapters_resident                         gauge
    deltatune_adapter_loads_total / _evictions_total    counter
    deltatune_decode_steps_total                        counter   forward passes of the batch
    deltatune_prefill_forwards_total                    counter   forward passes of new prompts
    deltatune_engine_seconds_total{phase}               counter   engine thread time: prefill,
                                                                  decode, idle (nothing to run)
"""
from __future__ import annotations

import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.lock = threading.Lock()

    def inc(self, *labels: str, by: float = 1.0) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def get(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        with self.lock:
            items = sorted(self.values.items()) or ([((), 0.0)] if not self.label_names else [])
        lines += [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]
        return lines


class Gauge:
    """A value read when scraped (a callback), so it is never stale."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name, self.doc, self.read = name, doc, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} gauge",
                f"{self.name} {_number(self.read())}"]


class Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.total, self.count = 0.0, 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            else:
                self.counts[-1] += 1
            self.total += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        with self.lock:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), self.counts):
                running += count
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
            lines += [f"{self.name}_sum {_number(self.total)}", f"{self.name}_count {self.count}"]
        return lines


class ServingMetrics:
    """Everything /metrics shows; the engine and the app update it, any thread."""

    def __init__(self) -> None:
        self.requests = Counter("deltatune_requests_total", "Finished requests.", ("adapter", "finish_reason"))
        self.prompt_tokens = Counter("deltatune_prompt_tokens_total", "Prompt tokens of finished requests.",
                                     ("adapter",))
        self.generation_tokens = Counter("deltatune_generation_tokens_total", "Generated tokens.", ("adapter",))
        self.rejected = Counter("deltatune_rejected_requests_total", "Requests refused before generation.",
                                ("status",))
        self.ttft = Histogram("deltatune_time_to_first_token_seconds", "Submission to first token.")
        self.latency = Histogram("deltatune_request_latency_seconds", "Submission to the end of generation.")
        self.adapter_loads = Counter("deltatune_adapter_loads_total", "Adapters loaded into the model.")
        self.adapter_evictions = Counter("deltatune_adapter_evictions_total", "Adapters unloaded to make room.")
        self.decode_steps = Counter("deltatune_decode_steps_total", "Forward passes of the running batch.")
        self.prefill_forwards = Counter("deltatune_prefill_forwards_total", "Forward passes of new prompts.")
        self.engine_seconds = Counter("deltatune_engine_seconds_total",
                                      "Engine thread time by phase (prefill, decode, idle).", ("phase",))
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, doc, read))

    def finished(self, adapter: str, reason: str, prompt_tokens: int, tokens: int,
                 ttft: float | None, latency: float) -> None:
        self.requests.inc(adapter, reason)
        self.prompt_tokens.inc(adapter, by=prompt_tokens)
        self.generation_tokens.inc(adapter, by=tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.latency.observe(latency)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.rejected, self.ttft,
                       self.latency, *self.gauges, self.adapter_loads, self.adapter_evictions,
                       self.decode_steps, self.prefill_forwards, self.engine_seconds):
            lines += metric.render()
        return "\n".join(lines) + "\n"
