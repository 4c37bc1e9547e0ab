"""OFT, BOFT, LoHa and LoKr against peft as the oracle, on tiny Llama and BERT (PEFT has no
Conv1D layer for these methods, so GPT-2 is checked on our own: merge, identity, training):
the same weights give the same outputs (< 1e-5) whichever library saved them, the files hold
PEFT's tensors, merge/unmerge round-trip, a fresh delta is the base, the loss falls, and bad
options are one line naming the option."""
from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.boft import butterfly_permutation
from deltatune.methods.lokr import factor_pair
from deltatune.methods.weight_layer import WeightLayer

import peft  # noqa: E402  (a test-only oracle)
from peft.tuners.boft import layer as peft_boft_layer  # noqa: E402

FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
PEFT_FAMILIES = ("llama", "bert")
TASK_TYPE = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


def logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits


def perturb(model, seed: int = 5) -> None:
    """Move every trainable tensor well away from its start (BOFT's scale stays near 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if "boft_s" in name:
                param.mul_(1 + 0.3 * noise)
            else:
                param.copy_(noise * 0.2)


# (ours, peft's) configs: each method's defaults where they fit the tiny widths (64 / 128), and
# the options that change the tensors' layout or the math
def pairs(family: str) -> dict:
    task = TASK_TYPE.get(family, "CAUSAL_LM")
    both = dict(target_modules="all-linear", task_type=task)
    return {
        "oft": (dt.OFTConfig(oft_block_size=16), peft.OFTConfig(oft_block_size=16, **both)),
        "oft-exact-r": (dt.OFTConfig(r=8, oft_block_size=0, use_cayley_neumann=False),
                        peft.OFTConfig(r=8, oft_block_size=0, use_cayley_neumann=False, **both)),
        "oft-shared": (dt.OFTConfig(oft_block_size=8, block_share=True, num_cayley_neumann_terms=7),
                       peft.OFTConfig(oft_block_size=8, block_share=True, num_cayley_neumann_terms=7, **both)),
        "boft": (dt.BOFTConfig(), peft.BOFTConfig(**both)),
        "boft-num": (dt.BOFTConfig(boft_block_size=0, boft_block_num=8),
                     peft.BOFTConfig(boft_block_size=0, boft_block_num=8, **both)),
        "loha": (dt.LoHaConfig(r=4, alpha=8), peft.LoHaConfig(r=4, alpha=8, **both)),
        "lokr": (dt.LoKrConfig(), peft.LoKrConfig(**both)),
        "lokr-split": (dt.LoKrConfig(r=2, decompose_both=True, decompose_factor=4),
                       peft.LoKrConfig(r=2, decompose_both=True, decompose_factor=4, **both)),
    }


CASES = [(m, f) for m in pairs("llama") for f in PEFT_FAMILIES]


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


@pytest.mark.parametrize("case,family", CASES)
def test_peft_loads_ours_with_the_same_outputs(case, family, tmp_path):
    model = ours(family, pairs(family)[case][0])
    ids = token_batch()
    expected = logits(model, ids)
    with dt.disable_adapters(model):
        assert (logits(model, ids) - expected).abs().max() > 1e-2  # the delta matters
    dt.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(FAMILIES[family](), tmp_path / "ours").eval()
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("case,family", CASES)
def test_we_load_peft_saves_with_the_same_outputs(case, family, tmp_path):
    model = theirs(family, pairs(family)[case][1])
    ids = token_batch()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(FAMILIES[family](), tmp_path / "theirs").eval()
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5
    dt.merge(loaded)  # PEFT's forward equals ours merged, on the very weights PEFT made
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", list(pairs("llama")))
def test_the_file_holds_peft_tensors(case, tmp_path):
    ours_config, theirs_config = pairs("llama")[case]
    dt.save_adapter(ours("llama", ours_config), tmp_path / "ours")
    theirs("llama", theirs_config).save_pretrained(tmp_path / "theirs")
    mine = {k: tuple(v.shape) for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    peft_file = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert mine == {k: tuple(v.shape) for k, v in peft_file.items()}


def _torch_block_diag(blocks):
    """(N, D, b, b) -> (N, D·b, D·b): what PEFT's CUDA kernel computes, in plain torch."""
    return torch.stack([torch.block_diag(*factor) for factor in blocks])


def test_butterfly_factors_match_peft(tmp_path):
    """PEFT builds m > 1 butterfly factors only with its CUDA kernel; with the kernel's job done
    by torch.block_diag, PEFT's permutations and product are the oracle for ours."""
    config = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    fast = mock.patch.object(peft_boft_layer.FastBlockDiag, "apply", staticmethod(_torch_block_diag))
    with mock.patch.object(peft_boft_layer, "get_fbd_cuda", lambda: True), fast:
        model = theirs("llama", config)
        ids = token_batch()
        expected = logits(model, ids)
    model.save_pretrained(tmp_path / "theirs")
    loaded = dt.load_adapter(tiny_llama(), tmp_path / "theirs").eval()
    delta = loaded.model.layers[0].self_attn.q_proj.deltas["default"]
    assert tuple(delta.boft_R.shape) == (3, 16, 4, 4)
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5
    dt.merge(loaded)
    assert (logits(loaded, ids) - expected).abs().max().item() < 1e-5


def test_butterfly_permutation_interleaves_half_blocks():
    # width 16, two spans of 8, chunks of 2: chunks 0, 2, 1, 3 in each span
    assert butterfly_permutation(16, 2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7,
                                                        8, 9, 12, 13, 10, 11, 14, 15]
    assert butterfly_permutation(8, 4, 1).tolist() == list(range(8))  # one chunk pair per span


def test_kronecker_factors_are_peft_s():
    assert factor_pair(64) == (8, 8)
    assert factor_pair(128) == (8, 16)
    assert factor_pair(384) == (16, 24)
    assert factor_pair(127) == (1, 127)
    assert factor_pair(128, 4) == (4, 32)
    assert factor_pair(100, 3) == (2, 50)  # 3 does not divide: no factor above 3


# ------------------------------------------------------------------ on every family, ours alone
OWN = {"oft": dt.OFTConfig(oft_block_size=16), "boft": dt.BOFTConfig(boft_n_butterfly_factor=2),
       "loha": dt.LoHaConfig(r=4), "lokr": dt.LoKrConfig(r=2, decompose_both=True)}
OWN_CASES = [(m, f) for m in OWN for f in FAMILIES]


@pytest.mark.parametrize("method,family", OWN_CASES)
def test_a_fresh_delta_is_the_base_model(method, family):
    ids = token_batch()
    base = logits(FAMILIES[family](), ids)
    model = dt.apply(FAMILIES[family](), OWN[method]).eval()
    assert (logits(model, ids) - base).abs().max().item() < 1e-6


@pytest.mark.parametrize("method,family", OWN_CASES)
def test_merge_and_unmerge_round_trip(method, family):
    model = ours(family, OWN[method])
    ids = token_batch()
    expected = logits(model, ids)
    layer = next(m for m in model.modules() if isinstance(m, WeightLayer))
    before = layer.base_layer.weight.detach().clone()
    dt.merge(model)
    assert not torch.allclose(layer.base_layer.weight, before, atol=1e-4)  # really folded in
    assert (logits(model, ids) - expected).abs().max().item() < 1e-4
    dt.unmerge(model)
    assert (layer.base_layer.weight - before).abs().max().item() < 1e-4
    assert (logits(model, ids) - expected).abs().max().item() < 1e-4
    plain = dt.merge_and_unload(model)
    assert not any(isinstance(m, WeightLayer) for m in plain.modules())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("method,family", OWN_CASES)
def test_the_loss_falls_in_a_few_steps(method, family):
    model = dt.apply(FAMILIES[family](), OWN[method]).train()
    ids = token_batch(batch=4, seq=12)
    labels = torch.tensor([0, 1, 1, 0])
    # a tiny random model memorising one batch: a high lr shows the direction in a few steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    def loss_now():
        if family == "bert":
            return model(input_ids=ids, labels=labels).loss
        return model(input_ids=ids, labels=ids).loss

    with torch.no_grad():
        first = loss_now().item()
    for _ in range(10):
        loss = loss_now()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert loss_now().item() < first * 0.95


def test_rows_of_one_batch_can_use_different_methods():
    """OFT, BOFT, LoHa and LoKr adapters on one model, each row through its own (or the base),
    in one forward, equal each row run alone."""
    model = tiny_llama().to(torch.float64)
    names = list(OWN)
    for name in names:
        dt.apply(model, OWN[name], name)
        perturb(model, seed=len(name))
    rows = [*names, None, "oft"]
    ids = token_batch(len(rows), 7)
    with torch.no_grad(), dt.mixed_adapters(model, rows):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(rows):
        with torch.no_grad():
            if name is None:
                with dt.disable_adapters(model):
                    alone = model(input_ids=ids[i:i + 1]).logits
            else:
                dt.set_adapter(model, name)
                alone = model(input_ids=ids[i:i + 1]).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize("config,message", [
    (lambda: dt.OFTConfig(oft_block_size=24), "OFTConfig.oft_block_size: 24 does not divide the input width 64"),
    (lambda: dt.OFTConfig(r=5, oft_block_size=0), "OFTConfig.r: 5 does not divide the input width 64"),
    (lambda: dt.BOFTConfig(boft_block_size=16, boft_n_butterfly_factor=4),
     "BOFTConfig.boft_n_butterfly_factor: 4 factors of 16-blocks need the input width a multiple of 128"),
    (lambda: dt.BOFTConfig(boft_block_size=0, boft_block_num=3), "BOFTConfig.boft_block_num: 3 does not divide"),
    (lambda: dt.LoHaConfig(target_modules=["nothing_here"]), "LoHaConfig.target_modules: ['nothing_here'] matched no"),
])
def test_options_that_do_not_fit_the_model_are_one_line(config, message):
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.DeltatuneError) as caught:
        dt.apply(model, config())
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not any(isinstance(m, WeightLayer) for m in model.modules())  # nothing half-applied
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("make,message", [
    (lambda: dt.OFTConfig(r=4, oft_block_size=16), "OFTConfig.oft_block_size: give either r or oft_block_size"),
    (lambda: dt.OFTConfig(module_dropout=1.0), "OFTConfig.module_dropout: must be a number in [0, 1)"),
    (lambda: dt.BOFTConfig(boft_n_butterfly_factor=0), "BOFTConfig.boft_n_butterfly_factor: must be a positive"),
    (lambda: dt.LoHaConfig(r=0), "LoHaConfig.r: must be a positive integer"),
    (lambda: dt.LoKrConfig(init_weights="pissa"), "LoKrConfig.init_weights: must be true, false or 'lycoris'"),
    (lambda: dt.LoKrConfig(decompose_factor=0), "LoKrConfig.decompose_factor"),
    (lambda: dt.config_from_dict({"name": "oft", "block_size": 8}), "did you mean 'oft_block_size'?"),
])
def test_bad_options_name_the_option(make, message):
    with pytest.raises(dt.DeltatuneError, match=None) as caught:
        make()
    assert message in str(caught.value)


def test_a_layer_takes_deltas_of_one_kind():
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    with pytest.raises(dt.DeltatuneError, match="already carries another method's delta"):
        dt.apply(model, dt.OFTConfig(oft_block_size=16, target_modules=["q_proj"]), "oft")
    dt.apply(model, dt.OFTConfig(oft_block_size=16, target_modules=["v_proj"]), "oft")  # other layers: fine


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tiny_runs import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("q"))


@pytest.mark.parametrize("method", list(OWN))
def test_on_an_nf4_base_it_trains_and_merge_and_unload_gives_a_dense_model(method, llama_dir):
    from deltatune.quantization import QuantizationConfig, is_quantized_linear

    quantize = QuantizationConfig(type="nf4", compute_dtype="float32")
    model, _ = dt.load_model(str(llama_dir), quantize=quantize)
    dt.apply(model, OWN[method])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = token_batch(batch=4, seq=12)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    expected = logits(model, ids)
    plain = dt.merge_and_unload(model)
    assert not any(is_quantized_linear(m) or isinstance(m, WeightLayer) for m in plain.modules())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-4
