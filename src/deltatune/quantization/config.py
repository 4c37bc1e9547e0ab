"""`quantize:` as a run config or `load_model` gives it: which bitsandbytes format the frozen base
is stored in, and the dtype each 4-bit layer computes in."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.errors import DeltatuneError
from deltatune.hardware import bf16_auto

TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float16": torch.float16}


@dataclass(frozen=True)
class QuantizationConfig:
    type: str = "nf4"            # nf4 (QLoRA's, best for normally distributed weights) | fp4 | int8
    double_quant: bool = True    # 4-bit: quantize the per-block scales too (~0.4 bit/param less)
    # 4-bit: the dtype each layer dequantizes into for its matmul. auto: bf16 where bf16 matmuls
    # are fast (CUDA, CPUs with AMX tiles), else fp32 (on AVX2-only CPUs bf16 is emulated).
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise DeltatuneError(f"quantize: unknown type {self.type!r} (one of none, {', '.join(TYPES)})")
        if not isinstance(self.double_quant, bool):
            raise DeltatuneError(f"quantize.double_quant: must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise DeltatuneError(f"quantize.compute_dtype: must be one of {', '.join(COMPUTE_DTYPES)}, "
                                 f"got {self.compute_dtype!r}")

    @property
    def bits(self) -> int:
        return 8 if self.type == "int8" else 4

    def resolved(self, device: torch.device | None = None) -> "QuantizationConfig":
        """`compute_dtype: auto` replaced by what this machine uses (what a run records)."""
        if self.compute_dtype != "auto":
            return self
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dataclasses.replace(self, compute_dtype="bfloat16" if bf16_auto(device) else "float32")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_quantize(value: Any, where: str = "quantize") -> QuantizationConfig | None:
    """`quantize:` as written in a config or passed to load_model: none | nf4 | fp4 | int8, a
    mapping {type, double_quant, compute_dtype}, or a QuantizationConfig. None means dense."""
    if value is None or value is False or value == "none":
        return None
    if isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        if value not in TYPES:
            raise DeltatuneError(f"{where}: unknown value {value!r} (one of none, {', '.join(TYPES)})")
        return QuantizationConfig(type=value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(QuantizationConfig)}
        for key in value:
            if key not in known:
                raise DeltatuneError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if value.get("type", "nf4") == "none":
            return None
        return QuantizationConfig(**value)
    raise DeltatuneError(f"{where}: expected none, {', '.join(TYPES)} or a mapping, got {value!r}")
