"""How a quantized base's checkpoint files are read: tensor by tensor into memory, except the
input embedding, which stays on a map of its file so only the rows a run looks up are resident.

A dense base is left to transformers, which memory-maps the file: there an embedding table costs
only the pages of the tokens seen (a Llama-3.1-8B shape's untied 128k x 4096 bf16 table is 0.98
GiB, of which a run over SmolLM2's tokenizer touches a few MB). A quantized base is read, not
mapped (see read_unmapped), so without map_input_embedding it would hold that whole table in
anonymous memory: the gap between QLoRA's and LoRA's peaks would be a loading artefact."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

_FILE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


@contextlib.contextmanager
def read_unmapped(quantization):
    """While loading a quantized base: safetensors files are read tensor by tensor (pread) instead
    of memory-mapped. Every page of a mapped file read while quantizing, or while copying codes
    off the map, counts in the process until the map closes: a 3B model peaked at 9.2 GB loading
    its 6.4 GB dense file (4.6 GB its 2.1 GB nf4 file) for 2.5 GB after. Yields the files read so
    (none: a .bin checkpoint, or a transformers without this hook; then own_weights copies)."""
    import transformers.modeling_utils as loading

    mapped_open = getattr(loading, "safe_open", None)
    read_files: list = []
    if quantization is None or mapped_open is None:
        yield read_files
        return

    def read_open(file, *args, **kwargs):
        if kwargs.get("device", "cpu") == "cpu" and kwargs.get("backend", "mmap") == "mmap":
            kwargs["backend"] = "pread"
            read_files.append(file)
        return mapped_open(file, *args, **kwargs)

    loading.safe_open = read_open
    try:
        yield read_files
    finally:
        loading.safe_open = mapped_open


def map_input_embedding(model: nn.Module, read_files: list) -> bool:
    """Put the input embedding back on a (copy-on-write) map of the file it was read from, when it
    is frozen-able as stored: same dtype and shape, and not tied to the output head (a tied table is
    read whole by every step's head product, so mapping it saves nothing). True when it did."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if table is None or not isinstance(getattr(table, "weight", None), torch.Tensor):
        return False
    weight = table.weight
    if head is not None and getattr(head, "weight", None) is weight:
        return False
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if param is weight]
    prefix = getattr(model, "base_model_prefix", "")
    keys = names + [n[len(prefix) + 1:] for n in names if prefix and n.startswith(prefix + ".")]
    for file in dict.fromkeys(str(f) for f in read_files):
        mapped = _mapped_tensor(Path(file), keys)
        if mapped is None:
            continue
        if mapped.dtype != weight.dtype or mapped.shape != weight.shape or not _same_rows(mapped, weight):
            return False  # converted while loading (dtype, a renamed or fused layout): keep the copy
        weight.data = mapped
        return True
    return False


def _mapped_tensor(file: Path, keys: list[str]) -> torch.Tensor | None:
    """The first of `keys` stored in the safetensors `file`, as a tensor on a private map of its bytes."""
    with open(file, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    key = next((k for k in keys if k in header), None)
    if key is None or header[key].get("dtype") not in _FILE_DTYPES:
        return None
    entry = header[key]
    begin, end = entry["data_offsets"]
    if end == begin:
        return None
    # mode "c": copy-on-write, so a run that does train the table writes private pages, never the file
    raw = np.memmap(file, dtype=np.uint8, mode="c", offset=8 + header_size + begin, shape=(end - begin,))
    return torch.from_numpy(raw).view(_FILE_DTYPES[entry["dtype"]]).view(entry["shape"])


def _same_rows(mapped: torch.Tensor, loaded: torch.Tensor) -> bool:
    """A few rows compared, not all: reading the whole table would make every page resident."""
    rows = sorted({0, mapped.shape[0] // 2, mapped.shape[0] - 1})
    return all(torch.equal(mapped[r], loaded[r]) for r in rows)
