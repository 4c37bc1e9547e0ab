"""The next token of every row of a batch, each with its own sampling settings.

Greedy rows take the argmax of the raw logits, as generate() does without sampling, so their
tokens equal generate()'s. A sampling row divides by its temperature, keeps the smallest set of
tokens whose probability reaches top_p, and draws with its own torch.Generator, seeded from the
request's `seed`: the same request with the same seed gives the same text whatever else is in
the batch (up to float noise in the logits). Log-probabilities, when asked for, are those of the
model's raw distribution (before temperature and top_p), as OpenAI and vLLM report them.
"""
from __future__ import annotations

import random

import torch

from deltatune.serving.job import Job


def row_generator(job: Job, choice: int = 0) -> torch.Generator | None:
    if job.temperature == 0:
        return None
    seed = job.seed + choice if job.seed is not None else random.SystemRandom().randrange(2**63)
    return torch.Generator().manual_seed(seed)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0.0             # the top token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def next_tokens(logits: torch.Tensor, jobs: list[Job], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (rows, vocab); fills each job's token_logprobs if asked."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, (job, generator) in enumerate(zip(jobs, generators)):
        if generator is not None:
            tokens[i] = _sample(logits[i], job.temperature, job.top_p, generator)
    wants = [i for i, job in enumerate(jobs) if job.logprobs is not None]
    if wants:
        logp = torch.log_softmax(logits[wants].float(), dim=-1)
        for row, i in enumerate(wants):
            job, token = jobs[i], tokens[i]
            top = {}
            if job.logprobs:
                values, ids = logp[row].topk(job.logprobs)
                top = dict(zip(ids.tolist(), values.tolist()))
            job.pending_logprob = (float(logp[row, token]), top)
    return tokens
