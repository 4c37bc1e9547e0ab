"""LoKr (Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation"): the weight update is a Kronecker product of a small matrix and a (possibly
low-rank) larger one, so a few thousand parameters can still give a full-rank update.

    ΔW = (W1 ⊗ W2) · alpha / r        out = a·c, in = b·d;  W1: (a, b), W2: (c, d)
    y = x Wᵀ + b + x ΔWᵀ

(a, c) and (b, d) split out and in into two factors near their square root (PEFT's
`factorization`; `decompose_factor` asks for one factor of that size instead). W2 is stored as
W2a·W2b of rank r when r < max(c, d)/2, else whole; with `decompose_both` W1 likewise.
W1 (or W1a) = 0 at the start (init_weights true; "lycoris": W2's second factor instead), so
ΔW = 0 and the model starts equal to the base. ΔW is rebuilt every forward, as LoHa's is.
Merging adds ΔW to W, unmerging subtracts it. Tensor names and shapes are PEFT's: lokr_w1 or
lokr_w1_a/lokr_w1_b, lokr_w2 or lokr_w2_a/lokr_w2_b.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.weight_layer import (AdditiveDelta, TargetedConfig, apply_weight_deltas,
                                            merge_weight_layers, peft_targets, targets_from_peft,
                                            unmerge_weight_layers)


@dataclass
class LoKrConfig(TargetedConfig):
    method = "lokr"
    peft_type = "LOKR"

    r: int = 8
    alpha: float = 8               # scale = alpha / r
    rank_dropout: float = 0.0      # in training, each output row of ΔW is dropped with this probability
    module_dropout: float = 0.0    # in training, the whole update is skipped with this probability
    rank_dropout_scale: bool = False  # rescale the kept rows by 1 / their share
    decompose_both: bool = False   # also store W1 as a rank-r product when r is small enough
    decompose_factor: int = -1     # -1: factors near the square root; n: one factor n when n divides
    init_weights: bool | str = True  # True: W1 = 0; "lycoris": W2's second factor = 0; False: random

    def validate(self) -> None:
        super().validate()
        self.check_positive_int("r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.fail("alpha", f"must be a positive number, got {self.alpha!r}")
        self.check_dropout("rank_dropout")
        self.check_dropout("module_dropout")
        self.check_flag("rank_dropout_scale")
        self.check_flag("decompose_both")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or not (
                self.decompose_factor == -1 or self.decompose_factor > 0):
            self.fail("decompose_factor", f"must be -1 (near the square root) or a positive integer, "
                                          f"got {self.decompose_factor!r}")
        if self.init_weights not in (True, False, "lycoris"):
            self.fail("init_weights", f"must be true, false or 'lycoris', got {self.init_weights!r}")


def factor_pair(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension: `factor` and its cofactor when it divides; otherwise the
    divisor pair nearest the square root (smaller first), no factor above `factor` when given."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        nxt = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if nxt > limit:
            break
        m, n = nxt, dimension // nxt
    return min(m, n), max(m, n)


def _uniform(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape))
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    return param


class LoKrDelta(AdditiveDelta):
    def __init__(self, in_features: int, out_features: int, config: LoKrConfig) -> None:
        super().__init__()
        r = config.r
        out_a, out_c = factor_pair(out_features, config.decompose_factor)
        in_b, in_d = factor_pair(in_features, config.decompose_factor)
        self.w1_split = config.decompose_both and r < max(out_a, in_b) / 2
        self.w2_split = r < max(out_c, in_d) / 2
        if self.w1_split:
            self.lokr_w1_a, self.lokr_w1_b = _uniform(out_a, r), _uniform(r, in_b)
        else:
            self.lokr_w1 = _uniform(out_a, in_b)
        if self.w2_split:
            self.lokr_w2_a, self.lokr_w2_b = _uniform(out_c, r), _uniform(r, in_d)
        else:
            self.lokr_w2 = _uniform(out_c, in_d)
        with torch.no_grad():
            if config.init_weights == "lycoris":
                (self.lokr_w2_b if self.w2_split else self.lokr_w2).zero_()
            elif config.init_weights:
                (self.lokr_w1_a if self.w1_split else self.lokr_w1).zero_()
        self.scale = config.alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        self.rescale_rank_dropout = config.rank_dropout_scale

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1_a @ self.lokr_w1_b if self.w1_split else self.lokr_w1
        w2 = self.lokr_w2_a @ self.lokr_w2_b if self.w2_split else self.lokr_w2
        return torch.kron(w1, w2) * self.scale


def apply_lokr(model: nn.Module, config: LoKrConfig, name: str) -> None:
    apply_weight_deltas(model, config, name,
                        lambda path, in_f, out_f, weight: LoKrDelta(in_f, out_f, config))


def lokr_to_peft(config: LoKrConfig, model: nn.Module, name: str) -> dict:
    return {**peft_targets(config, model, name), "r": config.r, "alpha": config.alpha,
            "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
            "rank_dropout_scale": config.rank_dropout_scale, "decompose_both": config.decompose_both,
            "decompose_factor": config.decompose_factor, "init_weights": config.init_weights,
            "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}}


def lokr_from_peft(values: dict) -> LoKrConfig:
    init = values.get("init_weights", True)
    return LoKrConfig(**targets_from_peft(values), r=values.get("r", 8), alpha=values.get("alpha", 8),
                      rank_dropout=values.get("rank_dropout", 0.0),
                      module_dropout=values.get("module_dropout", 0.0),
                      rank_dropout_scale=bool(values.get("rank_dropout_scale", False)),
                      decompose_both=bool(values.get("decompose_both", False)),
                      decompose_factor=values.get("decompose_factor", -1),
                      init_weights=init if init == "lycoris" else bool(init))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="lokr", config=LoKrConfig, apply=apply_lokr, to_peft=lokr_to_peft,
                from_peft=lokr_from_peft, merge=merge_weight_layers, unmerge=unmerge_weight_layers,
                default_lr=1e-3,
                search_space={"r": [4, 8, 16], "alpha": (4, 32, "log")})
