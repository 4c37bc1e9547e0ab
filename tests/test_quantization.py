"""A quantized frozen base (bitsandbytes nf4 / fp4 / int8): loading, every PEFT method training on
it, save/load, PEFT interop both ways, merged export, gradient checkpointing, config and CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_trainable
from tiny_runs import causal_config, one_thread, tiny_bert_dir, tiny_llama_dir  # noqa: F401

import deltatune as dt
from deltatune.quantization import SIDECAR, QuantizationConfig, is_quantized_linear, keep_one_weight_layout

pytest.importorskip("bitsandbytes")
FP32 = QuantizationConfig(type="nf4", compute_dtype="float32")  # tight comparisons
PEFT_METHODS = ["lora", "adapter", "prompt", "ptuning", "prefix"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("q"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("qb"))


def ids(seed: int = 1, batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(3, 250, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_only_transformer_linears_are_quantized(llama_dir, kind):
    model, _ = dt.load_model(str(llama_dir), quantize=kind)
    dense, _ = dt.load_model(str(llama_dir))
    quantized = [p for p, m in model.named_modules() if is_quantized_linear(m)]
    assert len(quantized) == 2 * 7 and all(p.startswith("model.layers.") for p in quantized)
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    x = ids()
    ours, ref = logits(model, x), logits(dense, x)
    relative = ((ours - ref).norm() / ref.norm()).item()
    assert 0 < relative < (0.05 if kind == "int8" else 0.3), relative  # lossy, not broken
    assert model.deltatune_quantization.type == kind


def test_bert_head_and_pooler_stay_dense(bert_dir):
    model, _ = dt.load_model(str(bert_dir), task="classification", quantize="nf4")
    assert is_quantized_linear(model.bert.encoder.layer[0].attention.self.query)
    assert type(model.classifier) is torch.nn.Linear
    assert type(model.bert.pooler.dense) is torch.nn.Linear


def test_count_parameters_counts_the_weights_a_4bit_tensor_stands_for(llama_dir):
    dense, _ = dt.load_model(str(llama_dir))
    model, _ = dt.load_model(str(llama_dir), quantize="nf4")
    assert dt.count_parameters(model)[1] == dt.count_parameters(dense)[1]


@pytest.mark.parametrize("value,message", [
    ("nf5", r"quantize: unknown value 'nf5' \(one of none, nf4, fp4, int8\)"),
    ({"type": "nf4", "bits": 3}, r"quantize.bits: unknown key"),
    ({"type": "nf4", "compute_dtype": "int4"}, r"quantize.compute_dtype: must be one of"),
])
def test_bad_quantize_values_are_one_line(llama_dir, value, message):
    with pytest.raises(dt.DeltatuneError, match=message):
        dt.load_model(str(llama_dir), quantize=value)


# ------------------------------------------------------------------ every PEFT method trains
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_peft_method_trains_on_a_quantized_base(llama_dir, method, kind, one_thread):  # noqa: F811
    model, _ = dt.load_model(str(llama_dir), quantize=kind)
    dt.apply(model, dt.get_method(method).config())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = ids(seed=3, batch=4, seq=12)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    live = dict(model.named_parameters())
    assert all(torch.equal(live[n], before) for n, before in frozen.items())


def test_full_fine_tuning_on_a_quantized_base_is_refused(llama_dir, tmp_path):
    model, _ = dt.load_model(str(llama_dir), quantize="nf4")
    with pytest.raises(dt.DeltatuneError, match=r"full fine-tuning cannot train a quantized base \(nf4\)"):
        dt.apply(model, dt.FullConfig())
    config = causal_config(tmp_path, llama_dir)
    from deltatune.config.run import load_run_config
    from deltatune.methods import method_config_for
    with pytest.raises(dt.DeltatuneError, match=r"quantize: nf4 .* full fine-tuning cannot train"):
        method_config_for(load_run_config(config, ["quantize=nf4", "method.name=full"]))


def test_gradient_checkpointing_gives_the_same_gradients(llama_dir):
    from deltatune.training.optimization import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model, _ = dt.load_model(str(llama_dir), quantize=FP32)
        torch.manual_seed(0)
        dt.apply(model, dt.LoraConfig(r=4))
        randomize_trainable(model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        x = ids()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_an_evaluation_mid_training_changes_nothing(llama_dir):
    """bitsandbytes repacks 4-bit weights for a no-backward bf16 kernel on the first eval-mode
    forward on AVX512-bf16 CPUs; load_model keeps one layout, so eval then train is exact."""
    model = lora_on_nf4(llama_dir)
    x = ids()
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    first = logits(model, x)
    assert torch.equal(first, logits(model, x))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for name, grad in before.items():
        assert torch.equal(grad, dict(model.named_parameters())[name].grad), name


# ------------------------------------------------------------------ files: ours and PEFT's
def lora_on_nf4(llama_dir):
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    torch.manual_seed(0)
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_trainable(model)
    return model


def test_save_load_is_exact_and_records_the_quantization(llama_dir, tmp_path):
    ours = lora_on_nf4(llama_dir)
    dt.save_adapter(ours, tmp_path / "a")
    record = json.loads((tmp_path / "a" / SIDECAR).read_text())
    assert record == {"type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    from deltatune.serving.generate import load_for_generation

    again, _ = load_for_generation(str(llama_dir), str(tmp_path / "a"))  # no quantize flag
    assert again.deltatune_quantization == FP32
    x = ids()
    assert torch.equal(logits(ours, x), logits(again, x))


def peft_base(llama_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config, device_map="cpu")
    keep_one_weight_layout(model)  # else bitsandbytes' bf16 CPU inference kernel computes PEFT's side
    return model


def test_deltatune_qlora_adapter_loads_in_peft(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    ours = lora_on_nf4(llama_dir)
    dt.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(peft_base(llama_dir), tmp_path / "a")
    wrapped = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__module__.startswith("peft.tuners.lora.bnb")  # PEFT's 4-bit LoRA layer
    x = ids()
    assert (logits(ours, x) - logits(theirs, x)).abs().max().item() < 1e-5


def test_peft_qlora_adapter_loads_in_deltatune(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(peft_base(llama_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path / "p")
    base, _ = dt.load_model(str(llama_dir), quantize=FP32)
    ours = dt.load_adapter(base, tmp_path / "p")
    x = ids()
    assert (logits(ours, x) - logits(theirs, x)).abs().max().item() < 1e-5


# ------------------------------------------------------------------ merge and export
def test_in_place_merge_into_4bit_is_refused(llama_dir):
    model = lora_on_nf4(llama_dir)
    with pytest.raises(dt.DeltatuneError, match=r"cannot merge into the nf4 base weights in place"):
        dt.merge(model)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_dequantizes_and_matches(llama_dir, kind):
    model, _ = dt.load_model(str(llama_dir), quantize=QuantizationConfig(type=kind, compute_dtype="float32"))
    dt.apply(model, dt.LoraConfig(r=4))
    randomize_trainable(model)
    x = ids()
    expected = logits(model, x)
    plain = dt.merge_and_unload(model)
    assert not any(is_quantized_linear(m) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.down_proj) is torch.nn.Linear
    merged = logits(plain, x)
    # int8 matmuls run in fp16 on CPU: the same weights, rounded differently per product
    tolerance = 1e-4 if kind == "nf4" else 2e-2
    assert (merged - expected).abs().max().item() < tolerance


def test_cli_merge_of_a_qlora_run_writes_a_dense_model(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = lora_on_nf4(llama_dir)
    dt.save_adapter(ours, tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "merge", "--model", str(llama_dir),
                          "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "quantized (nf4)" in out.stdout and "dense" in out.stdout
    error = float(out.stdout.split("relative error ")[1].split()[0])
    assert 0.01 < error < 0.3  # nf4 of Gaussian weights: ~0.1 (Dettmers et al.)
    assert "over 14 weight matrices" in out.stdout
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = ids()
    assert (logits(merged, x) - logits(ours, x)).abs().max().item() < 1e-4


# ------------------------------------------------------------------ a run, end to end
def test_qlora_run_records_quantization_and_eval_rebuilds_it(llama_dir, tmp_path, one_thread):  # noqa: F811
    from deltatune.config.run import load_run_config
    from deltatune.quantization import parse_quantize
    from deltatune.training.loop import train_from_config

    config = causal_config(tmp_path, llama_dir, max_steps=3)
    overrides = ["quantize=nf4", "method.target_modules=all-linear"]
    summary = train_from_config(str(config), overrides)
    run = Path(summary["output_dir"]) if "output_dir" in summary else tmp_path / "runs" / "lm"
    assert json.loads((run / SIDECAR).read_text())["type"] == "nf4"
    assert parse_quantize(load_run_config(run / "config.yaml").quantize).type == "nf4"
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "eval", "--model", str(llama_dir),
                          "--adapter", str(run), "--data", str(tmp_path / "data" / "alpaca.jsonl"),
                          "--format", "alpaca"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["perplexity"] > 0


def test_cli_rejects_an_unknown_quantize_value(llama_dir, tmp_path):
    config = causal_config(tmp_path, llama_dir)
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", str(config), "quantize=q4"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "quantize: unknown value 'q4'" in out.stderr


# ------------------------------------------------------------------ plan and compare
@pytest.mark.parametrize("kind", [None, "nf4", "fp4", "int8",
                                  QuantizationConfig(type="nf4", double_quant=False)])
def test_predicted_weight_bytes_match_the_loaded_model(llama_dir, kind):
    from transformers import AutoModelForCausalLM

    from deltatune.compare.quantized_bytes import predicted_weight_bytes, stored_weight_bytes
    from deltatune.quantization import parse_quantize

    model, _ = dt.load_model(str(llama_dir), quantize=kind)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    predicted = predicted_weight_bytes(skeleton, ("model.layers",), parse_quantize(kind), torch.float32)
    stored = stored_weight_bytes(model)
    # (the tiny model's 64x64 layers make the fixed per-layer tables weigh ~1%; at 135M ~0)
    assert abs(predicted / stored - 1) < 0.02, (predicted, stored)


def compare_config(tmp_path: Path, bert_dir: Path, methods: list[str]) -> Path:
    import yaml
    from tiny_runs import sentiment_rows, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(48, seed=1))
    write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(16, seed=2))
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(bert_dir), "task": "classification",
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "dev.jsonl"),
                 "max_length": 32},
        "train": {"epochs": 1, "batch_size": 16, "bf16": False, "lr": 5e-3},
        "output_dir": str(tmp_path / "cmp"),
        "compare": {"methods": methods, "per_method": {"lora": {"method": {"r": 4}},
                                                       "lora@nf4": {"train": {"lr": 1e-2}}}}}))
    return path


def test_compare_rows_put_a_method_on_a_quantized_base(bert_dir, tmp_path):
    from deltatune.compare.plan import plan_methods
    from deltatune.compare.runner import method_run_config
    from deltatune.compare.settings import read_compare_config

    config, settings = read_compare_config(str(compare_config(tmp_path, bert_dir, ["lora", "lora@int8"])), [])
    dense = method_run_config(config, settings, "lora", tmp_path)
    quantized = method_run_config(config, settings, "lora@nf4", tmp_path)
    assert dense["quantize"] == "none" and quantized["quantize"] == "nf4"
    assert quantized["method"] == {**dense["method"]}  # r=4 from per_method.lora applies to both
    assert quantized["train"]["lr"] == 1e-2 and dense["train"]["lr"] == 5e-3
    assert quantized["output_dir"].endswith("runs/lora@nf4")
    plans = {p.method: p for p in plan_methods(config, ["lora", "lora@nf4"], settings["per_method"])}
    assert plans["lora@nf4"].quantize == "nf4" and plans["lora"].quantize == "none"
    assert plans["lora@nf4"].base_weight_bytes < plans["lora"].base_weight_bytes
    assert plans["lora@nf4"].trainable_params == plans["lora"].trainable_params


@pytest.mark.parametrize("row,message", [
    ("full@nf4", r"'full@nf4': full fine-tuning cannot train a quantized base"),
    ("lora@q3", r"unknown value 'q3'"),
    ("lora@", r"name a quantization after @"),
])
def test_bad_compare_rows_are_one_line(bert_dir, tmp_path, row, message):
    from deltatune.compare.settings import read_compare_config

    with pytest.raises(dt.DeltatuneError, match=message):
        read_compare_config(str(compare_config(tmp_path, bert_dir, ["lora", row])), [])


def test_compare_trains_lora_beside_lora_on_nf4(bert_dir, tmp_path):
    config = compare_config(tmp_path, bert_dir, ["lora", "lora@nf4"])
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "compare", str(config)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())}
    assert set(rows) == {"lora", "lora@nf4"} and not any("error" in r for r in rows.values())
    assert (tmp_path / "cmp" / "runs" / "lora@nf4" / SIDECAR).is_file()
    assert not (tmp_path / "cmp" / "runs" / "lora" / SIDECAR).exists()
    assert "| lora@nf4 |" in (tmp_path / "cmp" / "report.md").read_text()


def test_serve_needs_adapters_trained_on_one_base(llama_dir, tmp_path):
    from deltatune.quantization import shared_quantization

    dt.save_adapter(lora_on_nf4(llama_dir), tmp_path / "q")
    dense, _ = dt.load_model(str(llama_dir))
    dt.save_adapter(dt.apply(dense, dt.LoraConfig(r=2)), tmp_path / "d")
    assert shared_quantization({"a": tmp_path / "q"}) == FP32
    assert shared_quantization({"a": tmp_path / "d"}) is None
    with pytest.raises(dt.DeltatuneError, match=r"--adapter a was trained on nf4 but --adapter b on a dense base"):
        shared_quantization({"a": tmp_path / "q", "b": tmp_path / "d"})
    assert dt.inspect_adapter(tmp_path / "q")["base_quantization"]["type"] == "nf4"


def test_generate_on_a_qlora_adapter_needs_no_flag(llama_dir, tmp_path):
    dt.save_adapter(lora_on_nf4(llama_dir), tmp_path / "a")
    out = subprocess.run([sys.executable, "-m", "deltatune.cli", "generate", "--model", str(llama_dir),
                          "--adapter", str(tmp_path / "a"), "--max-new-tokens", "4", "hi"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # the reply on stdout, and not one line from the libraries underneath (bitsandbytes, the Hub
    # kernel loader, transformers) on stderr: a user sees only what deltatune says
    assert out.stderr == "", out.stderr
    assert out.stdout.strip()


def test_generate_quantize_flag_overrides_the_record(llama_dir, tmp_path):
    from deltatune.serving.generate import load_for_generation

    dt.save_adapter(lora_on_nf4(llama_dir), tmp_path / "a")
    model, _ = load_for_generation(str(llama_dir), str(tmp_path / "a"), "int8")
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "Linear8bitLt"
    bare, _ = load_for_generation(str(llama_dir), None, "nf4")
    assert bare.deltatune_quantization.type == "nf4"


def test_combining_adapters_on_a_quantized_base(llama_dir):
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    torch.manual_seed(0)
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="a")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["v_proj"]), name="b")
    randomize_trainable(model)
    for name in ("a", "b"):
        dt.set_adapter(model, name)
        randomize_trainable(model, seed=3 if name == "a" else 4)
    # b is absent from q_proj: its zero piece there takes the layer's real
    # (out, in), not the packed 4-bit weight's shape
    dt.combine_adapters(model, ["a", "b"], [1.0, 1.0], how="cat", new_name="ab")
    x = ids()
    combined = logits(dt.set_adapter(model, "ab"), x)
    assert not torch.equal(combined, logits(dt.set_adapter(model, "a"), x))
    assert not torch.equal(combined, logits(dt.set_adapter(model, "b"), x))


# ------------------------------------------------------------------ DoRA on a 4-bit base (QDoRA)
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_on_a_quantized_base_starts_at_the_base_and_trains(llama_dir, kind, one_thread):  # noqa: F811
    # the magnitude is the norm of the dense weight the layer computes with, not of its codes
    model, _ = dt.load_model(str(llama_dir), quantize=kind)
    x = ids(seed=5, batch=2, seq=10)
    with torch.no_grad():
        before = model(input_ids=x).logits
    dt.apply(model, dt.config_from_dict({"name": "dora"}))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, before, atol=1e-4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
