"""Data: file formats, pairs, labels, instruction masks, chat templates, truncation, padding,
packing (with the isolation check on a real attention implementation), one-line errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from byte_tokenizer import byte_tokenizer
from conftest import tiny_llama
from deltatune.config.run import DataConfig
from deltatune.data.dataset import IGNORE_INDEX, Collator, Example, build_dataset, num_labels_of
from deltatune.errors import DeltatuneError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [
    {"text": "a gripping, beautifully shot film", "label": 1},
    {"text": "dull \"comedy\" with no laughs", "label": 0},
    {"text": "one of the year's best", "label": 1},
]


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture(scope="module")
def smollm_tok():
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_table(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        delimiter = "\t" if path.suffix == ".tsv" else ","
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter,
                                    quoting=quoting, quotechar=None if delimiter == "\t" else '"',
                                    escapechar=None)
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


# ----------------------------------------------------------------------------- classification
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_every_file_format_gives_the_same_examples(tmp_path, minilm_tok, suffix):
    source = write_table(tmp_path / f"train{suffix}", ROWS)
    dataset = build_dataset(DataConfig(train=source, max_length=32), minilm_tok, "classification")
    expected = minilm_tok([r["text"] for r in ROWS])["input_ids"]
    assert [e.input_ids for e in dataset] == expected
    assert [e.labels for e in dataset] == [1, 0, 1]
    assert dataset.stats["rows"] == 3 and dataset.stats["truncated"] == 0
    assert dataset.stats["tokens"] == sum(len(ids) for ids in expected)


def test_fields_and_label_names_are_configurable(tmp_path, minilm_tok):
    rows = [{"sentence": "great", "sentiment": "pos"}, {"sentence": "awful", "sentiment": "neg"},
            {"sentence": "fine", "sentiment": "neutral"}]
    data = DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows), text_field="sentence",
                      label_field="sentiment", label_names=["neg", "neutral", "pos"])
    dataset = build_dataset(data, minilm_tok, "classification")
    assert [e.labels for e in dataset] == [2, 0, 1]
    assert dataset.label_names == ["neg", "neutral", "pos"] and num_labels_of(dataset) == 3
    assert dataset[0].input_ids == minilm_tok("great")["input_ids"]


def test_sentence_pairs_are_tokenized_as_pairs_with_segment_ids(tmp_path, minilm_tok):
    rows = [{"text_a": "The cat sat on the mat.", "text_b": "A cat was sitting.", "label": 1},
            {"text_a": "Stocks fell.", "text_b": "It rained all day in the city.", "label": 0}]
    data = DataConfig(train=write_jsonl(tmp_path / "p.jsonl", rows), format="pairs")
    dataset = build_dataset(data, minilm_tok, "classification")
    for example, row in zip(dataset, rows):
        reference = minilm_tok(row["text_a"], row["text_b"])
        assert example.input_ids == reference["input_ids"]
        assert example.token_type_ids == reference["token_type_ids"]
        assert set(example.token_type_ids) == {0, 1}
    short = build_dataset(DataConfig(train=data.train, format="pairs", max_length=10),
                          minilm_tok, "classification")
    assert short.stats["truncated"] == 2 and all(len(e.input_ids) == 10 for e in short)
    assert all(e.input_ids.count(minilm_tok.sep_token_id) == 2 for e in short)  # both kept


def test_truncation_is_counted_and_keeps_the_start(tmp_path, minilm_tok):
    texts = ["short", "a somewhat longer sentence that will not fit in eight tokens",
             "two words", "another long sentence with many many words in it"]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(texts)]
    dataset = build_dataset(DataConfig(train=write_jsonl(tmp_path / "t.jsonl", rows),
                                       max_length=8), minilm_tok, "classification")
    full = minilm_tok(texts)["input_ids"]
    assert dataset.stats["truncated"] == sum(len(ids) > 8 for ids in full) == 2
    for example, ids in zip(dataset, full):
        assert example.input_ids == (ids if len(ids) <= 8 else ids[:7] + [minilm_tok.sep_token_id])


def test_csv_numeric_labels_and_first_n_rows(tmp_path, minilm_tok):
    rows = [{"text": f"review number {i}", "label": str(i % 3)} for i in range(10)]
    data = DataConfig(train=write_table(tmp_path / "t.csv", rows), max_train_rows=4)
    dataset = build_dataset(data, minilm_tok, "classification")
    assert [e.labels for e in dataset] == [0, 1, 2, 0]
    assert dataset.stats["rows"] == 4 and num_labels_of(dataset) == 3


@pytest.mark.parametrize("content, extra, message", [
    ('{"text": "ok", "label": 1}\n{"text": "bad, "label": 0}\n', {},
     "t.jsonl:line 2: not valid JSON"),
    ('{"text": "ok", "label": 1}\n\n{"sentence": "x", "label": 0}\n', {},
     "t.jsonl:line 3: missing field 'text' (fields here: sentence, label)"),
    ('{"text": "ok", "label": 5}\n', {"label_names": ["neg", "pos"]},
     "t.jsonl:line 1: label 5 is outside the label set 0..1 = neg, pos"),
    ('{"text": "ok", "label": "great"}\n{"text": "meh", "label": "bad"}\n', {},
     "t.jsonl:line 1: label 'great' is a name but data.label_names is not set; set "
     "data.label_names (e.g. [bad, great])"),
    ('{"text": "ok", "label": [1]}\n', {}, "t.jsonl:line 1: label [1] (list) must be a class index"),
    ("", {}, "t.jsonl: no rows (empty dataset)"),
])
def test_bad_rows_are_one_line_errors_with_file_and_line(tmp_path, minilm_tok, content, extra,
                                                         message):
    (tmp_path / "t.jsonl").write_text(content, encoding="utf-8")
    data = DataConfig(train=str(tmp_path / "t.jsonl"), **extra)
    with pytest.raises(DeltatuneError) as info:
        build_dataset(data, minilm_tok, "classification")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_file_level_errors(tmp_path, minilm_tok):
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 1}\n')
    cases = {str(tmp_path / "t.jsonl"): "t.jsonl:line 2: not valid UTF-8 (byte 0xe9",
             str(tmp_path / "missing.jsonl"): "missing.jsonl: data file not found",
             "hf:no-such-org/no-such-set": "hf:no-such-org/no-such-set: cannot load the Hub "
                                           "dataset 'no-such-org/no-such-set'"}
    for source, message in cases.items():
        with pytest.raises(DeltatuneError) as info:
            build_dataset(DataConfig(train=source), minilm_tok, "classification")
        assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DeltatuneError, match="label 2 is outside the label set 0..1"):
        rows = [{"text": "ok", "label": 2}]
        build_dataset(DataConfig(eval=write_jsonl(tmp_path / "e.jsonl", rows)), minilm_tok,
                      "classification", "eval", num_labels=2)


# ----------------------------------------------------------------------------- instructions
def labelled_runs(example: Example) -> list[list[int]]:
    """Contiguous runs of tokens that carry a label."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_alpaca_loss_is_on_the_response_tokens_only(tmp_path, smollm_tok):
    rows = [{"instruction": "Name a primary colour.", "input": "", "output": "Red."},
            {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."}]
    data = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca",
                      max_length=256)
    dataset = build_dataset(data, smollm_tok, "causal-lm")
    prompts = [[{"role": "user", "content": "Name a primary colour."}],
               [{"role": "user", "content": "Translate to French.\n\ngood morning"}]]
    for example, row, prompt in zip(dataset, rows, prompts):
        rendered = smollm_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = smollm_tok(rendered, add_special_tokens=False)["input_ids"]
        n = example.prompt_length
        assert n == len(prompt_ids) and example.input_ids[:n] == prompt_ids
        assert example.labels[:n] == [IGNORE_INDEX] * n          # the whole prompt is masked
        assert example.labels[n:] == example.input_ids[n:]      # every response token is trained
        assert smollm_tok.decode(example.input_ids[n:]) == row["output"] + "<|im_end|>\n"
        assert example.target == row["output"]
    everything = build_dataset(DataConfig(train=data.train, format="alpaca", max_length=256,
                                          train_on_prompt=True), smollm_tok, "causal-lm")
    assert [e.labels for e in everything] == [e.input_ids for e in everything]


def test_chat_rows_render_with_the_template_and_train_every_assistant_turn(tmp_path, smollm_tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    data = DataConfig(train=write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]),
                      format="chat", max_length=256)
    (example,) = build_dataset(data, smollm_tok, "causal-lm")
    assert smollm_tok.decode(example.input_ids) == smollm_tok.apply_chat_template(
        messages, tokenize=False)
    assert [smollm_tok.decode(run) for run in labelled_runs(example)] == \
        ["Hello.<|im_end|>\n", "4<|im_end|>\n"]
    assert example.target == "4"
    assert smollm_tok.decode(example.input_ids[:example.prompt_length]).endswith(
        "2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_without_a_chat_template_alpaca_uses_the_alpaca_prompt(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = None
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    data = DataConfig(train=write_jsonl(tmp_path / "a.jsonl", rows), format="alpaca")
    (example,) = build_dataset(data, tokenizer, "causal-lm")
    assert tokenizer.decode(example.input_ids) == (
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5<|im_end|>")
    assert [tokenizer.decode(r) for r in labelled_runs(example)] == ["5<|im_end|>"]
    chat = DataConfig(train=write_jsonl(tmp_path / "c.jsonl", [{"messages": []}]), format="chat")
    with pytest.raises(DeltatuneError, match="chat data needs a tokenizer with a chat template"):
        build_dataset(chat, tokenizer, "causal-lm")


def test_gsm8k_rows_are_instructions_and_cut_rows_are_counted(tmp_path):
    tokenizer = byte_tokenizer()  # one token per byte: lengths are easy to reason about
    rows = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
            {"question": "Q" * 200, "answer": "#### 1"}]
    source = write_jsonl(tmp_path / "g.jsonl", rows)
    dataset = build_dataset(DataConfig(train=source, format="gsm8k", max_length=100),
                            tokenizer, "causal-lm")
    assert dataset.stats == {"rows": 2, "examples": 1, "truncated": 1, "dropped": 1,
                             "tokens": len(dataset[0].input_ids), "max_length": 100}
    assert dataset[0].target == "2+3=5\n#### 5"
    assert tokenizer.decode(labelled_runs(dataset[0])[0]) == "2+3=5\n#### 5<|im_end|>\n"
    cut = build_dataset(DataConfig(train=source, format="gsm8k", max_length=40, max_train_rows=1),
                        tokenizer, "causal-lm")
    assert cut.stats["truncated"] == 1 and len(cut[0].input_ids) == 40
    with pytest.raises(DeltatuneError, match="no usable examples"):
        build_dataset(DataConfig(train=source, format="gsm8k", max_length=10), tokenizer,
                      "causal-lm")


def test_plain_text_is_joined_and_cut_into_blocks(tmp_path):
    tokenizer = byte_tokenizer()
    texts = ["", " = Title = \n", "", " Some text here . \n", "more"]
    source = write_jsonl(tmp_path / "w.jsonl", [{"text": t} for t in texts])
    dataset = build_dataset(DataConfig(train=source, format="text", max_length=8), tokenizer,
                            "causal-lm")
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert [t for e in dataset for t in e.input_ids] == stream[:len(stream) // 8 * 8] + (
        stream[len(stream) // 8 * 8:] if len(stream) % 8 >= 2 else [])
    assert all(len(e.input_ids) == 8 for e in dataset.examples[:-1])
    assert all(e.labels == e.input_ids for e in dataset)
    assert dataset.stats["rows"] == 5 and dataset.stats["truncated"] == 0
    (tmp_path / "book.txt").write_text("To be, or not to be.\n" * 3, encoding="utf-8")
    whole = build_dataset(DataConfig(train=str(tmp_path / "book.txt"), format="text",
                                     max_length=16), tokenizer, "causal-lm")
    assert tokenizer.decode([t for e in whole for t in e.input_ids]) == "To be, or not to be.\n" * 3


# ----------------------------------------------------------------------------- batching
def test_dynamic_padding_right_and_left():
    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])]
    right = Collator(pad_token_id=0)(examples)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert "position_ids" not in right
    left = Collator(pad_token_id=0, padding_side="left")(examples)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    pairs = Collator(pad_token_id=0)([Example([1, 2, 3], 1, [0, 0, 1]), Example([4], 0, [0])])
    assert pairs["labels"].tolist() == [1, 0]
    assert pairs["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]


def random_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]  # a masked "prompt" part too
        examples.append(Example(ids, labels))
    return examples


def test_packing_lays_examples_end_to_end_with_restarting_positions():
    examples = random_examples([5, 9, 3, 7, 16])
    batch = Collator(pad_token_id=0, packing=True, max_length=16)(examples)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (3, 16)  # [5, 9] [3, 7] [16]
    assert batch["input_ids"][0, :14].tolist() == examples[0].input_ids + examples[1].input_ids
    assert batch["position_ids"][0].tolist() == list(range(5)) + list(range(9)) + [0, 1]
    assert batch["position_ids"][1].tolist() == list(range(3)) + list(range(7)) + list(range(6))
    assert batch["labels"][0, 5].item() == IGNORE_INDEX  # no loss across the boundary
    assert batch["labels"][1, 10:].tolist() == [IGNORE_INDEX] * 6  # padding


def per_example_losses(logits: torch.Tensor, batch: dict) -> list[float]:
    """Mean next-token loss of each packed example, in order (boundaries from position_ids)."""
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                 ignore_index=IGNORE_INDEX, reduction="none")  # (rows, seq-1)
    losses = []
    for row in range(logits.shape[0]):
        positions = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            labels = batch["labels"][row, start + 1:end]
            if (labels != IGNORE_INDEX).any():  # padding has no labels
                mask = labels != IGNORE_INDEX
                losses.append(token_loss[row, start:end - 1][mask].mean().item())
    return losses


def test_packed_examples_do_not_attend_to_each_other():
    model = tiny_llama()
    examples = random_examples([5, 9, 3, 7, 11, 4], seed=3)
    alone = []
    with torch.no_grad():
        for example in examples:
            single = Collator(pad_token_id=0)([example])
            logits = model(input_ids=single["input_ids"]).logits
            alone.append(F.cross_entropy(logits[0, :-1], single["labels"][0, 1:],
                                         ignore_index=IGNORE_INDEX).item())
        batch = Collator(pad_token_id=0, packing=True, max_length=16)(examples)
        assert batch["input_ids"].shape[0] < len(examples)  # really packed
        # use_cache=False as in training: with a cache transformers ignores packed position ids.
        packed = per_example_losses(model(input_ids=batch["input_ids"], use_cache=False,
                                          position_ids=batch["position_ids"]).logits, batch)
        # Control: the same rows with positions that do not restart let examples see each other.
        plain_positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        leaky = per_example_losses(model(input_ids=batch["input_ids"], use_cache=False,
                                         position_ids=plain_positions).logits, batch)
    assert packed == pytest.approx(alone, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(leaky, alone)) > 1e-3


# ----------------------------------------------------------------------------- real data
def test_real_sst2_dev_and_alpaca(minilm_tok, smollm_tok):
    sst2 = build_dataset(DataConfig(eval=str(SHARED / "sst2" / "dev.jsonl"), max_length=64),
                         minilm_tok, "classification", "eval")
    assert sst2.stats["rows"] == 872 and sst2.stats["truncated"] == 0
    assert sum(e.labels for e in sst2) == 444  # the published label counts (428 / 444)
    alpaca = build_dataset(DataConfig(train=str(SHARED / "alpaca" / "alpaca_en_demo.jsonl"),
                                      format="alpaca", max_length=128, max_train_rows=40),
                           smollm_tok, "causal-lm")
    assert alpaca.stats["rows"] == 40 and alpaca.stats["truncated"] > 0
    assert all(len(e.input_ids) <= 128 for e in alpaca)
    assert all(e.labels[:e.prompt_length] == [IGNORE_INDEX] * e.prompt_length for e in alpaca)
