"""Under autocast a 4-bit layer hands on the autocast dtype, as a dense nn.Linear does, so a
QLoRA model keeps no more activations than the same LoRA model on the dense base."""
from __future__ import annotations

import pytest
import torch
from tiny_runs import tiny_llama_dir

import deltatune as dt
from deltatune.compare.plan import saved_for_backward_bytes

pytest.importorskip("bitsandbytes")
BF16_COMPUTE = {"type": "nf4", "compute_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("qa"))


def test_a_4bit_layer_returns_the_autocast_dtype_with_the_same_values(llama_dir):
    import bitsandbytes as bnb

    model, _ = dt.load_model(str(llama_dir), quantize=BF16_COMPUTE)  # fp32 embeddings and norms
    dense, _ = dt.load_model(str(llama_dir))
    layer, dense_layer = model.model.layers[0].mlp.up_proj, dense.model.layers[0].mlp.up_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, dense_out = layer(x), dense_layer(x)
    assert out.dtype == dense_out.dtype == torch.bfloat16
    bitsandbytes_own = bnb.matmul_4bit(x.to(torch.bfloat16), layer.weight.t(), quant_state=layer.weight.quant_state)
    assert torch.equal(out, bitsandbytes_own)
    assert layer(x).dtype == torch.float32  # no autocast: the input's dtype, as before


def test_qlora_keeps_no_more_activations_than_lora_on_the_dense_base(llama_dir):
    batch = {"input_ids": torch.randint(3, 250, (4, 256), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"].clone()
    saved = {}
    for quantize in (None, BF16_COMPUTE):
        model, _ = dt.load_model(str(llama_dir), quantize=quantize)
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
        saved[quantize is None] = saved_for_backward_bytes(model, "causal-lm", batch, packed=False, bf16=True)
    assert saved[False] <= saved[True], saved
