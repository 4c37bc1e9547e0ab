"""LoRA's initialisations (LoraConfig.init): PiSSA and OLoRA start equal to the base on tiny
Llama, GPT-2 and BERT, their saved adapter (converted to plain LoRA of rank 2r) gives the trained
model's outputs on the unmodified base, PEFT's files load here and ours in PEFT (peft is the
oracle), a resumed PiSSA run is bit-identical; LoftQ brings a 4-bit base + adapter closer to the
dense model than the plain init; every bad option is one line."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import causal_config, tiny_llama_dir

import deltatune as dt
from deltatune.cli import main
from deltatune.config.run import load_run_config
from deltatune.methods import method_config_for
from deltatune.methods.lora import LoraLayer
from deltatune.quantization import QuantizationConfig

import peft  # noqa: E402  (a test-only oracle)

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
TASK_TYPE = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"],
           "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}
CHANGING_INITS = ["pissa", "olora", "pissa_niter_4"]
FP32 = QuantizationConfig(type="nf4", compute_dtype="float32")


def logits(model, ids=None):
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=token_batch() if ids is None else ids).logits.float()


def gap(a, b) -> float:
    return (logits(a) - logits(b)).abs().max().item()


def train_a_little(model, seed: int = 5) -> None:
    """Move every trainable tensor away from its start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def ours(family: str, init: str, **options):
    return dt.apply(FAMILIES[family](), dt.LoraConfig(r=4, alpha=8, target_modules=TARGETS[family],
                                                      init=init, **options))


def theirs(family: str, init: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(FAMILIES[family](), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS[family], init_lora_weights=init,
            task_type=TASK_TYPE[family], fan_in_fan_out=family == "gpt2"))


def peft_load(family: str, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(FAMILIES[family](), directory)


# ------------------------------------------------------------------ PiSSA / OLoRA: start and export
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", CHANGING_INITS)
def test_a_fresh_delta_is_the_identity_though_the_base_weights_changed(family, init):
    base, model = FAMILIES[family](), ours(family, init)
    assert gap(model, base) < 1e-5
    original = dict(base.named_parameters())
    path, layer = next((p, m) for p, m in model.named_modules() if isinstance(m, LoraLayer))
    residual = layer.base_layer.weight  # the base keeps W - s·B·A, far from W
    assert (residual - original[path + ".weight"]).abs().max() > 1e-2
    assert layer.deltas["default"].lora_B.weight.abs().max() > 1e-2  # B is not zero: not plain LoRA


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", CHANGING_INITS)
def test_the_saved_adapter_on_the_unmodified_base_is_the_trained_model(family, init, tmp_path):
    model = ours(family, init)
    train_a_little(model)
    assert gap(model, FAMILIES[family]()) > 1e-2  # training moved it
    dt.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    loaded = dt.load_adapter(FAMILIES[family](), tmp_path / "a")
    assert gap(loaded, model) < 1e-5
    assert gap(dt.merge_and_unload(loaded), model) < 1e-5
    # the trainable form (what checkpoints keep) records the init; loading it redoes the
    # decomposition on the unmodified base and adds the converted pair: the base stays as it was
    dt.save_adapter(model, tmp_path / "t", trainable_form=True)
    saved = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (4, init)
    fresh = FAMILIES[family]()
    original = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = dt.load_adapter(fresh, tmp_path / "t")
    assert gap(loaded, model) < 1e-5
    assert dt.active_config(loaded)[1].r == 8
    with dt.disable_adapters(loaded):
        assert gap(loaded, FAMILIES[family]()) == 0.0
    unwrapped = {k.replace(".base_layer", ""): v for k, v in loaded.state_dict().items() if ".deltas." not in k}
    assert all(torch.equal(unwrapped[k], v) for k, v in original.items() if k in unwrapped)


def test_rslora_conversion_keeps_the_scale(tmp_path):
    model = ours("llama", "pissa", use_rslora=True)
    train_a_little(model)
    dt.save_adapter(model, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)
    assert gap(dt.load_adapter(tiny_llama(), tmp_path / "a"), model) < 1e-5


def test_saved_pissa_and_olora_adapters_share_a_base_and_mix_per_row(tmp_path):
    """What `serve` does: several saved adapters on one unmodified base, one per batch row."""
    for name, init in (("p", "pissa"), ("o", "olora"), ("l", "default")):
        model = ours("llama", init)
        train_a_little(model, seed=len(name) + ord(name))
        dt.save_adapter(model, tmp_path / name)
    shared = tiny_llama()
    for name in ("p", "o", "l"):
        dt.load_adapter(shared, tmp_path / name, name=name)
    ids = token_batch(batch=4)
    with torch.no_grad():
        mixed = shared(input_ids=ids, adapter_names=["p", None, "o", "l"]).logits
    for row, name in enumerate(["p", None, "o", "l"]):
        alone = tiny_llama() if name is None else dt.load_adapter(tiny_llama(), tmp_path / name)
        assert (mixed[row] - logits(alone, ids[row:row + 1])[0]).abs().max().item() < 1e-5, name


# ------------------------------------------------------------------ PEFT both ways
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_converted_and_unconverted_saves_load_here(family, init, tmp_path):
    model = theirs(family, init)
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the start, unconverted
    model.save_pretrained(tmp_path / "initial")
    model.peft_config["default"].init_lora_weights = init
    train_a_little(model)
    model.save_pretrained(tmp_path / "plain")  # the trainable form: loaders redo the init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "converted",
                              path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["r"] == 8
    # PEFT's conversion keeps only lora_A/lora_B: its SEQ_CLS file loses the trained head, so
    # BERT's converted file cannot give the trained logits anywhere (ours keeps the head)
    for form in ("converted", "plain") if family != "bert" else ("plain",):
        loaded = dt.load_adapter(FAMILIES[family](), tmp_path / form)
        assert gap(loaded, model) < 1e-5, form


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_ours_load_in_peft_on_the_unmodified_base(family, init, tmp_path):
    model = ours(family, init)
    train_a_little(model)
    dt.save_adapter(model, tmp_path / "a")
    dt.save_adapter(model, tmp_path / "t", trainable_form=True)
    assert gap(peft_load(family, tmp_path / "a"), model) < 1e-5
    assert gap(peft_load(family, tmp_path / "t"), model) < 1e-5  # PEFT redoes the same init


def test_our_pissa_start_is_peft_s():
    a, b = ours("llama", "pissa"), theirs("llama", "pissa")
    ours_A = {k.replace(".deltas.default", ""): v for k, v in a.named_parameters() if "lora_A" in k}
    theirs_A = {k.replace("base_model.model.", "").replace(".default", ""): v
                for k, v in b.named_parameters() if "lora_A" in k}
    assert ours_A.keys() == theirs_A.keys()
    for key in ours_A:
        assert torch.allclose(ours_A[key], theirs_A[key], atol=1e-5), key


def test_a_resumed_pissa_run_is_bit_identical(tmp_path):
    from test_resume import Interrupt, assert_bit_identical, interrupt_at, weights

    from deltatune.training.loop import train_from_config

    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=12, max_steps=6,
                           save_every=2)
    extra = ["method.init=pissa"]
    summary = train_from_config(str(config), [f"output_dir={tmp_path / 'whole'}", *extra])
    with pytest.raises(Interrupt):
        train_from_config(str(config), [f"output_dir={tmp_path / 'broken'}", *extra],
                          on_step=interrupt_at(3))
    resumed = train_from_config(str(config), [f"output_dir={tmp_path / 'broken'}", *extra], resume=True)
    assert resumed["steps"] == summary["steps"] == 6
    whole = weights(tmp_path / "whole")
    assert_bit_identical(whole, weights(tmp_path / "broken"))
    assert next(v for k, v in whole.items() if "lora_A" in k).shape[0] == 8  # saved converted


# ------------------------------------------------------------------ LoftQ on a 4-bit base
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("loftq"))


def loftq_error(llama_dir, init: str, **options) -> float:
    """|quantized base + fresh adapter - dense model| over the logits of a batch."""
    dense, _ = dt.load_model(str(llama_dir))
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    torch.manual_seed(0)
    dt.apply(model, dt.LoraConfig(r=8, alpha=16, target_modules="all-linear", init=init, **options))
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    return (logits(model, ids) - logits(dense, ids)).abs().mean().item()


def test_loftq_starts_closer_to_the_dense_model_than_the_plain_init(llama_dir):
    plain = loftq_error(llama_dir, "default")
    one = loftq_error(llama_dir, "loftq")
    three = loftq_error(llama_dir, "loftq", loftq_iter=3)
    assert one < 0.8 * plain, (one, plain)
    assert three < 0.8 * plain, (three, plain)


def test_loftq_adapters_reload_on_a_fresh_4bit_base(llama_dir, tmp_path):
    for iterations in (1, 3):
        model, _ = dt.load_model(str(llama_dir), quantize=FP32)
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init="loftq",
                                      loftq_iter=iterations))
        train_a_little(model)
        dt.save_adapter(model, tmp_path / str(iterations))
        saved = json.loads((tmp_path / str(iterations) / "adapter_config.json").read_text())
        # one round keeps the base's own codes: a plain LoRA on it; more refit them, recorded
        assert saved["init_lora_weights"] == (True if iterations == 1 else "loftq")
        again = dt.load_adapter(dt.load_model(str(llama_dir), quantize=FP32)[0], tmp_path / str(iterations))
        ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
        assert (logits(again, ids) - logits(model, ids)).abs().max().item() < 1e-5


# ------------------------------------------------------------------ bad options: one line
@pytest.mark.parametrize("options,message", [
    ({"init": "pisa"}, r"LoraConfig.init: must be one of default, gaussian, pissa, olora, loftq or pissa_niter_N"),
    ({"init": "pissa_niter_0"}, r"LoraConfig.init: must be one of"),
    ({"init": "loftq", "loftq_iter": 0}, r"LoraConfig.loftq_iter: must be a positive integer"),
    ({"init": "pissa", "use_dora": True}, r"LoraConfig.init: pissa with use_dora"),
])
def test_bad_init_options_name_the_field(options, message):
    with pytest.raises(dt.DeltatuneError, match=message):
        dt.LoraConfig(**options)


def test_loftq_without_a_4bit_base_is_refused(llama_dir, tmp_path):
    with pytest.raises(dt.DeltatuneError, match=r"init: loftq .*q_proj is dense; load the base with quantize: nf4"):
        dt.apply(tiny_llama(), dt.LoraConfig(init="loftq", target_modules=["q_proj"]))
    config = causal_config(tmp_path, llama_dir)
    with pytest.raises(dt.DeltatuneError, match=r"^method.init: loftq .*set quantize: nf4"):
        method_config_for(load_run_config(str(config), ["method.init=loftq"]))
    with pytest.raises(dt.DeltatuneError, match=r"^method.init: loftq"):
        method_config_for(load_run_config(str(config), ["method.init=loftq", "quantize=int8"]))


def test_the_cli_says_it_in_one_line_and_exits_2(llama_dir, tmp_path, capsys):
    config = causal_config(tmp_path, llama_dir)
    capsys.readouterr()  # saving the tiny model prints a progress bar
    assert main(["train", str(config), "method.init=loftq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantize: nf4" in err
    assert main(["train", str(config), "method.init=olora", "quantize=nf4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init: olora subtracts its start" in err


def test_pissa_on_a_quantized_base_is_refused(llama_dir):
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    with pytest.raises(dt.DeltatuneError, match=r"init: pissa subtracts its start .* use quantize: none"):
        dt.apply(model, dt.LoraConfig(init="pissa", target_modules=["q_proj"]))


def test_pissa_cannot_share_a_base_with_another_adapter():
    model = ours("llama", "pissa")
    with pytest.raises(dt.DeltatuneError, match=r"adapter 'default' changed the base weights"):
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), name="second")
    plain = dt.apply(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(dt.DeltatuneError, match=r"init: pissa changes the base weights of .* already carries"):
        dt.apply(plain, dt.LoraConfig(r=4, target_modules=["q_proj"], init="pissa"), name="second")


def test_loftq_that_refits_the_codes_cannot_share_a_base(llama_dir):
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init="loftq", loftq_iter=2))
    with pytest.raises(dt.DeltatuneError, match=r"adapter 'default' changed the base weights"):
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), name="second")
    model, _ = dt.load_model(str(llama_dir), quantize=FP32)
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"], init="loftq"))  # codes kept
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), name="second")


def test_unknown_peft_init_is_one_line(tmp_path):
    model = ours("llama", "default")
    dt.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(path.read_text().replace('"init_lora_weights": true', '"init_lora_weights": "eva"'))
    with pytest.raises(dt.DeltatuneError, match=r"init_lora_weights 'eva' is not supported"):
        dt.load_adapter(tiny_llama(), tmp_path / "a")
    assert load_file(tmp_path / "a" / "adapter_model.safetensors")  # the file itself is fine
