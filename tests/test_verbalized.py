"""Classification rows taught to a causal LM as instructions (data.format: verbalized)."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

import deltatune as dt
from deltatune.config.run import DataConfig
from deltatune.data.dataset import build_dataset
from deltatune.training.evaluation import answers_match, exact_match, split_prompt
from deltatune.models import resolve_model_path

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "dev.jsonl"
TEMPLATE = "Positive or negative?\n\n{text}"


@pytest.fixture(scope="module")
def chat_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def test_answer_is_the_label_name_and_only_it_carries_loss(chat_tokenizer):
    data = DataConfig(eval=str(SST2_DEV), format="verbalized", prompt_template=TEMPLATE,
                      label_names=["negative", "positive"], max_eval_rows=6, max_length=128)
    dataset = build_dataset(data, chat_tokenizer, "causal-lm", "eval")
    import json
    rows = [json.loads(line) for line in SST2_DEV.read_text().splitlines()[:6]]
    for example, row in zip(dataset, rows):
        prompt, target = split_prompt(example)
        assert target == ["negative", "positive"][row["label"]]
        assert row["text"].strip()[:20] in chat_tokenizer.decode(prompt)
        trained = [t for t, y in zip(example.input_ids, example.labels) if y != -100]
        assert chat_tokenizer.decode(trained).strip().startswith(target)


def test_word_answers_match_on_first_line_case_and_punctuation_aside():
    assert answers_match("Positive.\nBecause ...", "positive")
    assert not answers_match("negative", "positive")
    assert answers_match("The answer is 42", "#### 42")
    assert exact_match(["positive", "Negative!", "pos"], ["positive", "negative", "positive"]) == 2 / 3


def test_verbalized_needs_template_and_label_names():
    with pytest.raises(dt.DeltatuneError, match=r"data.prompt_template: is required by format verbalized"):
        DataConfig(eval="x.jsonl", format="verbalized", label_names=["a", "b"])
    with pytest.raises(dt.DeltatuneError, match=r"data.label_names: is required by format verbalized"):
        DataConfig(eval="x.jsonl", format="verbalized", prompt_template="{text}")


def test_template_field_missing_names_row(chat_tokenizer):
    data = DataConfig(eval=str(SST2_DEV), format="verbalized", prompt_template="{review}",
                      label_names=["negative", "positive"], max_eval_rows=2)
    with pytest.raises(dt.DeltatuneError, match=r"dev.jsonl.*(row|line) 1.*'review'"):
        build_dataset(data, chat_tokenizer, "causal-lm", "eval")
