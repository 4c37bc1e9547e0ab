"""LoRA's initialisations beyond "A random, B zero", and how files record them.

    pissa  (Meng et al. 2024)  B·A = the top-r singular triplets of W, the base keeps the rest:
                               W = W_res + s·B·A, so the model starts equal to the base but
                               trains the principal directions. pissa_niter_N: a randomised SVD
                               with N subspace iterations (seeded, so a reload rebuilds it).
    olora  (Büyükakyüz 2024)   B·A = the first r columns/rows of W's QR factors; W_res likewise.
    loftq  (Li et al. 2023)    on a 4-bit base Q: s·B·A fits W - deq(Q), so quantized base +
                               adapter starts close to the dense W. With loftq_iter T > 1 the
                               codes are refit too, alternating Q_t = quant(W - s·B·A_{t-1}) and
                               B·A_t = SVD_r(W - deq(Q_t)): the base's codes change.

PiSSA and OLoRA change the base weights. An adapter trained from them is only meaningful on the
residual base, so saving converts it the way PEFT's `path_initial_model_for_weight_conversion`
does: W_res + s·B·A = W + s·(B·A - B0·A0) = W + s·[B | -B0]·[A ; A0], a plain LoRA of rank 2r
(alpha doubled, so s is unchanged) that loads on the unmodified base in deltatune and PEFT.
The trainable form (rank r, init recorded) is what checkpoints keep (resuming redoes the init,
then copies the tensors in). Loading such a file (or PEFT's plain save of one) reruns the same
deterministic decomposition on the unmodified base to find B0, A0 and loads the converted pair,
so a loaded adapter never changes its base.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import DeltatuneError

INITS = ("default", "gaussian", "pissa", "olora", "loftq")  # and pissa_niter_<N>
PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")
MUTATES_BASE = ("pissa", "olora")  # their saved form is converted to plain LoRA (see above)


def valid_init(init: object) -> bool:
    return isinstance(init, str) and (init in INITS or PISSA_NITER.fullmatch(init) is not None)


def changes_base(init: str) -> bool:
    """Does this init subtract its starting product from the base weights (PiSSA, OLoRA)?"""
    return init.startswith("pissa") or init == "olora"


# ------------------------------------------------------------------ pure functions of tensors
def pissa_factors(weight: torch.Tensor, r: int, scale: float,
                  niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A = W's best rank-r approximation; weight (out, in) in fp32."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # randomised: seeded so that loading the trainable form rebuilds the very same residual
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / scale)  # split s·U·S·Vh evenly between B and A
    return root[:, None] * Vh, U * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r], Q[:, :r]) of W = Q·R (PEFT's OLoRA: not divided by the scale)."""
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def low_rank_fit(residual: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B·A the best rank-r approximation of `residual` (LoftQ's step)."""
    return pissa_factors(residual, r, scale)


def converted_pair(lora_A: torch.Tensor, lora_B: torch.Tensor, initial_A: torch.Tensor,
                   initial_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B·A - B0·A0 = [B | -B0]·[A ; A0]: the rank-2r plain LoRA pair of a PiSSA/OLoRA delta."""
    return (torch.cat([lora_A, initial_A.to(lora_A.dtype)], dim=0),
            torch.cat([lora_B, -initial_B.to(lora_B.dtype)], dim=1))


# ------------------------------------------------------------------ the 4-bit base (LoftQ)
class DenseWeights:
    """The dense checkpoint a quantized model was loaded from, read one weight at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.where: dict[str, Path] | None = None  # key -> file, read on first use

    def weight(self, path: str) -> torch.Tensor:
        from safetensors import safe_open

        if self.where is None:
            self.directory = _dense_directory(self.model)
            self.where = {}
            for file in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(file), "pt") as handle:
                    self.where.update({key: file for key in handle.keys()})
        key = path.replace(".base_layer", "") + ".weight"
        if key not in self.where:
            raise DeltatuneError(f"init: loftq needs the dense weight {key!r}, which "
                                 f"{self.directory} does not hold")
        with safe_open(str(self.where[key]), "pt") as handle:
            return handle.get_tensor(key).float()


def _dense_directory(model: nn.Module) -> Path:
    from deltatune.models import _smollm2_gguf, gguf_cache_path, resolve_model_path

    name = getattr(model, "name_or_path", None) or ""
    try:
        if name == "smollm2-135m" or name.endswith(".gguf"):
            directory = gguf_cache_path(_smollm2_gguf() if name == "smollm2-135m" else Path(name))
        else:
            directory = Path(resolve_model_path(name))
    except (DeltatuneError, OSError):
        directory = Path(name)
    if not directory.is_dir() or not any(directory.glob("*.safetensors")):
        raise DeltatuneError(f"init: loftq fits the adapter to the dense weights, but the base "
                             f"{name!r} has no local safetensors checkpoint to read them from")
    return directory


def check_targets(model: nn.Module, paths: list[str], init: str) -> None:
    """Before anything changes: LoftQ needs 4-bit layers; PiSSA/OLoRA need dense ones."""
    for path in paths:
        layer = model.get_submodule(path)
        layer = getattr(layer, "base_layer", layer)
        kind = type(layer).__name__
        if init == "loftq" and kind != "Linear4bit":
            what = "int8" if kind == "Linear8bitLt" else "dense"
            raise DeltatuneError(f"init: loftq fits the adapter to a 4-bit base's quantization error, "
                                 f"but {path} is {what}; load the base with quantize: nf4 (or fp4)")
        if changes_base(init) and kind in ("Linear4bit", "Linear8bitLt"):
            raise DeltatuneError(f"init: {init} subtracts its start from the base weights, which the "
                                 f"quantized {path} cannot hold exactly; use quantize: none "
                                 f"(or init: loftq on a 4-bit base)")


def _quantize_like(layer: nn.Module, weight: torch.Tensor):
    """(codes, state) of `weight` in the layer's own 4-bit format."""
    from deltatune.quantization import import_bitsandbytes

    state = layer.weight.quant_state
    bnb = import_bitsandbytes()
    return bnb.functional.quantize_4bit(
        weight.to(state.dtype).contiguous(), blocksize=state.blocksize,
        compress_statistics=state.nested, quant_type=state.quant_type,
        quant_storage=layer.weight.data.dtype)


def _dequantize(codes: torch.Tensor, state) -> torch.Tensor:
    from deltatune.quantization import import_bitsandbytes

    return import_bitsandbytes().functional.dequantize_4bit(codes, state).float()


def loftq(layer: nn.Module, dense: torch.Tensor, r: int, scale: float,
          iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for a 4-bit `layer` whose dense weight is `dense` (out, in). One iteration keeps the
    layer's codes; more refit them (written into the layer) as in the paper's Algorithm 1."""
    from deltatune.quantization import dequantized_weight

    quantized = dequantized_weight(layer)
    lora_A, lora_B = low_rank_fit(dense - quantized, r, scale)
    for _ in range(iterations - 1):
        codes, state = _quantize_like(layer, dense - scale * (lora_B @ lora_A))
        lora_A, lora_B = low_rank_fit(dense - _dequantize(codes, state), r, scale)
        layer.weight.data, layer.weight.quant_state = codes, state
    return lora_A, lora_B


# ------------------------------------------------------------------ on a live layer
def initialise(model: nn.Module, path: str, layer: nn.Module, delta: nn.Module, config,
               dense: DenseWeights | None) -> None:
    """Set `delta`'s A and B (and the base weights, for the inits that change them)."""
    init = config.init
    if init in ("default", "gaussian"):
        return  # LoraDelta's constructor did it
    base = layer.base_layer
    if init == "loftq":
        lora_A, lora_B = loftq(base, dense.weight(path), config.r, config.scale, config.loftq_iter)
    else:
        weight = base.weight.T if layer.transposed else base.weight   # (out, in)
        weight32 = weight.detach().float()
        lora_A, lora_B = start_factors(weight32, config.r, config.scale, init)
        residual = weight32 - config.scale * (lora_B @ lora_A)
        with torch.no_grad():
            weight.copy_(residual.to(weight.dtype))
        # kept (never saved, never trained) for the conversion that save_adapter does
        delta.register_buffer("initial_A", lora_A.to(delta.lora_A.weight.dtype).clone(), persistent=False)
        delta.register_buffer("initial_B", lora_B.to(delta.lora_B.weight.dtype).clone(), persistent=False)
    with torch.no_grad():
        delta.lora_A.weight.copy_(lora_A)
        delta.lora_B.weight.copy_(lora_B)
    delta.rewrote_base = rewrites_base(config)


def rewrites_base(config) -> bool:
    """Does applying `config` change the base layer's weights (PiSSA, OLoRA) or codes (LoftQ
    with more than one round)? Such a delta cannot share its layers with another."""
    return changes_base(config.init) or (config.init == "loftq" and config.loftq_iter > 1)


def check_can_join(layer: nn.Module, path: str, name: str, config) -> None:
    """A delta that rewrote the base cannot share a layer with another delta, either way round."""
    changed = [other for other, d in layer.deltas.items() if getattr(d, "rewrote_base", False)]
    if changed:
        raise DeltatuneError(f"adapter {changed[0]!r} changed the base weights of {path} (init pissa, "
                             f"olora, or loftq with loftq_iter > 1); another adapter cannot join it — "
                             f"load its saved files on a fresh base instead")
    if rewrites_base(config) and len(layer.deltas):
        raise DeltatuneError(f"init: {config.init} changes the base weights of {path}, which already "
                             f"carries adapter {next(iter(layer.deltas))!r}; apply {name!r} to a fresh base")


# ------------------------------------------------------------------ files
def init_to_peft(config) -> dict:
    """adapter_config.json's init_lora_weights (and loftq_config) for the trainable form."""
    if config.init == "default":
        return {"init_lora_weights": True}
    if config.init == "loftq":
        if config.loftq_iter == 1:  # the codes are the base's own: a plain LoRA on that base
            return {"init_lora_weights": True}
        return {"init_lora_weights": "loftq",
                "loftq_config": {"loftq_bits": 4, "loftq_iter": config.loftq_iter}}
    return {"init_lora_weights": config.init}


def init_from_peft(values: dict) -> dict:
    """LoraConfig options from adapter_config.json's init_lora_weights (True/False/"gaussian"/
    "pissa"/"pissa_niter_N"/"olora"/"loftq")."""
    value = values.get("init_lora_weights", True)
    if value is True or value is False or value is None:
        return {"init": "default"}  # False: PEFT's "leave them random"; the file's tensors win
    if value == "loftq":
        iterations = (values.get("loftq_config") or {}).get("loftq_iter", 1)
        return {"init": "loftq", "loftq_iter": iterations}
    if not valid_init(value):
        raise DeltatuneError(f"adapter_config.json: init_lora_weights {value!r} is not supported "
                             f"(one of true, gaussian, pissa, pissa_niter_N, olora, loftq)")
    return {"init": value}


def start_factors(weight: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) a PiSSA/OLoRA init starts from, for the (out, in) weight of the unmodified base."""
    if init == "olora":
        return olora_factors(weight, r)
    niter = PISSA_NITER.fullmatch(init)
    return pissa_factors(weight, r, scale, int(niter.group(1)) if niter else None)


def converted_on_load(model: nn.Module, values: dict, tensors: dict) -> tuple[dict, dict]:
    """A PiSSA/OLoRA file in its trainable form (PEFT's plain save, or our checkpoint) as the
    plain LoRA of rank 2r it stands for on this unmodified base: loading then never changes the
    base, so other adapters, `disable_adapters` and serving the bare base stay right."""
    from deltatune.methods.base import PEFT_PREFIX

    init = values.get("init_lora_weights")
    if not (isinstance(init, str) and changes_base(init)):
        return values, tensors
    r, alpha = values["r"], values.get("lora_alpha", 8)
    rslora = bool(values.get("use_rslora"))
    scale = alpha / (math.sqrt(r) if rslora else r)
    tensors = dict(tensors)
    suffix = ".lora_A.weight"
    for key in [k for k in tensors if k.endswith(suffix) and k.startswith(PEFT_PREFIX)]:
        path = key[len(PEFT_PREFIX):-len(suffix)]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # the loader names the tensor that has no place in this model
        base = getattr(module, "base_layer", module)
        if getattr(base, "weight", None) is None or base.weight.ndim != 2:
            continue
        transposed = type(base).__name__ == "Conv1D"
        weight = (base.weight.T if transposed else base.weight).detach().float()
        initial_A, initial_B = start_factors(weight, r, scale, init)
        b_key = key[:-len(suffix)] + ".lora_B.weight"
        tensors[key], tensors[b_key] = converted_pair(tensors[key], tensors[b_key], initial_A, initial_B)
    root_two = math.sqrt(2) if rslora else 2
    return {**values, "r": 2 * r, "lora_alpha": alpha * root_two, "init_lora_weights": True}, tensors


def converted_for_export(model: nn.Module, name: str, tensors: dict, peft_config: dict) -> tuple[dict, dict]:
    """The plain-LoRA form of a PiSSA/OLoRA adapter (see the module docstring); other adapters
    are returned as they are."""
    from deltatune.methods.base import PEFT_PREFIX, delta_layers

    if not changes_base(str(peft_config.get("init_lora_weights"))):
        return tensors, peft_config
    tensors = dict(tensors)
    for path, layer in delta_layers(model):
        delta = layer.deltas[name] if name in layer.deltas else None
        if delta is None or getattr(delta, "initial_A", None) is None:
            continue
        key = f"{PEFT_PREFIX}{path}."
        tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"] = converted_pair(
            tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"],
            delta.initial_A.detach().cpu(), delta.initial_B.detach().cpu())
    root_two = 2 if not peft_config.get("use_rslora") else math.sqrt(2)  # keeps alpha/r (or /√r)
    converted = {**peft_config, "r": 2 * peft_config["r"],
                 "lora_alpha": peft_config["lora_alpha"] * root_two, "init_lora_weights": True}
    return tensors, converted
