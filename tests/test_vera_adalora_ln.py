"""VeRA, AdaLoRA and LayerNorm tuning against peft as the oracle, on tiny Llama, BERT and GPT-2:
the same weights give the same logits (< 1e-5) whichever library saved them, the files hold
PEFT's tensors, merge and unmerge round-trip, a fresh delta is the base, and the loss falls."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file

import deltatune as dt

import peft  # noqa: E402  (a test-only oracle)

FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
TASK_TYPE = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS", "gpt2": "CAUSAL_LM"}
# Layers of several shapes per family (attention and feed-forward; GPT-2's Conv1D included),
# so VeRA's shared projections are sliced differently per layer.
TARGETS = {"llama": ["q_proj", "k_proj", "down_proj"], "bert": ["query", "intermediate.dense", "output.dense"],
           "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}
NORMS = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "bert": ["LayerNorm"],
         "gpt2": ["ln_1", "ln_2", "ln_f"]}


def logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits


def perturb(model, seed: int = 5) -> None:
    """Move every trainable tensor well away from its initial value (norm gains stay near 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def vera_pair(family, save_projection=True):
    return (dt.VeraConfig(r=8, target_modules=TARGETS[family], save_projection=save_projection),
            peft.VeraConfig(r=8, target_modules=TARGETS[family], save_projection=save_projection,
                            task_type=TASK_TYPE[family], fan_in_fan_out=family == "gpt2"))


def adalora_pair(family):
    return (dt.AdaLoraConfig(init_r=6, target_r=2, alpha=8, target_modules=TARGETS[family]),
            peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=TARGETS[family],
                               total_step=10, task_type=TASK_TYPE[family], fan_in_fan_out=family == "gpt2"))


def ln_pair(family):
    return dt.LNTuningConfig(), peft.LNTuningConfig(target_modules=NORMS[family], task_type=TASK_TYPE[family])


PAIRS = {"vera": vera_pair, "vera-unsaved-projection": lambda f: vera_pair(f, False),
         "adalora": adalora_pair, "ln-tuning": ln_pair}
CASES = [(m, f) for m in PAIRS for f in FAMILIES]


def ours(family, config):
    model = dt.apply(FAMILIES[family](), config).eval()
    perturb(model)
    return model


def theirs(family, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(FAMILIES[family](), config)
    perturb(model)
    return model.eval()


def peft_load(family, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(FAMILIES[family](), directory).eval()


@pytest.mark.parametrize("method,family", CASES)
def test_peft_loads_ours_with_the_same_logits(method, family, tmp_path):
    model = ours(family, PAIRS[method](family)[0])
    ids = token_batch()
    expected = logits(model, ids)
    with dt.disable_adapters(model):
        assert (logits(model, ids) - expected).abs().max() > 1e-3  # the delta matters
    dt.save_adapter(model, tmp_path / "ours")
    loaded = peft_load(family, tmp_path / "ours")
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("method,family", CASES)
def test_we_load_peft_saves_with_the_same_logits_merged_too(method, family, tmp_path):
    model = theirs(family, PAIRS[method](family)[1])
    ids = token_batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(FAMILIES[family](), tmp_path / "theirs").eval()
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5
    base_weights = {k: v.clone() for k, v in loaded.state_dict().items() if ".deltas." not in k}
    dt.merge(loaded)
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-4
    dt.unmerge(loaded)
    for key, value in loaded.state_dict().items():
        if key in base_weights:
            assert (value - base_weights[key]).abs().max().item() < 1e-4, key
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("method,family", CASES)
def test_the_file_holds_peft_tensors(method, family, tmp_path):
    ours_config, theirs_config = PAIRS[method](family)
    dt.save_adapter(ours(family, ours_config), tmp_path / "ours")
    theirs(family, theirs_config).save_pretrained(tmp_path / "theirs")
    mine = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine == {k: tuple(v.shape) for k, v in peft_file.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_vera_projections_from_the_seed_are_peft_s(family, tmp_path):
    """save_projection: false — both libraries regenerate A and B from projection_prng_key
    alone, and get the same matrices (the file stored by PEFT with save_projection: true)."""
    ours_config, theirs_config = vera_pair(family)
    theirs(family, theirs_config).save_pretrained(tmp_path / "theirs")
    stored = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    model = dt.apply(FAMILIES[family](), ours_config)
    mine = dt.save_adapter(model, tmp_path / "ours")
    regenerated = load_file(mine / "adapter_model.safetensors")
    for key in ("base_model.vera_A", "base_model.vera_B"):
        assert torch.equal(regenerated[key], stored[key]), key


def test_vera_file_without_projections_is_smaller_and_says_so(tmp_path):
    model = ours("llama", dt.VeraConfig(r=8, target_modules=TARGETS["llama"], save_projection=False))
    dt.save_adapter(model, tmp_path / "seeded")
    saved = json.loads((tmp_path / "seeded" / "adapter_config.json").read_text())
    assert saved["save_projection"] is False and saved["projection_prng_key"] == 0
    assert not any("vera_A" in k for k in load_file(tmp_path / "seeded" / "adapter_model.safetensors"))
    again = dt.load_adapter(tiny_llama(), tmp_path / "seeded")
    ids = token_batch()
    assert (logits(again, ids) - logits(model, ids)).abs().max().item() < 1e-6
    # A file that claims to store them but does not is refused in one line
    with_claim = dict(saved, save_projection=True)
    (tmp_path / "seeded" / "adapter_config.json").write_text(json.dumps(with_claim))
    with pytest.raises(dt.DeltatuneError, match="vera_A.*missing"):
        dt.load_adapter(tiny_llama(), tmp_path / "seeded")


def test_vera_projections_are_stored_once_and_shared():
    model = dt.apply(tiny_llama(), dt.VeraConfig(r=16))
    projections = {id(m) for m in model.modules() if type(m).__name__ == "VeraProjections"}
    assert len(projections) == 1
    model.to(torch.float64)  # moved and cast once, still one object for every layer
    deltas = [m for m in model.modules() if type(m).__name__ == "VeraDelta"]
    assert len({id(d.projections) for d in deltas}) == 1 and deltas[0].projections.vera_A.dtype == torch.float64
    assert len(deltas) == 14  # all-linear: 7 projections x 2 layers


@pytest.mark.parametrize("config", [dt.VeraConfig(r=16), dt.AdaLoraConfig(), dt.LNTuningConfig()],
                         ids=["vera", "adalora", "ln-tuning"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_fresh_delta_is_the_base_and_the_loss_falls(config, family):
    torch.manual_seed(0)
    model = dt.apply(FAMILIES[family](), config)
    ids = token_batch(4, 9)
    with dt.disable_adapters(model):
        base = logits(model, ids)
    assert torch.equal(logits(model, ids), base)  # exact: λ_b = 0, E = 0, the norm's own copy
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    labels = torch.zeros(ids.shape[0], dtype=torch.long) if family == "bert" else ids
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99 and losses == sorted(losses, reverse=True), losses


def test_bad_options_are_one_line_naming_the_field():
    for build, match in [(lambda: dt.AdaLoraConfig(init_r=4, target_r=8), "AdaLoraConfig.target_r: must be at most init_r"),
                         (lambda: dt.AdaLoraConfig(tinit=5, tfinal=5, total_step=10), "AdaLoraConfig.tinit"),
                         (lambda: dt.AdaLoraConfig(beta1=1.0), "AdaLoraConfig.beta1"),
                         (lambda: dt.VeraConfig(r=0), "VeraConfig.r"),
                         (lambda: dt.VeraConfig(vera_dropout=1.5), "VeraConfig.vera_dropout"),
                         (lambda: dt.LNTuningConfig(target_modules=[]), "LNTuningConfig.target_modules")]:
        with pytest.raises(dt.DeltatuneError, match=match) as info:
            build()
        assert "\n" not in str(info.value)
    with pytest.raises(dt.DeltatuneError, match="LNTuningConfig.target_modules.*matched no"):
        dt.apply(tiny_llama(), dt.LNTuningConfig(target_modules=["q_proj_nothing"]))
    with pytest.raises(dt.DeltatuneError, match="unknown option.*'init_r'"):
        dt.config_from_dict({"name": "adalora", "init_rank": 4})


@pytest.mark.parametrize("config", [dt.VeraConfig(r=16, target_modules=["q_proj", "down_proj"]),
                                    dt.AdaLoraConfig(init_r=4, target_r=2),
                                    dt.LNTuningConfig()], ids=["vera", "adalora", "ln-tuning"])
def test_deltatune_merge_writes_a_plain_model_with_the_adapters_logits(config, tmp_path):
    """`deltatune merge` (load, merge, unload, save): transformers alone reloads the directory
    and computes the adapted model's logits."""
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


@pytest.mark.parametrize("family,configs", [
    ("llama", {"v": dt.VeraConfig(r=16, target_modules=["q_proj", "o_proj", "up_proj"]),
               "a": dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["k_proj", "v_proj", "down_proj"]),
               "n": dt.LNTuningConfig()}),
    ("gpt2", {"n": dt.LNTuningConfig(), "v": dt.VeraConfig(r=16, target_modules=["c_attn"]),
              "b": dt.BitFitConfig()}),  # BitFit leaves the layers of the others alone
])
def test_rows_of_one_batch_mix_these_adapters(family, configs):
    """Rows through each adapter and the base in one forward equal each row run alone
    (float64: agreement to ~1e-12), and each adapter changes its rows."""
    model = FAMILIES[family]().to(torch.float64)
    for name, config in configs.items():
        dt.apply(model, config, name)
        perturb(model, seed=len(name) + ord(name))
    names = [*configs, None, next(iter(configs))]
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
                with dt.disable_adapters(model):
                    assert (model(input_ids=ids[i:i + 1]).logits - alone).abs().max() > 1e-3, name
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config", [dt.VeraConfig(r=16), dt.AdaLoraConfig(init_r=4, target_r=2),
                                    dt.LNTuningConfig(), dt.BitFitConfig()],
                         ids=["vera", "adalora", "ln-tuning", "bitfit"])
def test_detached_adapters_attach_again_unchanged(config):
    """The serving pool unloads an idle adapter with its modules kept and puts it back later."""
    from deltatune.deltas import attach_adapter, detach_adapter

    model = dt.apply(tiny_gpt2(), config, "y")  # keeps the layers wrapped while "x" is away
    model = dt.apply(model, config, "x").eval()
    perturb(model)
    ids = token_batch()
    expected = logits(model, ids)
    detached = detach_adapter(model, "x")
    assert detached is not None and dt.adapter_names(model) == ["y"]
    assert attach_adapter(model, detached)
    dt.set_adapter(model, "x")
    assert torch.equal(logits(model, ids), expected)
