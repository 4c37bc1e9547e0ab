"""The label set of a classification run, checked before the number of classes is inferred.

Without `num_labels` or `data.label_names`, a run has as many classes as its largest integer
label + 1. A typo then silently changes the task: labels 1 and 7 (meant as 0 and 1) train an
8-way classifier that still reports an accuracy. So the inferred set must be exactly 0..K-1
with none missing, and the eval file must number its labels like the training file; anything
else is one error naming the file, the row and the labels found, and saying how to declare a
label set that really is sparse (num_labels) or named (data.label_names).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from deltatune.errors import DeltatuneError

HOW_TO_DECLARE = "set num_labels: {k} (or data.label_names) if that is meant"


def _found(labels: Counter) -> str:
    return ", ".join(f"{label} ({count} row{'s' if count > 1 else ''})"
                     for label, count in sorted(labels.items()))


def _first_row(dataset: Any, label: int) -> str:
    return getattr(dataset, "label_rows", {}).get(label, dataset.source)


def check_label_set(train: Any, eval: Any | None = None) -> None:
    """Refuse an inferred integer label set that is not exactly 0..K-1 (from `train`), and an
    eval set that uses labels the training file never does while never using some it does.

    Call only when neither num_labels nor data.label_names is set (they declare the set).
    """
    if train.label_names:
        return
    labels = Counter(e.labels for e in train.examples)
    top = max(labels)
    missing = sorted(set(range(top + 1)) - set(labels))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DeltatuneError(
            f"{_first_row(train, top)}: label {top}, but the labels of {train.source} are "
            f"{_found(labels)}: integer labels must be 0..{top} with none missing (missing: "
            f"{shown}); fix the labels, or {HOW_TO_DECLARE.format(k=max(2, top + 1))}")
    if eval is None:
        return
    eval_labels = Counter(e.labels for e in eval.examples)
    extra = sorted(set(eval_labels) - set(labels))
    unused = sorted(set(labels) - set(eval_labels))
    classes = max(2, top + 1)
    outside = [label for label in extra if label >= classes]
    if outside or (extra and unused):
        label = (outside or extra)[0]
        why = (f"is outside the label set 0..{classes - 1} of {train.source}" if outside else
               f"never occurs in {train.source}")
        if unused:
            why += f", while this file never uses {', '.join(map(str, unused))}"
        raise DeltatuneError(
            f"{_first_row(eval, label)}: label {label} {why} (train labels: {_found(labels)}; "
            f"eval labels: {_found(eval_labels)}); do the two files number their labels alike? "
            f"Fix them, or {HOW_TO_DECLARE.format(k=max(classes, max(eval_labels) + 1))}")
