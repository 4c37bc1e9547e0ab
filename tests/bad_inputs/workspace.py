"""The workspace every bad-input case starts from: tiny models, good data, good configs and
good adapters, so that each case breaks exactly one thing (built once, copied per case)."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tiny_runs, byte_tokenizer

from tiny_runs import (alpaca_rows, sentiment_rows, tiny_bert_dir, tiny_llama_dir,  # noqa: E402
                       write_config, write_jsonl)

# What the case files may name (paths relative to the workspace root, the working directory).
LAYOUT = """
bert/                tiny random BERT classifier + byte tokenizer
llama/               tiny random Llama causal LM + byte tokenizer
data/train.jsonl     16 sentiment rows {text, label}
data/dev.jsonl       8 sentiment rows
data/alpaca.jsonl    8 instruction rows {instruction, input, output}
run.yaml             classification LoRA run on bert (output_dir: out)
lm.yaml              causal-lm LoRA run on llama (output_dir: lm_out)
adapter/             a LoRA adapter for bert (SEQ_CLS, with its classifier head)
llama_adapter/       a LoRA adapter for llama (CAUSAL_LM)
prompt_adapter/      a prompt-tuning adapter for llama (cannot be merged)
finished/            an existing run directory (summary.json, adapter files)
"""


def build_workspace(root: Path) -> Path:
    import torch

    import deltatune as dt
    from deltatune.methods.prompt import PromptTuningConfig

    root = Path(root)
    bert = tiny_bert_dir(root).rename(root / "bert")
    llama = tiny_llama_dir(root).rename(root / "llama")
    write_jsonl(root / "data" / "train.jsonl", sentiment_rows(16, seed=1))
    write_jsonl(root / "data" / "dev.jsonl", sentiment_rows(8, seed=2))
    write_jsonl(root / "data" / "alpaca.jsonl", alpaca_rows(8, seed=1))
    write_config(root / "run.yaml", {
        "model": "bert", "task": "classification",
        "data": {"train": "data/train.jsonl", "eval": "data/dev.jsonl", "max_length": 32},
        "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "bf16": False},
        "output_dir": "out",
    })
    write_config(root / "lm.yaml", {
        "model": "llama", "task": "causal-lm",
        "data": {"train": "data/alpaca.jsonl", "format": "alpaca", "max_length": 64},
        "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "bf16": False},
        "output_dir": "lm_out",
    })
    torch.manual_seed(0)
    model, _ = dt.load_model(str(bert), task="classification", num_labels=2)
    model.name_or_path = "bert"
    dt.save_adapter(dt.apply(model, dt.LoraConfig(r=2, target_modules=["query", "value"])),
                    root / "adapter")
    model, _ = dt.load_model(str(llama), task="causal-lm")
    model.name_or_path = "llama"
    dt.save_adapter(dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])),
                    root / "llama_adapter")
    model, _ = dt.load_model(str(llama), task="causal-lm")
    model.name_or_path = "llama"
    dt.save_adapter(dt.apply(model, PromptTuningConfig(num_virtual_tokens=2)), root / "prompt_adapter")
    finished = root / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text('{"steps": 7}\n')
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (finished / name).write_bytes((root / "adapter" / name).read_bytes())
    return root
