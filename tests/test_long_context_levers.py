"""The long-sequence levers (training/levers.py) change memory, never the numbers: with each one
on, every registered method (variants included) on the tiny Llama, GPT-2 and BERT gives the loss
and gradients it gives with the lever off, within fp32 round-off. Plus what each lever is for:
no O(seq²) tensor kept for backward under sdpa, fewer bytes saved with tiled feed-forward blocks."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import NOT_APPLICABLE, randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

import deltatune as dt
from deltatune.compare.plan import saved_for_backward_bytes
from deltatune.config.run import TrainConfig
from deltatune.errors import DeltatuneError
from deltatune.methods import method_names
from deltatune.training.layer_checkpoint import enable_layer_checkpointing
from deltatune.training.levers import prepare_levers, step_levers
from deltatune.training.losses import batch_loss
from tiny_runs import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {"llama": (tiny_llama, "causal-lm"), "gpt2": (tiny_gpt2, "causal-lm"),
            "bert": (tiny_bert, "classification")}
# lever: (settings off, settings on). checkpoint_offload runs its copy path on the CPU here
# (the trainer allows it only on CUDA, where the copy goes to pinned memory).
LEVERS = {
    "loss_chunk_tokens": ({"loss_chunk_tokens": 0}, {"loss_chunk_tokens": 5}),
    "mlp_tile_tokens": ({}, {"mlp_tile_tokens": 4}),
    "attention": ({"attention": "eager"}, {"attention": "sdpa"}),
    "gradient_checkpointing": ({}, {"gradient_checkpointing": True}),
    "checkpoint_offload": ({}, {"gradient_checkpointing": True, "checkpoint_offload": True}),
}
CAUSAL_ONLY = {"loss_chunk_tokens"}  # a classification head scores one row per example
CASES = [(lever, method, family) for lever in LEVERS for method in sorted(method_names())
         for family in FAMILIES if not (lever in CAUSAL_ONLY and FAMILIES[family][1] != "causal-lm")
         and (method, family) not in NOT_APPLICABLE]


def settings(**values) -> SimpleNamespace:
    return SimpleNamespace(**{**{f: getattr(TrainConfig(), f) for f in TrainConfig.__dataclass_fields__},
                              **values})


def padded_batch(task: str, rows: int = 2, seq: int = 19) -> dict:
    """Two rows, the second with 5 padding positions at the end (masked, no labels)."""
    ids = token_batch(rows, seq)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    if task == "classification":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def prepared(method: str, family: str, train: SimpleNamespace):
    build, task = FAMILIES[family]
    model = dt.apply(build(task), dt.config_from_dict({"name": method})).train()
    randomize_trainable(model)  # zero-initialised deltas would hide errors in their gradients
    if getattr(train, "checkpoint_offload", False):
        enable_layer_checkpointing(model, offload=True)
        train = settings(**{**vars(train), "checkpoint_offload": False, "gradient_checkpointing": False})
    prepare_levers(model, train, torch.device("cpu"))
    return model, task


def loss_and_grads(model, task: str, train: SimpleNamespace, batch: dict):
    torch.manual_seed(0)  # the same dropout draws, should a method's default use dropout
    with step_levers(model, train):
        loss = batch_loss(model, task, batch, chunk_rows=train.loss_chunk_tokens)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("lever,method,family", CASES)
def test_each_lever_gives_the_same_loss_and_gradients(lever, method, family):
    off, on = (settings(**values) for values in LEVERS[lever])
    batch = padded_batch(FAMILIES[family][1])
    ref_loss, ref_grads = loss_and_grads(*prepared(method, family, off), off, batch)
    loss, grads = loss_and_grads(*prepared(method, family, on), on, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_levers_route_what_they_say():
    """Guards against a lever that silently does nothing (and so passes the equality above)."""
    from deltatune.training.tiled_mlp import feed_forward_blocks

    for family, (build, task) in FAMILIES.items():
        model = build(task)
        assert len(feed_forward_blocks(model)) == model.config.num_hidden_layers, family
        prepare_levers(model, settings(attention="eager"), torch.device("cpu"))
        assert model.config._attn_implementation == "eager"
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=4)).train()
    calls = []
    mlp = model.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[-2]))
    original = type(mlp).forward
    tiles = []
    type(mlp).forward = lambda self, x: (tiles.append(x.shape[-2]), original(self, x))[1]
    try:
        with step_levers(model, settings(mlp_tile_tokens=4)):
            batch_loss(model, "causal-lm", padded_batch("causal-lm", seq=10)).backward()
    finally:
        type(mlp).forward = original
    assert calls == [10]               # layer 0's block is called once with the whole sequence,
    assert tiles[:6] == [4, 4, 2] * 2  # both layers' blocks compute tiles,
    assert sorted(tiles[6:]) == sorted([4, 4, 2] * 2)  # and again in backward (last tile first)


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_keeps_no_seq_squared_tensor_for_backward(family):
    build, task = FAMILIES[family]
    seq = 200
    batch = {k: v[:1] for k, v in padded_batch(task, seq=seq).items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if task == "causal-lm":
        batch["labels"] = batch["input_ids"].clone()
    squares = {}
    for choice in ("eager", "sdpa"):
        model = dt.apply(build(task), dt.LoraConfig(r=4)).train()
        prepare_levers(model, settings(attention=choice), torch.device("cpu"))
        shapes = []

        def keep(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor.detach()  # no cycle back into the graph: it is freed with the loss

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            batch_loss(model, task, batch)
        squares[choice] = [shape for shape in shapes if shape.count(seq) >= 2]
    assert squares["eager"]          # the check can fail: eager keeps (heads, seq, seq) scores
    assert squares["sdpa"] == []     # sdpa keeps O(seq) per head


def test_tiled_feed_forward_saves_fewer_bytes_for_backward():
    model = dt.apply(tiny_llama(), dt.FullConfig()).train()
    batch = {"input_ids": token_batch(1, 64), "labels": token_batch(1, 64)}
    plain = saved_for_backward_bytes(model, "causal-lm", batch, packed=False, bf16=False)
    with step_levers(model, settings(mlp_tile_tokens=16)):
        tiled = saved_for_backward_bytes(model, "causal-lm", batch, packed=False, bf16=False)
    # per layer, the MLP kept its input, gate, up and SiLU outputs and their product (5 x 64 x
    # 128 floats ... of the 2 layers' total); tiled it keeps its input only
    assert tiled < 0.8 * plain


def test_bf16_checkpoints_are_exact_when_the_stream_already_is_bf16():
    batch = padded_batch("causal-lm")
    results = []
    for values in ({"gradient_checkpointing": True},
                   {"gradient_checkpointing": True, "checkpoint_bf16": True}):
        train = settings(**values)
        model = dt.apply(tiny_llama().to(torch.bfloat16), dt.LoraConfig(r=4)).train()
        randomize_trainable(model)
        prepare_levers(model, train, torch.device("cpu"))
        results.append(loss_and_grads(model, "causal-lm", train, batch))
    (ref_loss, ref_grads), (loss, grads) = results
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads) and len(grads) > 0


def test_bf16_checkpoints_round_an_fp32_stream_only_to_bf16():
    batch = padded_batch("causal-lm")
    results = []
    for values in ({}, {"gradient_checkpointing": True, "checkpoint_bf16": True}):
        train = settings(**values)
        results.append(loss_and_grads(*prepared("lora", "llama", train), train, batch))
    (ref_loss, ref_grads), (loss, grads) = results
    assert not torch.equal(loss, ref_loss)  # rounded: not the same function
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_lever_settings_are_validated():
    for values, key in (({"loss_chunk_tokens": -1}, "train.loss_chunk_tokens"),
                        ({"mlp_tile_tokens": 1.5}, "train.mlp_tile_tokens"),
                        ({"attention": "flash"}, "train.attention"),
                        ({"checkpoint_offload": True}, "train.checkpoint_offload"),
                        ({"checkpoint_bf16": True}, "train.checkpoint_bf16")):
        with pytest.raises(DeltatuneError, match=key):
            TrainConfig(**values)
    with pytest.raises(DeltatuneError, match="train.checkpoint_offload: needs a CUDA device"):
        prepare_levers(tiny_llama(), settings(gradient_checkpointing=True, checkpoint_offload=True),
                       torch.device("cpu"))


def test_the_trainer_applies_the_levers_and_trains_the_same_run(tmp_path, monkeypatch):
    """Through train_from_config: a run with every CPU lever on logs the losses of the run
    without them, step for step (padding-free rows on the tiny chat Llama)."""
    import json

    from deltatune.training import tiled_mlp
    from deltatune.training.loop import train_from_config
    from tiny_runs import causal_config, tiny_llama_dir

    tiles = []
    plain_tiled = tiled_mlp.tiled
    monkeypatch.setattr(tiled_mlp, "tiled", lambda *args: (tiles.append(1), plain_tiled(*args))[1])
    config = causal_config(tmp_path, tiny_llama_dir(tmp_path), rows=16)
    losses, tiled_calls = {}, {}
    for name, overrides in {"off": ["train.loss_chunk_tokens=0"],
                            "on": ["train.loss_chunk_tokens=7", "train.mlp_tile_tokens=8",
                                   "train.gradient_checkpointing=true"]}.items():
        out = tmp_path / "runs" / name
        train_from_config(str(config), [f"output_dir={out}", "train.max_steps=3", "data.eval=null",
                                        *overrides])
        log = (out / "metrics.jsonl").read_text().splitlines()
        losses[name] = [r["loss"] for r in map(json.loads, log) if "loss" in r]
        tiled_calls[name] = len(tiles)
        tiles.clear()
    assert tiled_calls["off"] == 0 and tiled_calls["on"] > 0  # the trainer routed the blocks
    assert len(losses["on"]) == 3
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5, abs=1e-6)
