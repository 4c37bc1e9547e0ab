"""On CPU a 4-bit base layer dequantizes into one buffer its thread reuses (quantization/compute.py):
the same outputs and gradients as bitsandbytes' own path, bit for bit, one buffer shared by every
layer; and a quantized base is read from its files without a memory map."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tiny_runs import tiny_bert_dir, tiny_llama_dir

import deltatune as dt
from deltatune.quantization import compute as quantized_compute
from deltatune.quantization import is_quantized_linear

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("qcompute"))


def bitsandbytes_own(layer, x):
    """What the layer computes through bitsandbytes' Linear4bit.forward (a fresh tensor per call),
    deltatune's autocast hook included."""
    ours = layer.__dict__.pop("forward")
    try:
        return layer(x)
    finally:
        layer.forward = ours


def buffers() -> dict:
    return quantized_compute._local.__dict__.get("buffers", {})


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_input_gradient_are_bitsandbytes_own(llama_dir, compute, autocast):
    model, _ = dt.load_model(str(llama_dir), quantize={"type": "nf4", "compute_dtype": compute})
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0), requires_grad=True)
    results = []
    for forward in (layer, lambda x: bitsandbytes_own(layer, x)):
        quantized_compute.release_buffers()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward(x)
        out.float().square().sum().backward()
        results.append((out.detach(), x.grad, bool(buffers())))
        x.grad = None
    (ours, our_grad, used_buffer), (theirs, their_grad, their_buffer) = results
    assert used_buffer and not their_buffer  # each path was the one taken
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(our_grad, their_grad)


def test_every_layer_shares_one_buffer_as_large_as_the_largest_weight(llama_dir):
    model, _ = dt.load_model(str(llama_dir), quantize={"type": "nf4", "compute_dtype": "bfloat16"})
    quantized_compute.release_buffers()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]))
    largest = max(m.in_features * m.out_features for m in model.modules() if is_quantized_linear(m))
    assert [(dtype, b.numel()) for dtype, b in buffers().items()] == [(torch.bfloat16, largest)]
    seen = {}
    other = threading.Thread(target=lambda: (model(input_ids=torch.tensor([[3, 4, 5]])),
                                             seen.update(buffers())))
    with torch.no_grad():
        other.start()
        other.join()
    assert seen[torch.bfloat16].data_ptr() != buffers()[torch.bfloat16].data_ptr()  # one per thread


def test_a_layer_with_a_bias_matches_bitsandbytes_and_trains_its_bias(tmp_path):
    model, _ = dt.load_model(str(tiny_bert_dir(tmp_path)), task="classification",
                             quantize={"type": "fp4", "compute_dtype": "bfloat16"})
    layer = model.bert.encoder.layer[0].intermediate.dense
    layer.bias.requires_grad_(True)  # frozen in every deltatune method; its gradient still flows
    x = torch.randn(3, 4, layer.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    expected = (2 * out.detach()).reshape(-1, out.shape[-1]).sum(0)  # summed in bf16 by the layer
    assert torch.allclose(layer.bias.grad, expected, rtol=2e-2, atol=1e-2)
    x_grad, x.grad = x.grad, None
    theirs = bitsandbytes_own(layer, x)  # (bitsandbytes casts the bias to bf16 in place here)
    theirs.square().sum().backward()
    assert torch.equal(out, theirs) and torch.equal(x_grad, x.grad)


def test_the_inference_kernel_keeps_bitsandbytes_forward(llama_dir):
    from deltatune.quantization import use_inference_kernel

    model, _ = dt.load_model(str(llama_dir), quantize="nf4")
    use_inference_kernel(model)
    layer = model.model.layers[0].self_attn.q_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-bf16 inference kernel")
    quantized_compute.release_buffers()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]))
    assert not buffers()


@pytest.mark.parametrize("quantize,backend", [("nf4", "pread"), ("int8", "pread"), (None, "mmap")])
def test_a_quantized_base_is_read_not_mapped(llama_dir, monkeypatch, quantize, backend):
    # a mapped file's pages read while quantizing (or copying codes off it) count until it closes
    import transformers.modeling_utils as loading

    opened, real_open = [], loading.safe_open

    def spy(file, *args, **kwargs):
        opened.append((Path(file).name, kwargs.get("backend")))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", spy)
    model, _ = dt.load_model(str(llama_dir), quantize=quantize)
    assert opened == [("model.safetensors", backend)]
    assert loading.safe_open is spy  # put back
    if quantize is not None:  # what stays mapped is the untied embedding alone (weight_files.py)
        table = model.get_input_embeddings().weight
        mapped = [line.split()[0].split("-") for line in Path("/proc/self/maps").read_text().splitlines()
                  if line.endswith(str(llama_dir / "model.safetensors"))]
        assert sum(int(end, 16) - int(start, 16) for start, end in mapped) <= table.numel() * 4 + 2 * 4096
