"""Did the run learn anything? A run whose evaluations stay at the no-information level says so
in its log and summary.json, with the likely cause and the setting to change, instead of
reporting a majority-class accuracy as if it were a result.

No-information level: a classifier that predicts one class for every row, or whose eval loss is
no better than knowing only the label frequencies (their entropy); a causal LM whose eval loss is
no better than a uniform guess over its vocabulary.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

# a loss within this fraction of the no-information loss carries no information either
LOSS_SLACK = 0.01

ADVICE = ("likely cause: updates too large for this run (a loss spike can push a model to one "
          "answer it never leaves): lower train.lr (e.g. half), raise train.warmup_ratio, or "
          "set train.group_by_length=false; another train.seed tells whether it was chance")


def label_facts(labels: list[int]) -> dict[str, float]:
    """The majority class's share of the eval labels and the labels' entropy (nats): the
    accuracy and the loss of a classifier that learned nothing but the label frequencies."""
    counts = Counter(labels)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return {"majority_share": max(counts.values()) / total, "label_entropy": entropy}


def no_information(metrics: dict[str, Any], vocab_size: int | None = None) -> str | None:
    """Why this evaluation shows nothing learned, or None when it shows something."""
    loss = metrics.get("loss")
    if metrics.get("predicted_classes") == 1 and metrics.get("label_classes", 2) > 1:
        return (f"every eval row was predicted as one class (accuracy {metrics['accuracy']:.4f}, "
                f"the majority class's share {metrics['majority_share']:.4f})")
    entropy = metrics.get("label_entropy")
    if entropy and loss is not None and loss >= entropy * (1 - LOSS_SLACK):
        return (f"the eval loss {loss:.4f} is no better than the label frequencies alone "
                f"({entropy:.4f})")
    if vocab_size and "accuracy" not in metrics and loss is not None and \
            loss >= math.log(vocab_size) * (1 - LOSS_SLACK):
        return (f"the eval loss {loss:.4f} is no better than a uniform guess over the "
                f"{vocab_size:,}-token vocabulary ({math.log(vocab_size):.4f})")
    return None


def did_not_learn(history: list[list[Any]]) -> dict[str, Any] | None:
    """`history`: [step, reason or None] per evaluation, in order. The run did not learn when its
    last evaluations are all at the no-information level: two in a row, or the only one."""
    streak = []
    for step, reason in reversed(history):
        if reason is None:
            break
        streak.append((step, reason))
    if not streak or len(streak) < min(2, len(history)):
        return None
    steps = [step for step, _ in reversed(streak)]
    return {"evaluations": steps, "reason": streak[0][1], "advice": ADVICE}


def message(verdict: dict[str, Any]) -> str:
    steps = verdict["evaluations"]
    where = f"at step {steps[0]}" if len(steps) == 1 else f"at steps {', '.join(map(str, steps))}"
    return f"did not learn: {where}, {verdict['reason']}; {verdict['advice']}"
