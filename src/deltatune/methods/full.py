"""Full fine-tuning: the delta is every weight. Saved as a normal transformers directory."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltatune.methods.base import MethodConfig
from deltatune.methods import Method


@dataclass
class FullConfig(MethodConfig):
    method = "full"
    peft_type = "FULL"  # never written to disk: a full save is a plain transformers directory

    freeze_embeddings: bool = False  # keep the (large) input embeddings frozen to save memory

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.freeze_embeddings, bool):
            self.fail("freeze_embeddings", f"must be true or false, got {self.freeze_embeddings!r}")


def apply_full(model: nn.Module, config: FullConfig, name: str) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
    if config.freeze_embeddings:
        for param in model.get_input_embeddings().parameters():
            param.requires_grad_(False)


def full_state_dict(model: nn.Module, name: str):
    return {k: v.detach() for k, v in model.state_dict().items()}


METHOD = Method(name="full", config=FullConfig, apply=apply_full,
                to_peft=lambda config, model, name: {"freeze_embeddings": config.freeze_embeddings},
                from_peft=lambda values: FullConfig(freeze_embeddings=values.get("freeze_embeddings", False)),
                state_dict=full_state_dict,
                default_lr=5e-5,
                why_no_merge="full fine-tuning has no separate delta to merge: the model already is the result")
