"""One generation request inside an engine, and the text bookkeeping both engines share.

A Job carries its settings in and its events out: ("text", piece, choice) ... then ("done",
reason, choice) or ("error", message, choice); `choice` tells apart the `n` jobs of one request
that share a queue. Events reach an asyncio queue when the job was made inside an event loop
(`Job.for_loop`), a plain thread-safe queue otherwise (in-process callers: `job.result()`,
`for piece in job.stream()`).
"""
from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


class GenerationFailed(Exception):
    """The engine could not finish this job (its message says why: a timeout, a bad adapter)."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind  # "timeout" or "error"


@dataclass
class Job:
    """One completion request on its way through an engine."""

    prompt_ids: list[int]
    adapter: str | None          # None: the base model
    max_tokens: int
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # this many alternatives per token (completions' `logprobs`)
    timeout: float | None = None  # seconds from submission; then the job ends with an error
    choice: int = 0              # which of a request's `n` choices (seeds sampling: seed + choice)
    loop: asyncio.AbstractEventLoop | None = None
    events: Any = None           # asyncio.Queue (with loop) or queue.Queue
    # filled in by the engine
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    pending_logprob: tuple[float, dict[int, float]] | None = None  # the sampler's, for the next token
    text: str = ""               # text handed out so far
    finish_reason: str | None = None
    error: GenerationFailed | None = None
    cancelled: bool = False      # the client went away: stop spending compute on this row
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        if self.events is None and self.loop is None:
            self.events = queue.Queue()

    @classmethod
    def for_loop(cls, events: asyncio.Queue | None = None, **settings: Any) -> "Job":
        """A job whose events go to an asyncio queue of the running loop (request handlers)."""
        return cls(**settings, loop=asyncio.get_running_loop(), events=events or asyncio.Queue())

    def sampling_key(self) -> tuple:
        if self.temperature == 0:
            return ("greedy",)
        return ("sample", self.temperature, self.top_p, self.seed)

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now - self.submitted > self.timeout

    def send(self, kind: str, value: str) -> None:
        event = (kind, value, self.choice)
        if self.loop is None:
            self.events.put(event)
            return
        with contextlib.suppress(RuntimeError):  # the server's loop is already closed
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    # ------------------------------------------------------------ in-process consumers
    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces as they come (blocking); raises GenerationFailed on an engine error."""
        while True:
            kind, value, _ = self.events.get(timeout=timeout)
            if kind == "text":
                yield value
            elif kind == "error":
                raise self.error or GenerationFailed(value)
            else:
                return

    def result(self, timeout: float | None = None) -> tuple[str, str]:
        """(whole text, finish reason), blocking until the engine is done with the job."""
        text = "".join(self.stream(timeout))
        return text, self.finish_reason or "stop"


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


class TextTracker:
    """Hands each new token of a job to its consumer and decides when the job ends: EOS, a stop
    string (cut from the text), max_tokens, the client leaving, or its timeout."""

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int],
                 on_finish: Callable[[Job], None] | None = None) -> None:
        self.decode, self.eos_ids, self.on_finish = decode, eos_ids, on_finish

    def advance(self, job: Job, token: int) -> bool:
        """Take `token` for `job`; True when the job is finished."""
        if job.cancelled:
            self.finish(job, "cancelled", flush=False)
            return True
        if job.expired(time.monotonic()):
            self.fail(job, f"the request timed out after {job.timeout:g} s", "timeout")
            return True
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if token in self.eos_ids and not job.ignore_eos:
            self.finish(job, "stop")
            return True
        job.token_ids.append(token)
        if job.logprobs is not None and job.pending_logprob is not None:
            job.token_logprobs.append(job.pending_logprob)
        text = self.decode(job.token_ids)
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                self._emit(job, text[:at])
                self.finish(job, "stop", flush=False)
                return True
        if len(job.token_ids) >= job.max_tokens:
            self._emit(job, text)
            self.finish(job, "length", flush=False)
            return True
        self._emit(job, text[: len(text) - held_back(text, job.stop)])
        return False

    def _emit(self, job: Job, text: str) -> None:
        if text.startswith(job.text) and len(text) > len(job.text):
            job.send("text", text[len(job.text):])
            job.text = text

    def finish(self, job: Job, reason: str, flush: bool = True) -> None:
        if job.finish_reason is not None:
            return
        if flush:
            self._emit(job, self.decode(job.token_ids))
        job.finish_reason, job.finished_at = reason, time.monotonic()
        if self.on_finish is not None:
            self.on_finish(job)
        job.send("done", reason)

    def fail(self, job: Job, message: str, kind: str = "error") -> None:
        if job.finish_reason is not None:
            return
        job.error = GenerationFailed(message, kind)
        job.finish_reason, job.finished_at = kind, time.monotonic()
        if self.on_finish is not None:
            self.on_finish(job)
        job.send("error", message)
