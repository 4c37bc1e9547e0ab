"""The training loop: what it trains, how it computes the loss, what a run leaves behind, and the
one-line errors `deltatune train` gives for bad input."""
from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
import yaml
from safetensors.torch import load_file

from conftest import tiny_gpt2, tiny_llama
from deltatune import LoraConfig, PrefixConfig, apply, count_parameters, get_method
from deltatune.cli import main
from deltatune.config.run import load_run_config
from deltatune.training.losses import batch_loss, count_targets
from deltatune.training.optimization import BatchStream, build_optimizer, lr_factor
from deltatune.training.loop import train_from_config
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import (causal_config, classification_config, tiny_bert_dir, tiny_llama_dir,
                       write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the LM loss
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("wrapped_head", [False, True])
def test_chunked_lm_loss_matches_full_logits_loss_and_gradients(make, wrapped_head):
    """Head applied only at labelled positions, in chunks, gradients computed chunk by chunk:
    same loss and same gradients as transformers' own loss over full logits."""
    model = make()
    if wrapped_head:  # a head that is not a plain nn.Linear takes the checkpointed path
        model.lm_head = torch.nn.Sequential(model.lm_head)
    model.train()
    ids = torch.randint(3, 128, (3, 11))
    labels = ids.clone()
    labels[0, :5] = -100   # a prompt
    labels[2, 8:] = -100   # padding
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = batch_loss(model, "causal-lm", {"input_ids": ids, "labels": labels})
    ours = ours / count_targets("causal-lm", labels)
    ours.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and got
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-6), name


def test_fused_loss_small_chunks_equal_one_chunk():
    from deltatune.training.losses import linear_cross_entropy

    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    grads = []
    for chunk in (4, 1024):
        hidden.grad = None
        head.zero_grad()
        loss = linear_cross_entropy(hidden, head, targets, chunk_rows=chunk)
        loss.backward()
        grads.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    reference = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    assert torch.allclose(grads[0][0], reference, atol=1e-4)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- pieces
def test_optimizer_holds_state_for_trainable_parameters_only():
    model = tiny_llama()
    apply(model, LoraConfig(r=2))
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in params) == count_parameters(model)[0]
    assert all(p.requires_grad for p in params)
    no_decay = next(g for g in optimizer.param_groups if g["weight_decay"] == 0.0) \
        if len(optimizer.param_groups) > 1 else None
    assert no_decay is None or all(p.ndim < 2 for p in no_decay["params"])


def test_schedule_warms_up_then_decays():
    linear = [lr_factor(s, 3, 10, "linear") for s in range(10)]
    assert linear[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert linear[3] == 1.0 and all(a > b for a, b in zip(linear[3:], linear[4:])) and linear[-1] > 0
    cosine = [lr_factor(s, 0, 10, "cosine") for s in range(10)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[-1] > 0
    assert [lr_factor(s, 2, 10, "constant") for s in range(2, 10)] == [1.0] * 8


def test_length_grouped_batches_cover_every_row_once_per_epoch_and_pad_less():
    lengths = [int(x) for x in torch.randint(1, 60, (1000,), generator=torch.Generator().manual_seed(0))]
    grouped = BatchStream(1000, 32, seed=0, lengths=lengths)
    plain = BatchStream(1000, 32, seed=0)
    for stream in (grouped, plain):
        rows = [i for k in range(stream.per_epoch) for i in stream.rows(k)]
        assert sorted(rows) == list(range(1000))
    padded = lambda s: sum(max(lengths[i] for i in s.rows(k)) * len(s.rows(k)) for k in range(s.per_epoch))
    assert padded(grouped) < 0.7 * padded(plain)
    assert grouped.rows(0) != BatchStream(1000, 32, seed=0, lengths=lengths).rows(grouped.per_epoch)


# ----------------------------------------------------------------------------- whole runs
def test_run_directory_holds_delta_config_metrics_events_summary(tmp_path):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=32,
                                   epochs=2, eval_every=2, log_every=1)
    out = tmp_path / "runs" / "out"
    summary = train_from_config(str(config), [f"output_dir={out}"])
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
            "summary.json", "tensorboard", "tokenizer.json", "best"} <= names
    assert not any(n.startswith(".") for n in names) and not list(out.parent.glob(".*"))
    resolved = load_run_config(out / "config.yaml")
    assert resolved.method["name"] == "lora" and resolved.num_labels == 2
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["steps"] + 1))
    assert all({"lr", "tokens_per_s", "grad_norm", "epoch"} <= r.keys() for r in steps)
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4, 6, 8]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["trainable_params"] == sum(t.numel() for t in load_file(str(out / "adapter_model.safetensors")).values())
    assert summary["total_params"] > summary["trainable_params"] > 0
    assert summary["peak_memory_bytes"] > 50e6 and summary["saved_size_bytes"] > 0
    assert summary["final_eval"]["accuracy"] == records[-1]["eval_accuracy"]
    assert list((out / "tensorboard").iterdir())


def test_training_lowers_the_loss(tmp_path):
    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=16, epochs=8, lr=1e-3)
    out = tmp_path / "lm"
    summary = train_from_config(str(config), [f"output_dir={out}", "method.name=full"])
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4
    assert summary["final_eval"]["perplexity"] == pytest.approx(math.exp(summary["final_eval"]["loss"]))
    assert summary["final_eval"]["loss"] < 0.75 * losses[0]


def test_lora_training_leaves_the_base_weights_untouched(tmp_path):
    from deltatune import load_adapter, load_model

    model_dir = tiny_llama_dir(tmp_path)
    config = causal_config(tmp_path / "cfg", model_dir, rows=8, max_steps=3)
    out = tmp_path / "lm"
    train_from_config(str(config), [f"output_dir={out}", "method.target_modules=all-linear"])
    model, _ = load_model(str(model_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_adapter(model, out)
    assert any(t.abs().max() > 0 for k, t in load_file(str(out / "adapter_model.safetensors")).items()
               if "lora_B" in k)
    live = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
            if ".deltas." not in k}
    assert before.keys() == live.keys()
    for key in before:
        assert torch.equal(before[key], live[key]), key


def test_full_fine_tuning_learns_the_task_and_saves_a_model(tmp_path):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=512, epochs=4,
                                   lr=1e-3)
    out = tmp_path / "full"
    summary = train_from_config(str(config), [f"output_dir={out}", "method.name=full"])
    assert summary["final_eval"]["accuracy"] >= 0.75  # chance is 0.5; the words are bytes here
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert summary["trainable_params"] == summary["total_params"]


def test_grad_accumulation_matches_the_larger_batch(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    config = causal_config(tmp_path / "cfg", model_dir, rows=16, max_steps=3)
    common = ["train.group_by_length=false", "train.bf16=false"]
    train_from_config(str(config), [f"output_dir={tmp_path / 'a'}", "train.batch_size=8", *common])
    train_from_config(str(config), [f"output_dir={tmp_path / 'b'}", "train.batch_size=4",
                                    "train.grad_accum=2", *common])
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


def test_gradient_checkpointing_and_bf16_train_a_frozen_base(tmp_path):
    model_dir = tiny_llama_dir(tmp_path)
    config = causal_config(tmp_path / "cfg", model_dir, rows=8, max_steps=2)
    common = ["train.group_by_length=false"]
    plain = train_from_config(str(config), [f"output_dir={tmp_path / 'a'}", *common])
    checkpointed = train_from_config(str(config), [f"output_dir={tmp_path / 'b'}",
                                                   "train.gradient_checkpointing=true", *common])
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    for key in a:  # recomputing activations changes nothing but memory
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    bf16 = train_from_config(str(config), [f"output_dir={tmp_path / 'c'}", "train.bf16=true", *common])
    assert bf16["bf16"] is True and math.isfinite(bf16["final_eval"]["loss"])
    assert abs(bf16["final_eval"]["loss"] - plain["final_eval"]["loss"]) < 0.05


def test_early_stopping_stops_when_the_metric_stalls(tmp_path):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=64, epochs=1,
                                   lr=1e-12, eval_every=1, early_stopping_patience=2)
    summary = train_from_config(str(config), [f"output_dir={tmp_path / 'es'}"])
    assert summary["stopped_early"] is True
    assert summary["steps"] == 3 and summary["best"]["step"] == 1


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr=0.0123"], lambda: 0.0123),                                   # the config's train.lr
    (["train.lr="], lambda: get_method("lora").default_lr),                  # unset: the method's
    (["train.lr=", "method.name=prefix", "method.projection=lstm", "method.num_virtual_tokens=2"],
     lambda: PrefixConfig(projection="lstm").suggested_lr()),                # unset: what its options need
])
def test_the_run_configs_lr_is_the_lr_adamw_steps_with(tmp_path, monkeypatch, overrides, expected):
    """`deltatune train` from the command line to torch.optim.AdamW's param groups."""
    from deltatune.training import loop

    built = []
    monkeypatch.setattr(loop, "build_optimizer", lambda *a, **k: built.append(build_optimizer(*a, **k)) or built[-1])
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=16)
    out = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={out}", "train.max_steps=1", "train.schedule=constant",
                 "train.warmup_ratio=0", "data.eval=", *overrides]) == 0
    (optimizer,) = built
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected()] * len(optimizer.param_groups))
    assert [g["initial_lr"] for g in optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert json.loads((out / "summary.json").read_text())["lr"] == pytest.approx(expected())


# ----------------------------------------------------------------------------- bad input
def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("deltatune: error: ")
    return last


@pytest.fixture
def workspace(tmp_path):
    config = classification_config(tmp_path, tiny_bert_dir(tmp_path), rows=16, max_steps=1)
    return tmp_path, config


def _edit(config, **changes):
    values = yaml.safe_load(config.read_text())
    for dotted, value in changes.items():
        node = values
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.write_text(yaml.safe_dump(values))


@pytest.mark.parametrize("case, expect", [
    ("missing_file", ["nope.jsonl", "not found"]),
    ("missing_field", ["train.jsonl", "line 2", "text"]),
    ("label_outside", ["train.jsonl", "line 3", "label 7"]),
    ("empty", ["train.jsonl"]),
    ("unknown_key", ["train.batch_sise", "batch_size"]),
    ("wrong_type", ["train.lr", "number"]),
    ("resume_without_checkpoint", ["no checkpoint"]),
    ("existing_output", ["already exists", "--overwrite"]),
])
def test_bad_input_gives_one_line_and_exit_2(workspace, capsys, case, expect):
    root, config = workspace
    argv = ["train", str(config)]
    train_file = root / "data" / "train.jsonl"
    if case == "missing_file":
        _edit(config, data__train="data/nope.jsonl")
    elif case == "missing_field":
        write_jsonl(train_file, [{"text": "good", "label": 1}, {"txt": "bad", "label": 0}])
    elif case == "label_outside":
        write_jsonl(train_file, [{"text": "a", "label": 0}, {"text": "b", "label": 1},
                                 {"text": "c", "label": 7}])
        _edit(config, data__label_names=["neg", "pos"])
    elif case == "empty":
        train_file.write_text("")
    elif case == "unknown_key":
        argv.append("train.batch_sise=8")
    elif case == "wrong_type":
        argv.append("train.lr=fast")
    elif case == "resume_without_checkpoint":
        argv.append("--resume")
    elif case == "existing_output":
        (root / "runs" / "out").mkdir(parents=True)
    line = _one_line_error(capsys, argv)
    for part in expect:
        assert part in line, line
    assert not (root / "runs" / "out" / "summary.json").exists()


def test_fused_loss_computes_no_gradients_under_no_grad(monkeypatch):
    """Evaluation reuses the loss; under no_grad it must skip the gradient matmuls."""
    from deltatune.training import losses

    head = torch.nn.Linear(8, 20)
    hidden = torch.randn(5, 8, requires_grad=True)
    targets = torch.randint(0, 20, (5,))
    calls = []
    real = losses._add_chunk_gradients
    monkeypatch.setattr(losses, "_add_chunk_gradients", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        value = losses.linear_cross_entropy(hidden, head, targets)
    assert not calls  # softmax (the first step of the gradient) never computed
    assert torch.allclose(value, torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum"))
    losses.linear_cross_entropy(hidden, head, targets).backward()
    assert calls  # ... and with gradients on it is


class _LiveLogitBytes(TorchDispatchMode):
    """The most bytes of newly allocated (rows, vocab) tensors alive at once (views and in-place
    results share an input's storage and are not counted again)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.live, self.peak, self.storages = vocab, 0, 0, set()

    def _release(self, key: int, size: int) -> None:
        self.storages.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not (isinstance(tensor, torch.Tensor) and tensor.ndim == 2 and tensor.shape[-1] == self.vocab):
                continue
            key = tensor.untyped_storage().data_ptr()
            if key in inputs or key in self.storages:  # a view, or an in-place result
                continue
            size = tensor.untyped_storage().nbytes()
            self.storages.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release, key, size)
        return out


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_keeps_one_chunk_of_logits_alive_as_plan_counts(bf16):
    """Three chunks: the loss never holds more (rows, vocab) bytes than one chunk's worth, the
    figure plan adds for the loss (compare/activations.py chunk_logit_bytes)."""
    from deltatune.compare.activations import chunk_logit_bytes
    from deltatune.training.losses import linear_cross_entropy

    vocab, rows, chunk = 97, 30, 10
    head = torch.nn.Linear(16, vocab)
    hidden = torch.randn(rows, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        with _LiveLogitBytes(vocab) as tracker:
            loss = linear_cross_entropy(hidden, head, targets, chunk_rows=chunk)
    loss.backward()
    assert tracker.peak == chunk_logit_bytes(rows, vocab, chunk, bf16)
    assert tracker.peak <= 1.5 * chunk * vocab * 4
