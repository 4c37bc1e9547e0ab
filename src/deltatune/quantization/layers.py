"""bitsandbytes itself (imported quietly) and the layers it puts in a model: is this module, or
this model, quantized, and how."""
from __future__ import annotations

import logging
import warnings

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.quantization.config import QuantizationConfig


def import_bitsandbytes():
    """bitsandbytes, imported quietly: on AVX512-bf16 CPUs it (and the `kernels` package it loads a
    Hub kernel through) logs warnings on import, which would otherwise sit above every one-line error."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes' CPU ops look up a Hub kernel through the `kernels` package, which warns on
    # every load that it "skips the publisher trust check" offline: noise above deltatune's lines
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # int8 on CPU: "inputs will be cast from float32 to float16", once per layer per call
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        import bitsandbytes
    except ImportError:
        raise DeltatuneError("quantize: needs the bitsandbytes package (pip install 'bitsandbytes>=0.45')") from None
    return bitsandbytes


def is_quantized_linear(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def quantization_of(model: nn.Module) -> QuantizationConfig | None:
    """The quantization `model` was loaded with (None: a dense base)."""
    return getattr(model, "deltatune_quantization", None)


def is_quantized(model: nn.Module) -> bool:
    return quantization_of(model) is not None or any(is_quantized_linear(m) for m in model.modules())


def describe(model: nn.Module) -> str:
    return q.type if (q := quantization_of(model)) is not None else "quantized"
