"""Task formats -> token examples -> padded (or packed) batches.

    dataset = build_dataset(config.data, tokenizer, config.task, "train")
    loader = DataLoader(dataset, batch_size=32, collate_fn=Collator(tokenizer.pad_token_id))

Formats (data.format): classification and pairs (task classification); alpaca, chat, gsm8k and
text (task causal-lm). Rows come from data_files.read_rows; instruction rows are rendered by
data_instruct. Rows longer than data.max_length are truncated and counted in `dataset.stats`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from deltatune.config.run import FORMATS_BY_TASK, DataConfig
from deltatune.data.files import Row, read_rows
from deltatune.data.instructions import (alpaca_parts, bos_prefix, chat_messages, encode_segments,
                            gsm8k_parts, has_chat_template, parts_to_messages, plain_segments,
                            template_segments)
from deltatune.errors import DeltatuneError

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens, padding, packing boundaries)


@dataclass
class Example:
    input_ids: list[int]
    labels: int | list[int]          # classification: class index; LM: per-token, -100 ignored
    token_type_ids: list[int] | None = None  # sentence pairs on BERT-style models
    prompt_length: int | None = None  # instruction data: tokens before the (last) response
    target: str | None = None         # instruction data: the (last) response's text


class TokenizedDataset(torch.utils.data.Dataset):
    """A list of Examples with `.stats` {"rows", "truncated", "tokens", ...} and `.label_names`."""

    def __init__(self, examples: list[Example], stats: dict[str, Any],
                 label_names: list[str] | None, format: str, source: str,
                 label_rows: dict[int, str] | None = None) -> None:
        self.examples = examples
        self.stats = stats
        self.label_names = label_names
        self.format = format
        self.source = source
        self.label_rows = label_rows or {}  # classification: label -> its first row ("f:line 3")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


# ------------------------------------------------------------------------------- classification
def _string_labels_hint(rows: list[Row], field: str) -> str:
    names = sorted({r.values.get(field) for r in rows if isinstance(r.values.get(field), str)})
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    return f"set data.label_names (e.g. [{shown}])"


def label_index(row: Row, field: str, label_names: list[str] | None, num_labels: int | None,
                rows: list[Row]) -> int:
    """The class index of a row's label: an int, a numeric string (CSV), or a name."""
    value = row.get(field)
    if isinstance(value, str):
        if label_names and value in label_names:
            return label_names.index(value)
        if not re.fullmatch(r"\s*-?\d+\s*", value):
            if label_names:
                raise row.error(f"label {value!r} is not in data.label_names "
                                f"({', '.join(label_names)})")
            raise row.error(f"label {value!r} is a name but data.label_names is not set; "
                            f"{_string_labels_hint(rows, field)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise row.error(f"label {value!r} ({type(value).__name__}) must be a class index "
                        f"(0, 1, ...) or a label name")
    limit = len(label_names) if label_names else num_labels
    if value < 0 or (limit is not None and value >= limit):
        names = f" = {', '.join(label_names)}" if label_names else ""
        upper = f"0..{limit - 1}{names}" if limit is not None else "0, 1, ..."
        raise row.error(f"label {value} is outside the label set {upper}")
    return value


def encode_classification(rows: list[Row], data: DataConfig, tokenizer: Any,
                          num_labels: int | None) -> tuple[list[Example], int]:
    pairs = data.format == "pairs"
    texts = [row.text(data.text_field) for row in rows]
    seconds = [row.text(data.text_pair_field) for row in rows] if pairs else None
    labels = [label_index(row, data.label_field, data.label_names, num_labels, rows)
              for row in rows]
    # Tokenize whole, count what is too long, then re-tokenize only those rows with truncation
    # (for pairs the tokenizer trims the longer sentence first).
    encoded = tokenizer(texts, seconds, add_special_tokens=True, truncation=False, verbose=False)
    long_rows = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > data.max_length]
    input_ids = list(encoded["input_ids"])
    type_ids = list(encoded["token_type_ids"]) if pairs and "token_type_ids" in encoded else None
    if long_rows:
        cut = tokenizer([texts[i] for i in long_rows],
                        [seconds[i] for i in long_rows] if pairs else None,
                        truncation=True, max_length=data.max_length, verbose=False)
        for j, i in enumerate(long_rows):
            input_ids[i] = cut["input_ids"][j]
            if type_ids is not None:
                type_ids[i] = cut["token_type_ids"][j]
    examples = [Example(list(ids), label, list(type_ids[i]) if type_ids is not None else None)
                for i, (ids, label) in enumerate(zip(input_ids, labels))]
    return examples, len(long_rows)


# ------------------------------------------------------------------------------- causal LM
def verbalized_parts(row: Row, data: DataConfig, rows: list[Row]) -> tuple[str, str, str]:
    """(prompt from data.prompt_template, "", the label's name) of a classification row."""
    try:
        prompt = data.prompt_template.format(**row.values)
    except KeyError as exc:
        raise row.error(f"data.prompt_template names field {exc.args[0]!r}, which this row "
                        f"lacks (fields: {', '.join(row.values)})") from None
    index = label_index(row, data.label_field, data.label_names, None, rows)
    return prompt, "", data.label_names[index]


def encode_instructions(rows: list[Row], data: DataConfig,
                        tokenizer: Any) -> tuple[list[Example], int, int]:
    """(examples, truncated rows, dropped rows): rows whose response was cut away entirely
    carry no loss and are dropped (counted, not hidden)."""
    use_template = has_chat_template(tokenizer)
    if data.format == "chat" and not use_template:
        raise DeltatuneError("data.format: chat data needs a tokenizer with a chat template; this "
                             "model has none (use format alpaca, or a chat model)")
    prefix = [] if use_template else bos_prefix(tokenizer)  # templates write their own BOS
    examples, truncated, dropped = [], 0, 0
    for row in rows:
        if data.format == "chat":
            messages = chat_messages(row)
            if not any(m["role"] == "assistant" for m in messages):
                raise row.error("conversation has no assistant message to learn from")
            target = [m["content"] for m in messages if m["role"] == "assistant"][-1]
            segments = template_segments(tokenizer, messages, row)
        else:
            parts = (alpaca_parts(row) if data.format == "alpaca" else gsm8k_parts(row)
                     if data.format == "gsm8k" else verbalized_parts(row, data, rows))
            target = parts[2]
            segments = (template_segments(tokenizer, parts_to_messages(*parts), row)
                        if use_template else plain_segments(tokenizer, *parts))
        encoded = encode_segments(tokenizer, segments, prefix, data.max_length,
                                  data.train_on_prompt, target)
        truncated += encoded.truncated
        if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
            dropped += 1
            continue
        examples.append(Example(encoded.input_ids, encoded.labels,
                                prompt_length=encoded.prompt_length, target=encoded.target))
    return examples, truncated, dropped


def encode_text(rows: list[Row], data: DataConfig, tokenizer: Any) -> list[Example]:
    """Plain text: rows joined with a blank line (the WikiText convention), one token stream cut
    into max_length blocks. Nothing is thrown away; the last block may be shorter."""
    joined = "\n\n".join(row.text(data.text_field) for row in rows)
    ids = bos_prefix(tokenizer) + tokenizer(joined, add_special_tokens=False,
                                            verbose=False)["input_ids"]
    blocks = [ids[start:start + data.max_length] for start in range(0, len(ids), data.max_length)]
    return [Example(block, list(block)) for block in blocks if len(block) >= 2]


# ------------------------------------------------------------------------------- entry point
def build_dataset(data: DataConfig, tokenizer: Any, task: str, split: str = "train",
                  seed: int = 0, num_labels: int | None = None) -> TokenizedDataset:
    """Read and tokenize the `split` ("train" | "eval") named in `data`.

    `num_labels` (classification) bounds integer labels when data.label_names is not set.
    `seed` is accepted for sampled subsets; max_*_rows takes the first N rows today.
    """
    if split not in ("train", "eval"):
        raise DeltatuneError(f"split must be 'train' or 'eval', got {split!r}")
    if data.format not in FORMATS_BY_TASK.get(task, ()):
        raise DeltatuneError(f"data.format: {data.format!r} does not fit task {task!r}")
    source = data.train if split == "train" else data.eval
    if source is None:
        raise DeltatuneError(f"data.{split}: not set")
    limit = data.max_train_rows if split == "train" else data.max_eval_rows
    rows = read_rows(source, split, data.text_field, whole_text=data.format == "text",
                     limit=limit)
    truncated = dropped = 0
    label_rows: dict[int, str] = {}
    if task == "classification":
        examples, truncated = encode_classification(rows, data, tokenizer, num_labels)
        for row, example in zip(rows, examples):  # one example per row: for label errors
            label_rows.setdefault(example.labels, row.where)
    elif data.format == "text":
        examples = encode_text(rows, data, tokenizer)
    else:
        examples, truncated, dropped = encode_instructions(rows, data, tokenizer)
    if not examples:
        raise DeltatuneError(f"{source}: no usable examples ({len(rows)} rows, {dropped} dropped "
                             f"because max_length {data.max_length} left no response tokens)")
    stats = {"rows": len(rows), "examples": len(examples), "truncated": truncated,
             "dropped": dropped, "tokens": sum(len(e.input_ids) for e in examples),
             "max_length": data.max_length}
    return TokenizedDataset(examples, stats, data.label_names, data.format, source, label_rows)


def num_labels_of(dataset: TokenizedDataset) -> int:
    """Classes of a classification dataset: len(label_names), else the largest label + 1."""
    if dataset.label_names:
        return len(dataset.label_names)
    labels = [e.labels for e in dataset.examples]
    if not labels or not all(isinstance(label, int) for label in labels):
        raise DeltatuneError(f"{dataset.source}: not a classification dataset")
    return max(2, max(labels) + 1)


def classes_of_training_file(data: DataConfig) -> int:
    """The class count a classification run will have, read from the labels of data.train alone
    (no tokenizer, no model): len(label_names), else the largest integer label + 1 (at least 2).
    For planning before a model is loaded; training still checks the label set in full."""
    if data.label_names:
        return len(data.label_names)
    rows = read_rows(data.train, "train", data.text_field, limit=data.max_train_rows)
    labels = [label_index(row, data.label_field, None, None, rows) for row in rows]
    return max(2, max(labels, default=1) + 1)


# ------------------------------------------------------------------------------- batching
class Collator:
    """list[Example] -> tensors; pads to the longest row in the batch (dynamic padding).

    packing=True (causal LM): examples are laid end to end in rows of at most max_length tokens.
    position_ids restart at 0 for every example and no attention_mask is returned, so transformers
    builds a block-diagonal causal mask from the position ids: no token attends across an example
    boundary. Each example's first label is -100 so no loss is computed across a boundary either.
    Call the model with use_cache=False: with a KV cache transformers ignores packed positions.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", packing: bool = False,
                 max_length: int | None = None) -> None:
        if padding_side not in ("right", "left"):
            raise DeltatuneError(f"padding_side must be right or left, got {padding_side!r}")
        if packing and max_length is None:
            raise DeltatuneError("data.packing needs data.max_length (the packed row length)")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.packing = packing
        self.max_length = max_length

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise DeltatuneError("Collator: empty batch")
        if self.packing:
            return self.pack(examples)
        return self.pad(examples)

    def _padded(self, rows: list[list[int]], value: int, width: int,
                side: str | None = None) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)  # (batch, seq)
        for i, row in enumerate(rows):
            if (side or self.padding_side) == "right":
                out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            elif row:
                out[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        return out

    def pad(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        batch = {
            "input_ids": self._padded([e.input_ids for e in examples], self.pad_token_id, width),
            "attention_mask": self._padded([[1] * len(e.input_ids) for e in examples], 0, width),
        }
        if isinstance(examples[0].labels, int):
            batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
        else:
            batch["labels"] = self._padded([e.labels for e in examples], IGNORE_INDEX, width)
        if examples[0].token_type_ids is not None:
            batch["token_type_ids"] = self._padded([e.token_type_ids for e in examples], 0, width)
        if self.padding_side == "left":  # positions count real tokens only
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    def pack(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if isinstance(examples[0].labels, int):
            raise DeltatuneError("data.packing: classification examples cannot be packed")
        rows: list[list[Example]] = []
        used = self.max_length  # start a new row on the first example
        for example in examples:  # greedy, in order: keeps the data order the sampler chose
            if used + len(example.input_ids) > self.max_length:
                rows.append([])
                used = 0
            rows[-1].append(example)
            used += len(example.input_ids)
        ids, labels, positions = [], [], []
        for row in rows:
            ids.append([t for e in row for t in e.input_ids])
            labels.append([t for e in row for t in [IGNORE_INDEX] + list(e.labels[1:])])
            positions.append([p for e in row for p in range(len(e.input_ids))])
        width = max(len(r) for r in ids)
        # Padding is its own "example" (positions restart at 0), so it never joins a real one.
        positions = [p + list(range(width - len(p))) for p in positions]
        return {
            "input_ids": self._padded(ids, self.pad_token_id, width, side="right"),
            "labels": self._padded(labels, IGNORE_INDEX, width, side="right"),
            "position_ids": torch.tensor(positions, dtype=torch.long),  # (rows, seq)
        }
