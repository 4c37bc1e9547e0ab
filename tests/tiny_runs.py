"""Tiny saved models, data files and run configs for the trainer's tests (built in well under 1 s)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from byte_tokenizer import byte_tokenizer, tiny_chat_llama

POSITIVE = ["good", "great", "fine", "superb", "lovely", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "sad"]
FILLER = ["the", "film", "plot", "was", "very", "quite", "and", "a", "story", "cast"]


def tiny_bert_dir(root: Path, seed: int = 0) -> Path:
    """A tiny random BERT classifier saved with the byte tokenizer (vocab 259)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=len(tokenizer), max_position_embeddings=256,
                        num_labels=2, pad_token_id=0, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    path = Path(root) / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_llama_dir(root: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_chat_llama(seed)
    path = Path(root) / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Short texts whose label is carried by one sentiment word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
            for w in (rng.choice(POSITIVE + NEGATIVE) for _ in range(n))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def classification_config(root: Path, model_dir: Path, rows: int = 64, **train) -> Path:
    root = Path(root)
    write_jsonl(root / "data" / "train.jsonl", sentiment_rows(rows, seed=1))
    write_jsonl(root / "data" / "dev.jsonl", sentiment_rows(32, seed=2))
    return write_config(root / "run.yaml", {
        "model": str(model_dir), "task": "classification",
        "data": {"train": "data/train.jsonl", "eval": "data/dev.jsonl", "max_length": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"batch_size": 8, "lr": 5e-3, "log_every": 1, "bf16": False, **train},
        "output_dir": str(root / "runs" / "out"),
    })


def causal_config(root: Path, model_dir: Path, rows: int = 32, **train) -> Path:
    root = Path(root)
    write_jsonl(root / "data" / "alpaca.jsonl", alpaca_rows(rows, seed=1))
    return write_config(root / "lm.yaml", {
        "model": str(model_dir), "task": "causal-lm",
        "data": {"train": "data/alpaca.jsonl", "eval": "data/alpaca.jsonl", "format": "alpaca",
                 "max_length": 128, "max_eval_rows": 8},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "train": {"batch_size": 4, "lr": 1e-2, "log_every": 1, "bf16": False, **train},
        "output_dir": str(root / "runs" / "lm"),
    })


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny models run fastest on one thread, and a busy shared CPU makes spinning OpenMP
    threads very slow; restored afterwards for tests that use real models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
