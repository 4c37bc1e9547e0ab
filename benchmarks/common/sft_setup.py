"""The work every SFT benchmark runs, defined once so that all tools get the same examples.

SmolLM2-135M-Instruct (`smollm2-135m`), the 999 alpaca demo rows rendered with the model's chat
template, loss on the response tokens only, max length 512, LoRA r=8 (alpha 16, no dropout) on
the seven linear projections of every layer, batch 8, bf16 autocast, lr 2e-4 decaying linearly
to 0, no warmup, gradient clipping at 1.0, no weight decay.

The examples are tokenized once by deltatune (`build_dataset`); the peers are given the very same
token ids and response masks. The row order is deltatune's seeded, ungrouped `BatchStream`; the
peers read the same rows in the same order (sequential sampler over that order).
"""
from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# DELTATUNE_SFT_DATA: another alpaca-format file (gpu/gpu_check.py sets it on machines without ../shared)
DATA = Path(os.environ.get("DELTATUNE_SFT_DATA")
            or ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_en_demo.jsonl")
MODEL = "smollm2-135m"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
BATCH, MAX_LENGTH, LR, SEED = 8, 512, 2e-4, 0

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # flops, machine: also importable bare

# Llama-3.2-1B's shape (gpu/gpu_lora_sft.py, memory/qlora.py): speed does not depend on the weights'
# values, so a seeded random initialisation stands in for the checkpoint.
LLAMA_1B_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                      max_position_embeddings=131072, rms_norm_eps=1e-5)


def data_config(max_length: int = MAX_LENGTH):
    from deltatune.config.run import DataConfig

    return DataConfig(train=str(DATA), format="alpaca", max_length=max_length)


def load_examples(tokenizer, max_length: int = MAX_LENGTH):
    from deltatune.data.dataset import build_dataset

    return build_dataset(data_config(max_length), tokenizer, "causal-lm", "train", SEED)


def row_order(num_rows: int, steps: int, batch: int = BATCH) -> list[int]:
    """The rows of the first `steps` batches, in training order."""
    from deltatune.training.optimization import BatchStream

    stream = BatchStream(num_rows, batch, SEED)
    return [i for k in range(steps) for i in stream.rows(k)]


def step_examples(dataset, steps: int) -> list[list]:
    """The examples of each of the first `steps` batches, in training order."""
    order = row_order(len(dataset), steps)
    return [[dataset[i] for i in order[k * BATCH:(k + 1) * BATCH]] for k in range(steps)]


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def model_path() -> str:
    from deltatune.models import resolve_model_path

    return str(resolve_model_path(MODEL))


def lora_config():
    """The benchmark's LoRA: r=8, alpha 16, the seven projections of every layer."""
    import deltatune as dt

    return dt.LoraConfig(r=RANK, alpha=ALPHA, target_modules=LORA_TARGETS)


def packed_batches(steps: int):
    """Seeded; the model, its tokenizer, the dataset and its first `steps` batches packed padding-free."""
    import torch

    import deltatune as dt
    from deltatune.data.dataset import Collator

    torch.manual_seed(SEED)
    model, tokenizer = dt.load_model(MODEL)
    dataset = load_examples(tokenizer)
    collate = Collator(tokenizer.pad_token_id, packing=True, max_length=10**9)
    return model, tokenizer, dataset, [collate(examples) for examples in step_examples(dataset, steps)]
