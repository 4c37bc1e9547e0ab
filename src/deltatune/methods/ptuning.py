"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder.

A table of n embeddings goes through a small encoder — a bidirectional LSTM followed by a
two-layer MLP, or a three-layer MLP alone — and the encoder's output is what `virtual_tokens`
inserts into the input. The encoder couples the tokens, which makes training steadier than
free embeddings. At save time the output is materialised (PEFT's `prompt_embeddings`), so a
loaded adapter is plain prompt embeddings and inference needs no encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.base import MethodConfig
from deltatune.methods.prefix_attention import attention_geometry
from deltatune.methods.virtual_tokens import VirtualTokens, attach
from deltatune.methods.virtual_tokens_io import (WHY_NO_MERGE, common_peft_fields, load_virtual_state_dict,
                                validate_num_virtual_tokens, virtual_state_dict)

ENCODERS = ("lstm", "mlp")


@dataclass
class PTuningConfig(MethodConfig):
    method = "ptuning"
    peft_type = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder: str = "mlp"               # mlp: 3 linear layers (PEFT's recommended); lstm: Liu et al.
    encoder_hidden_size: int | None = None  # default: the model's hidden size
    encoder_layers: int = 2            # LSTM layers (the MLP always has 3 linear layers)
    dropout: float = 0.0               # between LSTM layers

    def validate(self) -> None:
        super().validate()
        validate_num_virtual_tokens(self)
        if self.encoder not in ENCODERS:
            self.fail("encoder", f"must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and (
                not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0):
            self.fail("encoder_hidden_size", f"must be a positive integer, got {self.encoder_hidden_size!r}")
        if not isinstance(self.encoder_layers, int) or self.encoder_layers <= 0:
            self.fail("encoder_layers", f"must be a positive integer, got {self.encoder_layers!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            self.fail("dropout", f"must be in [0, 1), got {self.dropout!r}")


class LstmPromptEncoder(nn.Module):
    """(n, hidden) -> bidirectional LSTM (n, 2·H) -> Linear-ReLU-Linear -> (n, out_features).

    out_features defaults to hidden (input prompts); prefix tuning asks for every layer's keys
    and values at once."""

    def __init__(self, hidden: int, encoder_hidden: int, layers: int, dropout: float,
                 out_features: int | None = None) -> None:
        super().__init__()
        self.lstm = nn.LSTM(hidden, encoder_hidden, num_layers=layers, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * encoder_hidden, 2 * encoder_hidden), nn.ReLU(),
                                 nn.Linear(2 * encoder_hidden, out_features or hidden))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(table.unsqueeze(0))  # (1, n, 2·H)
        return self.mlp(states).squeeze(0)


class MlpPromptEncoder(nn.Module):
    """(n, hidden) -> Linear-ReLU-Linear-ReLU-Linear -> (n, hidden); tokens encoded independently."""

    def __init__(self, hidden: int, encoder_hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, encoder_hidden), nn.ReLU(),
                                 nn.Linear(encoder_hidden, encoder_hidden), nn.ReLU(),
                                 nn.Linear(encoder_hidden, hidden))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp(table)


def encoder_hidden_size(model: nn.Module, config: PTuningConfig) -> int:
    return config.encoder_hidden_size or attention_geometry(model)["hidden"]


def apply_ptuning(model: nn.Module, config: PTuningConfig, name: str) -> None:
    hidden = attention_geometry(model)["hidden"]
    size = encoder_hidden_size(model, config)
    encoder = (LstmPromptEncoder(hidden, size, config.encoder_layers, config.dropout)
               if config.encoder == "lstm" else MlpPromptEncoder(hidden, size))
    table = torch.randn(config.num_virtual_tokens, hidden)  # the encoder sets the output's scale
    attach(model, name, VirtualTokens("input", table, encoder))


def ptuning_to_peft(config: PTuningConfig, model: nn.Module, name: str) -> dict:
    return {**common_peft_fields(model, config.num_virtual_tokens),
            "encoder_reparameterization_type": config.encoder.upper(),
            "encoder_hidden_size": encoder_hidden_size(model, config),
            "encoder_num_layers": config.encoder_layers, "encoder_dropout": config.dropout}


def ptuning_from_peft(values: dict) -> PTuningConfig:
    return PTuningConfig(num_virtual_tokens=values["num_virtual_tokens"],
                         encoder=str(values.get("encoder_reparameterization_type", "MLP")).lower(),
                         encoder_hidden_size=values.get("encoder_hidden_size"),
                         encoder_layers=values.get("encoder_num_layers", 2),
                         dropout=values.get("encoder_dropout", 0.0),
                         modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="ptuning", config=PTuningConfig, apply=apply_ptuning, to_peft=ptuning_to_peft,
                from_peft=ptuning_from_peft, state_dict=virtual_state_dict,
                load_state_dict=load_virtual_state_dict, why_no_merge=WHY_NO_MERGE, default_lr=1e-3,
                search_space={"num_virtual_tokens": [10, 20, 50]})
