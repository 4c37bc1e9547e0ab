"""DoRA (LoraConfig.use_dora) and (IA)³ against peft as the oracle, on tiny Llama, BERT and GPT-2:
the same weights give the same outputs (< 1e-5) whichever library saved them, the files hold
PEFT's tensors, (IA)³'s default targets are PEFT's, and both mix per batch row."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file

import deltatune as dt

import peft  # noqa: E402  (a test-only oracle)

FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
TASK_TYPE = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}
# Several layer kinds per family: attention, feed-forward (GPT-2's Conv1D included).
DORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"],
                "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}


def logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits


def perturb(model, seed: int = 5) -> None:
    """Move every trainable tensor well away from its initial value, keeping magnitudes/vectors
    around their starting size (a trained DoRA magnitude or (IA)³ vector stays near it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "magnitude" in name or "ia3_l" in name:
                param.mul_(1 + 0.3 * noise)
            else:
                param.copy_(noise * 0.2)


def ours(family: str, config) -> torch.nn.Module:
    model = dt.apply(FAMILIES[family](), config).eval()
    perturb(model)
    return model


def theirs(family: str, config) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(FAMILIES[family](), config)
    perturb(model)
    return model.eval()


def dora_pair(family: str):
    return (dt.LoraConfig(r=4, alpha=8, target_modules=DORA_TARGETS[family], use_dora=True),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS[family], use_dora=True,
                            task_type=TASK_TYPE[family], fan_in_fan_out=family == "gpt2"))


def ia3_pair(family: str):
    return dt.IA3Config(), peft.IA3Config(task_type=TASK_TYPE[family])


PAIRS = {"dora": dora_pair, "ia3": ia3_pair}
CASES = [(m, f) for m in PAIRS for f in FAMILIES]


@pytest.mark.parametrize("method,family", CASES)
def test_peft_loads_ours_with_the_same_outputs(method, family, tmp_path):
    model = ours(family, PAIRS[method](family)[0])
    ids = token_batch()
    expected = logits(model, ids)
    with dt.disable_adapters(model):
        assert (logits(model, ids) - expected).abs().max() > 1e-2  # the delta matters
    dt.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(FAMILIES[family](), tmp_path / "ours").eval()
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("method,family", CASES)
def test_we_load_peft_saves_with_the_same_outputs(method, family, tmp_path):
    model = theirs(family, PAIRS[method](family)[1])
    ids = token_batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(FAMILIES[family](), tmp_path / "theirs").eval()
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5
    # and PEFT's forward equals ours on the very weights PEFT trained, merged too
    dt.merge(loaded)
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("method,family", CASES)
def test_the_file_holds_peft_tensors(method, family, tmp_path):
    ours_config, theirs_config = PAIRS[method](family)
    dt.save_adapter(ours(family, ours_config), tmp_path / "ours")
    theirs(family, theirs_config).save_pretrained(tmp_path / "theirs")
    mine = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine == {k: tuple(v.shape) for k, v in peft_file.items()}
    # (IA)³'s default targets and feed-forward modules are PEFT's defaults for the family
    assert any("lora_magnitude_vector" in k or "ia3_l" in k for k in mine)


def test_dora_magnitude_starts_at_the_row_norms_and_the_model_at_the_base():
    model = dt.apply(tiny_gpt2(), dt.LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    layer = model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(layer.deltas["default"].lora_magnitude_vector,
                               layer.base_layer.weight.norm(dim=0))  # Conv1D: (in, out)
    ids = token_batch()
    with dt.disable_adapters(model):
        base = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=1e-6)


def test_dora_gradient_reaches_magnitude_and_both_factors():
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_trainable(model, std=0.1)
    model(input_ids=token_batch()).logits.pow(2).mean().backward()
    delta = model.model.layers[0].self_attn.q_proj.deltas["default"]
    for param in (delta.lora_A.weight, delta.lora_B.weight, delta.lora_magnitude_vector):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_merge_and_unload_gives_a_plain_model_with_the_same_outputs(family):
    model = ours(family, dt.IA3Config())
    ids = token_batch()
    expected = logits(model, ids)
    plain = dt.merge_and_unload(model)
    assert not any(isinstance(m, dt.deltas.DeltaLayer) for m in plain.modules())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-5


def test_ia3_merge_refuses_a_zero_entry():
    model = dt.apply(tiny_llama(), dt.IA3Config())
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.deltas["default"].ia3_l[3, 0] = 0.0
    with pytest.raises(dt.DeltatuneError, match="zero"):
        dt.merge(model)


def test_ia3_config_errors_name_the_field():
    with pytest.raises(dt.DeltatuneError, match="IA3Config.feedforward_modules"):
        dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(dt.DeltatuneError, match="IA3Config.target_modules"):
        dt.apply(tiny_llama(), dt.IA3Config(target_modules=["nothing_here"]))
    with pytest.raises(dt.DeltatuneError, match="LoraConfig.use_dora"):
        dt.LoraConfig(use_dora="yes")


def test_dora_and_ia3_rows_mix_in_one_batch():
    """Rows through a DoRA adapter, an (IA)³ adapter (on other layers) and the base, in one
    forward, equal each row run alone (float64: agreement to ~1e-12)."""
    model = tiny_llama().to(torch.float64)
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True), "d")
    dt.apply(model, dt.IA3Config(), "i")  # k_proj, v_proj, down_proj (feed-forward)
    perturb(model)  # (only "i" trains now; give "d" values too)
    dt.set_adapter(model, "d")
    perturb(model, seed=6)
    names = ["d", None, "i", "d"]
    ids = token_batch(len(names), 7)
    with torch.no_grad(), dt.mixed_adapters(model, names):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with dt.disable_adapters(model):
                    alone = model(input_ids=ids[i:i + 1]).logits
            else:
                dt.set_adapter(model, name)
                alone = model(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-10)
        if name is not None:
            with torch.no_grad(), dt.disable_adapters(model):
                assert (model(input_ids=ids[i:i + 1]).logits - alone).abs().max() > 1e-3


def test_combining_a_dora_adapter_is_refused():
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "d")
    with pytest.raises(dt.DeltatuneError, match="'d' is a DoRA delta"):
        dt.combine_adapters(model, ["a", "d"], [0.5, 0.5], how="cat", new_name="both")


def test_dora_with_dropout_trains_like_peft(tmp_path):
    """In training mode with dropout, the base term sees the same dropped input as the LoRA term
    (PEFT's DoRA): same seed, same outputs."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True,
                             lora_dropout=0.5, task_type="CAUSAL_LM")
    theirs_model = theirs("llama", config)
    theirs_model.save_pretrained(tmp_path / "theirs")
    model = dt.load_adapter(tiny_llama(), tmp_path / "theirs")
    ids = token_batch()
    eval_logits = logits(model.eval(), ids)
    results = []
    for m in (theirs_model.train(), model.train()):
        torch.manual_seed(7)
        with torch.no_grad():
            results.append(m(input_ids=ids).logits)
    assert (results[0] - results[1]).abs().max().item() < 1e-5
    assert (results[1] - eval_logits).abs().max().item() > 1e-3  # dropout really acted


@pytest.mark.parametrize("config", [dt.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True),
                                    dt.IA3Config()], ids=["dora", "ia3"])
def test_deltatune_merge_writes_a_plain_model_with_the_adapters_outputs(config, tmp_path):
    """`deltatune merge` (load, merge, unload, save) for DoRA and (IA)³: transformers alone
    reloads the directory and computes the adapted model's logits."""
    from byte_tokenizer import tiny_chat_llama
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    model, tokenizer = tiny_chat_llama()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    dt.apply(model, config)
    perturb(model)
    dt.save_adapter(model, tmp_path / "adapter")
    ids = token_batch(3, 7)
    expected = logits(model.eval(), ids)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(reloaded, ids) - expected).abs().max().item() < 1e-5


def test_default_lr_follows_the_options_that_need_another():
    from deltatune.methods import default_lr_for

    assert default_lr_for(dt.LoraConfig(use_dora=True)) == dt.get_method("lora").default_lr
    assert default_lr_for(dt.PrefixConfig()) == dt.get_method("prefix").default_lr
    assert default_lr_for(dt.PrefixConfig(projection="lstm")) < dt.get_method("prefix").default_lr / 10
