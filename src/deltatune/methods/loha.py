"""LoHa (Hyeon-Woo et al. 2022, "FedPara"; as in LyCORIS): the weight update is the Hadamard
(elementwise) product of two low-rank matrices, so rank r factors give an update of rank up to r².

    ΔW = (W1a · W1b) ⊙ (W2a · W2b) · alpha / r       W1a, W2a: (out, r); W1b, W2b: (r, in)
    y = x Wᵀ + b + x ΔWᵀ

W2b = 0 at the start (the others Kaiming-uniform), so ΔW = 0 and the model starts equal to the
base. Twice LoRA's parameters at the same r. ΔW is rebuilt every forward (out × in per layer,
kept for backward) — LoHa's price over LoRA in memory and time. Merging adds ΔW to W,
unmerging subtracts it. Tensor names and shapes are PEFT's: hada_w1_a, hada_w1_b, hada_w2_a,
hada_w2_b.
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
class LoHaConfig(TargetedConfig):
    method = "loha"
    peft_type = "LOHA"

    r: int = 8
    alpha: float = 8          # scale = alpha / r (PEFT's default alpha = r: scale 1)
    rank_dropout: float = 0.0    # in training, each output row of ΔW is dropped with this probability
    module_dropout: float = 0.0  # in training, the whole update is skipped with this probability
    init_weights: bool = True    # True: ΔW = 0 (the base model); False: every factor random

    def validate(self) -> None:
        super().validate()
        self.check_positive_int("r")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.fail("alpha", f"must be a positive number, got {self.alpha!r}")
        self.check_dropout("rank_dropout")
        self.check_dropout("module_dropout")
        self.check_flag("init_weights")


class LoHaDelta(AdditiveDelta):
    def __init__(self, in_features: int, out_features: int, config: LoHaConfig) -> None:
        super().__init__()
        r = config.r
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, in_features))
        for param in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            nn.init.kaiming_uniform_(param, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.hada_w2_b)
        self.scale = config.alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout

    def delta_weight(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scale


def apply_loha(model: nn.Module, config: LoHaConfig, name: str) -> None:
    apply_weight_deltas(model, config, name,
                        lambda path, in_f, out_f, weight: LoHaDelta(in_f, out_f, config))


def loha_to_peft(config: LoHaConfig, model: nn.Module, name: str) -> dict:
    return {**peft_targets(config, model, name), "r": config.r, "alpha": config.alpha,
            "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
            "init_weights": config.init_weights, "use_effective_conv2d": False,
            "rank_pattern": {}, "alpha_pattern": {}}


def loha_from_peft(values: dict) -> LoHaConfig:
    return LoHaConfig(**targets_from_peft(values), r=values.get("r", 8), alpha=values.get("alpha", 8),
                      rank_dropout=values.get("rank_dropout", 0.0),
                      module_dropout=values.get("module_dropout", 0.0),
                      init_weights=bool(values.get("init_weights", True)))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="loha", config=LoHaConfig, apply=apply_loha, to_peft=loha_to_peft,
                from_peft=loha_from_peft, merge=merge_weight_layers, unmerge=unmerge_weight_layers,
                default_lr=1e-3,
                search_space={"r": [4, 8, 16], "alpha": (4, 32, "log")})
