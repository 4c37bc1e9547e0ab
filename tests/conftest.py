"""Shared test fixtures: tiny random models of each supported family (build offline in ms)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

VOCAB = 128


def tiny_llama(task: str = "causal-lm", num_labels: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, num_labels=num_labels)
    cls = LlamaForSequenceClassification if task == "classification" else LlamaForCausalLM
    return cls(config).eval()


def tiny_bert(task: str = "classification", num_labels: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=256,
                        num_labels=num_labels, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(task: str = "causal-lm", num_labels: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=num_labels,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cls = GPT2ForSequenceClassification if task == "classification" else GPT2LMHeadModel
    return cls(config).eval()


TINY_MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def token_batch(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=generator)


def randomize_trainable(model: torch.nn.Module, seed: int = 2, std: float = 0.05) -> None:
    """Give zero-initialised deltas non-trivial values so comparisons can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path

# A method that has nothing to train on a tiny family says so in one line instead
# (test_conformance checks the line); tests over every method x family skip these pairs.
NOT_APPLICABLE = {("bitfit", "llama"): "has no bias terms"}
