"""A checkpoint saved already quantized (`save_pretrained` of a QLoRA base, a published
*-bnb-4bit model) loads as it is: no second quantization, the same logits, its quantization
recorded like a base quantized while loading."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_llama_dir

import deltatune as dt
from deltatune.quantization import SIDECAR, is_quantized_linear

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("qc"))


def saved_quantized(llama_dir, out, quantize):
    model, tokenizer = dt.load_model(str(llama_dir), quantize=quantize)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("quantize", [None, "same"])
def test_a_checkpoint_saved_quantized_loads_as_it_is(llama_dir, tmp_path, kind, quantize):
    original = saved_quantized(llama_dir, tmp_path / "q", {"type": kind, "double_quant": False}
                               if kind != "int8" else kind)
    model, _ = dt.load_model(str(tmp_path / "q"), quantize=kind if quantize == "same" else None)
    assert model.deltatune_quantization.type == kind
    assert model.deltatune_quantization.double_quant is (kind == "int8")  # the file's, not the default
    assert sum(is_quantized_linear(m) for m in model.modules()) == 2 * 7
    x = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, x), logits(original, x))


def test_an_adapter_on_a_saved_quantized_checkpoint_records_its_quantization(llama_dir, tmp_path):
    saved_quantized(llama_dir, tmp_path / "q", "nf4")
    model, _ = dt.load_model(str(tmp_path / "q"))
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    dt.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / SIDECAR).read_text())["type"] == "nf4"


def test_the_compute_dtype_is_this_machines_choice(llama_dir, tmp_path):
    saved_quantized(llama_dir, tmp_path / "q", {"type": "nf4", "compute_dtype": "bfloat16"})
    model, _ = dt.load_model(str(tmp_path / "q"), quantize={"type": "nf4", "compute_dtype": "float32"})
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.float32
    assert model.deltatune_quantization.compute_dtype == "float32"


def test_a_saved_quantized_checkpoint_cannot_load_as_another_type(llama_dir, tmp_path):
    saved_quantized(llama_dir, tmp_path / "q", "nf4")
    with pytest.raises(dt.DeltatuneError, match=r"quantize: .* is already quantized as nf4; it cannot load as int8"):
        dt.load_model(str(tmp_path / "q"), quantize="int8")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_saved_quantized_checkpoint_is_not_left_mapped(llama_dir, tmp_path, kind):
    # a tensor left on transformers' map of the whole file keeps every page read while loading
    # resident; what stays mapped is the untied embedding's own bytes (weight_files.py)
    original = saved_quantized(llama_dir, tmp_path / "q", kind)
    model, _ = dt.load_model(str(tmp_path / "q"))
    gc.collect()
    table = model.get_input_embeddings().weight
    mapped = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
              if str(tmp_path / "q") in line]
    assert sum(int(end, 16) - int(start, 16) for start, end in mapped) <= table.numel() * table.element_size() + 2 * 4096
    x = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, x), logits(original, x))
