"""Prompt tuning, P-tuning and prefix tuning: math against hand-built references, parameter
counts in closed form, training touches only the delta, switching/deleting, and bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig
from deltatune.methods.virtual_tokens import CONTROLLER_ATTR

N = 5
CONFIGS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=N),
    "ptuning-mlp": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=32),
    "ptuning-lstm": lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=16),
    "prefix": lambda: PrefixConfig(num_virtual_tokens=N),
    "prefix-projection": lambda: PrefixConfig(num_virtual_tokens=N, projection=True,
                                              projection_hidden_size=24),
    "prefix-lstm": lambda: PrefixConfig(num_virtual_tokens=N, projection="lstm",
                                        projection_hidden_size=16),
}
FAMILIES = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def source(model):
    return getattr(model, CONTROLLER_ATTR).sources["default"]


def enlarge(model, seed: int = 5, std: float = 0.5) -> None:
    """Large virtual tokens, so that any mistake in where they go shows in the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in source(model).parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


# ------------------------------------------------------------------ works, trains only the delta
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", CONFIGS)
def test_forward_loss_backward_touch_only_the_delta(method, family):
    model = dt.apply(FAMILIES[family](), CONFIGS[method]()).train()
    ids = token_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = torch.tensor([0, 1]) if family == "bert" else ids
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    if family != "bert":
        assert out.logits.shape == (*ids.shape, VOCAB)  # virtual positions cut from the output
    out.loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    for name, param in model.named_parameters():
        ours = ".sources.default." in name or ".deltas.default." in name  # tokens / classifier copy
        assert (param.grad is not None) == ours, name
        assert param.requires_grad == ours, name
        if not ours:
            assert torch.equal(param, before[name]), f"base weight {name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


# ------------------------------------------------------------------ exact math vs references
@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm"])
def test_decoder_prompt_equals_prepending_the_embeddings_by_hand(method):
    model = dt.apply(tiny_llama(), CONFIGS[method]())
    enlarge(model)
    ids = token_batch()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        prompts = source(model)().unsqueeze(0).expand(ids.shape[0], -1, -1)
        embeds = torch.cat([prompts, model.get_input_embeddings()(ids)], dim=1)
        with dt.disable_adapters(model):
            reference = model(inputs_embeds=embeds).logits[:, N:]
            base = model(input_ids=ids).logits
    assert (ours - reference).abs().max().item() < 1e-5
    assert (ours - base).abs().max().item() > 1e-2


def test_encoder_prompt_goes_after_cls_so_the_classifier_reads_cls():
    model = dt.apply(tiny_bert(), PromptTuningConfig(num_virtual_tokens=N))
    enlarge(model)
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding in the second row
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        prompts = source(model)().unsqueeze(0).expand(ids.shape[0], -1, -1)
        embeds = model.get_input_embeddings()(ids)
        embeds = torch.cat([embeds[:, :1], prompts, embeds[:, 1:]], dim=1)
        full_mask = torch.cat([mask[:, :1], torch.ones(2, N, dtype=mask.dtype), mask[:, 1:]], dim=1)
        with dt.disable_adapters(model):
            reference = model(inputs_embeds=embeds, attention_mask=full_mask).logits
            front = torch.cat([prompts, model.get_input_embeddings()(ids)], dim=1)
            prompt_first = model(inputs_embeds=front, attention_mask=full_mask).logits
    assert (ours - reference).abs().max().item() < 1e-5
    assert (ours - prompt_first).abs().max().item() > 1e-4  # the placement is really different


def test_encoder_prefix_equals_attention_over_prefixed_keys_by_hand():
    """BERT has no usable past_key_values; our prefix enters its attention directly."""
    model = dt.apply(tiny_bert(), PrefixConfig(num_virtual_tokens=N))
    enlarge(model)
    ids = token_batch()
    captured = {}
    attention = model.bert.encoder.layer[0].attention.self

    def keep_input(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]

    handle = attention.register_forward_pre_hook(keep_input, with_kwargs=True)
    out = {}
    handle2 = attention.register_forward_hook(lambda m, a, o: out.setdefault("context", o[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove(), handle2.remove()
    hidden = captured["hidden"]  # (batch, seq, hidden)
    heads, head_dim = 4, 16
    split = lambda x: x.view(*x.shape[:2], heads, head_dim).transpose(1, 2)  # (batch, heads, seq, hd)
    q, k, v = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
    flat = source(model)().detach().view(N, 2 * 2, heads, head_dim)  # (n, layers·2, heads, hd)
    k = torch.cat([flat[:, 0].permute(1, 0, 2).expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([flat[:, 1].permute(1, 0, 2).expand(2, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)
    reference = (weights @ v).transpose(1, 2).reshape(*hidden.shape)
    assert (out["context"] - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padding_does_not_move_real_positions(method, family):
    model = dt.apply(FAMILIES[family](), CONFIGS[method]())
    enlarge(model)
    ids = token_batch(batch=1, seq=6)
    pad = torch.zeros(1, 3, dtype=ids.dtype)
    padded = torch.cat([pad, ids], dim=1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        in_batch = model(input_ids=padded, attention_mask=mask).logits[:, 3:]
    assert (alone - in_batch).abs().max().item() < 1e-5


def test_prefix_survives_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        model = dt.apply(tiny_llama(), PrefixConfig(num_virtual_tokens=N, projection=True))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = token_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in source(model).parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ------------------------------------------------------------------ parameter counts
def test_trainable_parameters_equal_the_closed_form():
    # tiny_llama: hidden 64, 2 layers, 4 heads, 2 key/value heads, head_dim 16
    hidden, layers, kv_heads, head_dim = 64, 2, 2, 16
    kv_dim, flat = kv_heads * head_dim, layers * 2 * kv_heads * head_dim
    n, h = 7, 24
    expected = [
        (PromptTuningConfig(num_virtual_tokens=n), n * hidden),
        (PrefixConfig(num_virtual_tokens=n), n * layers * 2 * kv_heads * head_dim),
        (PrefixConfig(num_virtual_tokens=n, projection=True, projection_hidden_size=h),
         n * kv_dim + (kv_dim * h + h) + (h * flat + flat)),
        (PrefixConfig(num_virtual_tokens=n, projection="lstm", projection_hidden_size=h),
         # table + BiLSTM (2 directions; layer 1 reads kv_dim, layer 2 reads 2h) + MLP to flat
         n * kv_dim + 2 * (4 * h * kv_dim + 4 * h * h + 8 * h) + 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)
         + (2 * h * 2 * h + 2 * h) + (2 * h * flat + flat)),
        (PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=h),
         n * hidden + (hidden * h + h) + (h * h + h) + (h * hidden + hidden)),
    ]
    for config, count in expected:
        model = dt.apply(tiny_llama(), config)
        assert dt.count_parameters(model)[0] == count, type(config).__name__


# ------------------------------------------------------------------ inits
def test_vocab_init_takes_rows_of_the_embedding_table():
    model = dt.apply(tiny_llama(), PromptTuningConfig(num_virtual_tokens=N, init="vocab"))
    table = model.get_input_embeddings().weight
    for row in source(model).prompt_embeddings:
        assert (table - row).abs().sum(-1).min().item() == 0.0


def test_text_init_tiles_the_embeddings_of_the_text():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from deltatune.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=tokenizer.vocab_size))
    config = PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="great movie",
                                tokenizer_name_or_path="minilm")
    dt.apply(model, config)
    ids = tokenizer("great movie", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    expected = model.get_input_embeddings().weight[[ids[0], ids[1], ids[0], ids[1], ids[0]]]
    assert torch.equal(source(model).prompt_embeddings.detach(), expected.detach())


# ------------------------------------------------------------------ switching and deleting
def test_two_prompt_adapters_switch_disable_and_delete():
    base = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = dt.apply(base, PromptTuningConfig(num_virtual_tokens=3), name="a")
    dt.apply(model, PrefixConfig(num_virtual_tokens=2), name="b")
    enlarge_all = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in getattr(model, CONTROLLER_ATTR).parameters():
            p.add_(torch.randn(p.shape, generator=enlarge_all) * 0.5)
        b = model(input_ids=ids).logits
        dt.set_adapter(model, "a")
        a = model(input_ids=ids).logits
        with dt.disable_adapters(model):
            assert torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-6)
        assert (a - b).abs().max().item() > 1e-3
        dt.delete_adapter(model, "b")
        assert model.config._attn_implementation == "sdpa"  # prefix routing undone
        assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-6)
        dt.delete_adapter(model, "a")
        assert torch.equal(model(input_ids=ids).logits, base_logits)
        assert not model._forward_pre_hooks and not model._forward_hooks


# ------------------------------------------------------------------ bad input: one clear line
@pytest.mark.parametrize("config_class", [PromptTuningConfig, PTuningConfig, PrefixConfig])
@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_num_virtual_tokens_is_refused(config_class, n):
    with pytest.raises(dt.DeltatuneError, match=rf"^{config_class.__name__}.num_virtual_tokens: "
                                                r"must be a positive integer"):
        config_class(num_virtual_tokens=n)


@pytest.mark.parametrize("text", [None, "", "   "])
def test_empty_init_text_is_refused(text):
    with pytest.raises(dt.DeltatuneError, match=r"^PromptTuningConfig.init_text: must be a non-empty"):
        PromptTuningConfig(init="text", init_text=text)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_plus_input_beyond_max_positions_is_refused(method, family):
    model = dt.apply(FAMILIES[family](), CONFIGS[method]())  # max_position_embeddings 256
    ok = token_batch(seq=256 - N)
    too_long = token_batch(seq=256 - N + 1)
    if family == "bert" and method == "prefix":  # encoder prefixes take no positions
        model(input_ids=token_batch(seq=256))
        return
    model(input_ids=ok)
    with pytest.raises(dt.DeltatuneError) as error:
        model(input_ids=too_long)
    assert "max_position_embeddings=256" in str(error.value) and "\n" not in str(error.value)


def test_unsupported_architecture_is_named():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                vocab_size=VOCAB, d_kv=16))
    for config in (PromptTuningConfig(num_virtual_tokens=2), PrefixConfig(num_virtual_tokens=2)):
        with pytest.raises(dt.DeltatuneError, match="model type 't5' is not supported"):
            dt.apply(model, config)


def test_unsupported_attention_implementation_is_named():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(dt.DeltatuneError, match="this model uses 'flex_attention'"):
        dt.apply(model, PrefixConfig(num_virtual_tokens=2))


def test_packed_rows_are_refused_by_input_prompts():
    model = dt.apply(tiny_llama(), PromptTuningConfig(num_virtual_tokens=2))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(dt.DeltatuneError, match="packed sequences"):
        model(input_ids=token_batch(batch=1), position_ids=positions)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prefix_gives_the_same_outputs_under_eager_and_sdpa_attention(family):
    ids = token_batch()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0 if family != "bert" else 1
    mask[1, -2:] = 0 if family == "bert" else 1
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = FAMILIES[family]()
        model.config._attn_implementation = implementation
        dt.apply(model, PrefixConfig(num_virtual_tokens=N))
        enlarge(model)
        assert model.config._attn_implementation == f"deltatune_prefix_{implementation}"
        with torch.no_grad():
            outputs.append(model(input_ids=ids, attention_mask=mask).logits)
    keep = mask.bool() if family != "bert" else slice(None)
    assert (outputs[0][keep] - outputs[1][keep]).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_decoder_classifier_pools_the_last_real_token_under_right_padding(method, family):
    model = dt.apply(FAMILIES[family](task="classification"), CONFIGS[method]())
    enlarge(model)
    ids = token_batch(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0  # the pad token
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :3]).logits
        with dt.disable_adapters(model):
            base = model(input_ids=ids[1:, :3]).logits
    assert (batched[1:] - alone).abs().max().item() < 1e-5
    assert (alone - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("method", CONFIGS)
def test_reloaded_adapter_continues_training_exactly(method, tmp_path):
    """A checkpoint reload keeps the same trainable tensors (encoders included) in place."""
    def step(model):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        ids = token_batch()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        with torch.no_grad():
            return model(input_ids=ids).logits

    model = dt.apply(tiny_llama(), CONFIGS[method]()).train()
    enlarge(model)
    dt.save_adapter(model, tmp_path / "ckpt")
    reloaded = dt.apply(tiny_llama(), CONFIGS[method]()).train()  # as a resumed run does
    before = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    tensors = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    dt.get_method(method.split("-")[0]).load_state_dict(reloaded, "default", tensors, "ckpt")
    after = {n: p for n, p in reloaded.named_parameters() if p.requires_grad}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)
    assert (step(model) - step(reloaded)).abs().max().item() < 1e-5
