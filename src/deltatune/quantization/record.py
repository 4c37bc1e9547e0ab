"""The record beside a saved adapter of how its base was quantized, so merge, eval, generate and
serve rebuild the same base without a flag."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.quantization.config import QuantizationConfig, parse_quantize
from deltatune.quantization.layers import quantization_of

SIDECAR = "base_quantization.json"  # beside adapter_config.json: how the base was quantized


def write_record(model: nn.Module, directory: Path) -> None:
    """Record the base's quantization beside a saved adapter, so merge/eval/generate/serve
    rebuild the same base without a flag. A sidecar file, not a key in adapter_config.json:
    PEFT warns about keys it does not know ("saved by a newer version"), which would mislead."""
    q = quantization_of(model)
    if q is not None:
        (directory / SIDECAR).write_text(json.dumps(q.to_dict(), indent=2, sort_keys=True) + "\n")


def recorded_quantization(adapter_dir: str | Path | None) -> QuantizationConfig | None:
    """The quantization an adapter (or run) directory was trained on; None when dense or absent."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / SIDECAR
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltatuneError(f"{path}: not valid JSON ({exc})") from None
    return parse_quantize(values, where=str(path))


def shared_quantization(adapter_dirs: dict[str, Any]) -> QuantizationConfig | None:
    """The one base quantization several adapters served together were trained on; adapters
    trained on different bases cannot share one loaded base (one line naming two of them)."""
    found = {name: recorded_quantization(d) for name, d in adapter_dirs.items()}
    first_name, first = next(iter(found.items()), (None, None))
    for name, q in found.items():
        if q != first:
            label = {n: (v.type if v is not None else "a dense base") for n, v in found.items()}
            raise DeltatuneError(f"--adapter {first_name} was trained on {label[first_name]} but "
                                 f"--adapter {name} on {label[name]}: serve them separately")
    return first
