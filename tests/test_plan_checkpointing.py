"""plan under gradient checkpointing against measured one-row peaks (benchmarks/results/memory/
*-checkpoint-probes-*.json, the latest: Llama-3.2-1B's width at several depths and 1k-8k tokens,
SmolLM2-135M; bf16 or fp32 as the machine that measured them trains), recomputed from each
model's shape alone: a two-layer model of that width (and a small vocabulary) gives the bytes a
layer and the rest of the step save (the first layer saves less than the others: its input needs
no gradient); the depth, the vocabulary's logits and the measured process baseline enter by
formula. No full model is built.

And the arithmetic of a checkpointed step: every layer keeps its input, the heap blocks of its
freed activations only while they are below glibc's mmap threshold, and the peak takes the
larger of the loss's moment and backward's."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import deltatune as dt
from deltatune.compare.activations import (HEAP_STREAMS, MMAP_THRESHOLD_MAX, SavedBytes,
                                            chunk_logit_bytes, step_activation_bytes)
from deltatune.compare.max_length import ONE_STEP_FACTOR, length_activation_bytes, saved_curve
from deltatune.compare.plan import RUNTIME_ALLOWANCE_BYTES
from deltatune.config.run import DataConfig, TrainConfig
from deltatune.methods.base import count_parameters

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Rows plan is known to miss by more than the tolerance, by row id, with why. Each is a strict
# xfail: the day plan gets one right the test fails, so the list cannot outlive the miss.
KNOWN_MISSES = {
    "h576-L30-fp32-2048": "fp32 SmolLM2: the peak grows 2.3-3.4x as fast with the length as in bf16, not "
                          "2x; the heap model (HEAP_STREAMS) was fitted on bf16 runs",
    "h576-L30-fp32-4096": "as at 2,048 tokens",
}


def probe_rows() -> list[dict]:
    """The latest probes (the file name starts with its date): measured with the current code."""
    (path,) = sorted(RESULTS.glob("*-checkpoint-probes-lora-*.json"))[-1:]
    return json.loads(path.read_text())["rows"]


def row_id(row: dict) -> str:
    precision = "bf16" if row["train"].get("bf16", True) else "fp32"
    chunk = row["train"].get("loss_chunk_tokens")
    return (f"h{row['shape']['hidden_size']}-L{row['shape']['num_hidden_layers']}-{precision}-{row['length']}"
            + (f"-chunk{chunk}" if chunk else ""))


def shallow_of(shape: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{k: shape[k] for k in ("hidden_size", "intermediate_size",
                                                  "num_attention_heads", "num_key_value_heads",
                                                  "head_dim")},
                         num_hidden_layers=2, vocab_size=512, tie_word_embeddings=True,
                         max_position_embeddings=4096, pad_token_id=0)
    return LlamaForCausalLM(config).to(dtype)


def recomputed(rows: list[dict]) -> list[tuple[dict, int]]:
    """(row, plan's one-step peak for it, recomputed from the row's shape and baseline)."""
    out = []
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row["shape"], row["train"]], sort_keys=True), []).append(row)
    for rows_of_model in groups.values():
        shape, train_values = rows_of_model[0]["shape"], rows_of_model[0]["train"]
        assert shape["model_type"] == "llama"
        bf16 = train_values.get("bf16", True)
        model = shallow_of(shape, torch.bfloat16 if bf16 else torch.float32)
        adapted = dt.apply(model, dt.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
        train = TrainConfig(**{"batch_size": 1, "bf16": True, "gradient_checkpointing": True, **train_values})
        run = SimpleNamespace(task="causal-lm", data=DataConfig(train="x.jsonl", max_length=768))
        curve = saved_curve(adapted, run, train, 0, bf16=bf16)
        layers = shape["num_hidden_layers"]
        # LoRA's weights (4 B), gradients (4 B) and AdamW moments (8 B) live in the layers
        delta = 16 * count_parameters(adapted)[0] * layers // 2
        for row in rows_of_model:
            length = row["length"]
            activations = length_activation_bytes(curve(length), length, shape["hidden_size"],
                                                  shape["vocab_size"], "causal-lm", train, bf16,
                                                  layers=layers)
            out.append((row, row["baseline_bytes"] + delta + RUNTIME_ALLOWANCE_BYTES + activations))
    return out


@functools.lru_cache(maxsize=1)
def recomputed_probes() -> tuple[tuple[dict, int], ...]:
    return tuple(recomputed(probe_rows()))


def test_the_probes_cover_two_widths_several_depths_and_lengths():
    rows = probe_rows()
    assert {r["shape"]["hidden_size"] for r in rows} >= {576, 2048}  # two widths
    wide = [r for r in rows if r["shape"]["hidden_size"] == 2048]
    assert len({r["shape"]["num_hidden_layers"] for r in wide}) >= 2  # per-layer terms, not just the head
    assert {1024, 2048, 4096} <= {r["length"] for r in wide}
    assert set(KNOWN_MISSES) <= {row_id(r) for r in rows}  # no stale entry


@pytest.mark.parametrize("index", range(len(probe_rows())), ids=[row_id(r) for r in probe_rows()])
def test_plan_recomputed_from_the_shape_is_within_15_percent_of_the_measured_peak(index, request):
    row, predicted = recomputed_probes()[index]
    if row_id(row) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[row_id(row)]))
    error = predicted / row["measured_bytes"] - 1
    # the recomputation is plan's own (the committed prediction, made on the loaded model)
    assert predicted == pytest.approx(row["planned_bytes"], rel=0.03), row
    if row["train"].get("loss_chunk_tokens"):
        # a small logits chunk: backward's moment (one layer recomputed) is the peak, which
        # ONE_STEP_FACTOR counts as on small models whose blocks all stay in the heap; on
        # wide layers, mapped blocks, it errs high: the safe side for --max-length auto
        assert -0.15 <= error <= 0.25, (row["model"], row["length"], error)
    else:
        assert abs(error) <= 0.15, (row["model"], row["length"], error)


def saved(**values) -> SavedBytes:
    return SavedBytes(**{"layers": 4, "input_width": 2, **values})


def test_a_checkpointed_step_keeps_each_layer_input_and_the_larger_moment():
    train = SimpleNamespace(gradient_checkpointing=True)
    hidden, tokens = 64, 1000
    measured = saved(total=10**9, one_layer=5 * 10**6, outside=10**6)
    stream = tokens * hidden * 2
    kept = 4 * stream * (1 + HEAP_STREAMS)
    # the loss's moment: a large logits chunk
    assert step_activation_bytes(measured, tokens, hidden, 10**8, 1.5, train) == \
        int(kept + 10**8 + 1.5 * 10**6)
    # backward's moment: one layer recomputed beside the rest
    assert step_activation_bytes(measured, tokens, hidden, 0, 1.5, train) == \
        int(kept + 1.5 * 6 * 10**6)
    # what autograd saves for the whole depth does not count: only one layer exists again
    assert step_activation_bytes(saved(total=10**12, one_layer=5 * 10**6, outside=10**6),
                                 tokens, hidden, 0, 1.5, train) == int(kept + 1.5 * 6 * 10**6)
    # bf16 checkpoints halve an fp32 stream's inputs; offloaded ones leave the device
    fp32 = saved(one_layer=0, outside=0, input_width=4)
    plain = step_activation_bytes(fp32, tokens, hidden, 0, 1.0, train)
    bf16 = step_activation_bytes(fp32, tokens, hidden, 0, 1.0,
                                 SimpleNamespace(gradient_checkpointing=True, checkpoint_bf16=True))
    offload = step_activation_bytes(fp32, tokens, hidden, 0, 1.0,
                                    SimpleNamespace(gradient_checkpointing=True, checkpoint_offload=True))
    assert plain - bf16 == 4 * tokens * hidden * 2 and plain - offload == 4 * tokens * hidden * 4
    # without checkpointing: everything saved, times the factor
    assert step_activation_bytes(measured, tokens, hidden, 7, 1.5, SimpleNamespace()) == int(1.5 * 10**9 + 7)


def test_blocks_at_the_mmap_threshold_leave_nothing_in_the_heap():
    """From the length where a hidden state reaches glibc's mmap threshold, a layer keeps its
    input only: the peak grows more slowly per token beyond it (measured: Llama-3.2-1B's width
    peaked lower at 8k tokens than at 4k)."""
    train = SimpleNamespace(gradient_checkpointing=True)
    hidden = 2048
    edge = MMAP_THRESHOLD_MAX // (hidden * 2)  # 8192 tokens of a bf16 stream
    below = step_activation_bytes(saved(), edge - 1, hidden, 0, 1.0, train)
    at = step_activation_bytes(saved(), edge, hidden, 0, 1.0, train)
    assert below == int(4 * (edge - 1) * hidden * 2 * (1 + HEAP_STREAMS))
    assert at == 4 * edge * hidden * 2 < below


def test_the_loss_logits_count_one_chunk_worked_in_place():
    """tests/test_train.py measures these bytes on the loss itself."""
    vocab = 1000
    assert chunk_logit_bytes(1024, vocab, 1024, bf16=True) == int(1024 * vocab * 4 * 1.5)
    assert chunk_logit_bytes(1024, vocab, 1024, bf16=False) == 1024 * vocab * 4
    assert chunk_logit_bytes(5000, vocab, 1024, bf16=False) == 1024 * vocab * 4  # more chunks: the same
    assert chunk_logit_bytes(5000, vocab, 0) == 5000 * vocab * 4  # 0: one chunk of every row
    assert ONE_STEP_FACTOR > 1
