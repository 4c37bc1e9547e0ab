"""A quantized frozen base (QLoRA, Dettmers et al. 2023) through bitsandbytes.

    model, tok = load_model("smollm2-135m", quantize="nf4")     # or fp4 | int8 | none

Only the linear projections inside the transformer layers are quantized; embeddings, norms and
task heads (lm_head, classifier, score, pooler) stay dense. The quantization happens while
transformers streams the checkpoint from disk, so the dense weights are never all copied into
memory; a checkpoint saved quantized loads as it is. A model built in memory (a tiny test model)
is saved and reloaded first: quantizing in place would need the dense model resident.

The deltas never see a quantized weight: LoRA adds its update to the quantized layer's output,
adapters and the prompt methods sit outside the linears. Only merging touches the weights, via
`dequantize_model` (a 4-bit weight cannot absorb a small delta without rounding it away).

    config.py        `quantize:` -> QuantizationConfig (type, double quant, compute dtype)
    layers.py        bitsandbytes itself, and which modules of a model it quantized
    loading.py       the BitsAndBytesConfig, the linears kept dense, each layer's compute on this machine
    compute.py       how a 4-bit layer computes on CPU: one reused dequantization buffer per thread
    weight_files.py  how a quantized base's checkpoint files are read (pread; the embedding mapped)
    dense.py         back to dense weights: for merging, and to measure the quantization error
    record.py        base_quantization.json beside a saved adapter
"""
from deltatune.quantization.config import COMPUTE_DTYPES, TYPES, QuantizationConfig, parse_quantize
from deltatune.quantization.layers import (describe, import_bitsandbytes, is_quantized, is_quantized_linear,
                                           quantization_of)
from deltatune.quantization.loading import (bitsandbytes_config, dense_module_names, device_map,
                                            follow_this_machine, keep_one_weight_layout, own_weights,
                                            stored_quantization, use_inference_kernel)
from deltatune.quantization.dense import (dequantize_linear, dequantize_model, dequantized_weight,
                                          quantization_error)
from deltatune.quantization.record import SIDECAR, recorded_quantization, shared_quantization, write_record
from deltatune.quantization.weight_files import map_input_embedding, read_unmapped

__all__ = [
    "COMPUTE_DTYPES", "SIDECAR", "TYPES", "QuantizationConfig", "bitsandbytes_config", "dense_module_names",
    "dequantize_linear", "dequantize_model", "dequantized_weight", "describe", "device_map",
    "follow_this_machine", "import_bitsandbytes", "is_quantized", "is_quantized_linear",
    "keep_one_weight_layout", "map_input_embedding", "own_weights", "parse_quantize", "quantization_error",
    "quantization_of", "read_unmapped", "recorded_quantization", "shared_quantization",
    "stored_quantization", "use_inference_kernel", "write_record",
]
