"""Prompt tuning (Lester et al. 2021): n trainable embeddings prepended to the input embeddings.

Everything the model sees is unchanged except n extra "words" whose embeddings are learned;
`virtual_tokens` inserts them (after [CLS] on encoders, in front on decoders). Trainable
parameters: n · hidden.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import MethodConfig
from deltatune.methods.virtual_tokens import VirtualTokens, attach
from deltatune.methods.virtual_tokens_io import (WHY_NO_MERGE, common_peft_fields, load_virtual_state_dict,
                                validate_num_virtual_tokens, virtual_state_dict)

INITS = ("random", "vocab", "text")
PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptTuningConfig(MethodConfig):
    method = "prompt"
    peft_type = "PROMPT_TUNING"

    num_virtual_tokens: int = 20   # 20 soft tokens: Lester et al. saw little gain beyond
    # random: N(0, std of the embedding table), i.e. on the scale of real word embeddings;
    # vocab: embeddings of n randomly sampled vocabulary tokens; text: embeddings of init_text
    init: str = "vocab"
    init_text: str | None = None   # e.g. "Classify the sentiment of this review:" (tiled/cut to n)
    tokenizer_name_or_path: str | None = None  # for init="text"; default: the model's own

    def validate(self) -> None:
        super().validate()
        validate_num_virtual_tokens(self)
        if self.init not in INITS:
            self.fail("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            self.fail("init_text", f"must be a non-empty text when init='text', got {self.init_text!r}")


def _tokenize_init_text(model: nn.Module, config: PromptTuningConfig) -> list[int]:
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path

    name = config.tokenizer_name_or_path or getattr(model, "name_or_path", None)
    if not name:
        raise DeltatuneError("PromptTuningConfig.tokenizer_name_or_path: needed for init='text' "
                             "(this model does not say where its tokenizer is)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    except OSError:
        raise DeltatuneError(f"PromptTuningConfig.tokenizer_name_or_path: cannot load a tokenizer "
                             f"from {name!r}") from None
    ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DeltatuneError(f"PromptTuningConfig.init_text: {config.init_text!r} encodes to no tokens")
    return ids


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """(n, hidden) starting embeddings for `config.init`."""
    table = model.get_input_embeddings().weight.detach()  # (vocab, hidden)
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, table.shape[1], device=table.device) * table.float().std()
    if config.init == "vocab":
        ids = torch.randint(0, table.shape[0], (n,), device=table.device)
    else:
        text_ids = _tokenize_init_text(model, config)
        ids = torch.tensor((text_ids * (n // len(text_ids) + 1))[:n], device=table.device)
    return table[ids].float().clone()


def apply_prompt(model: nn.Module, config: PromptTuningConfig, name: str) -> None:
    attach(model, name, VirtualTokens("input", initial_prompt(model, config)))


def prompt_to_peft(config: PromptTuningConfig, model: nn.Module, name: str) -> dict:
    tokenizer = config.tokenizer_name_or_path or getattr(model, "name_or_path", None) or None
    return {**common_peft_fields(model, config.num_virtual_tokens),
            "prompt_tuning_init": PEFT_INITS[config.init],
            "prompt_tuning_init_text": config.init_text, "tokenizer_name_or_path": tokenizer}


def prompt_from_peft(values: dict) -> PromptTuningConfig:
    # The saved tensor replaces the initial values, so the model is built with a cheap init
    # (init="text" would load a tokenizer for nothing).
    return PromptTuningConfig(num_virtual_tokens=values["num_virtual_tokens"], init="random",
                              init_text=values.get("prompt_tuning_init_text"),
                              tokenizer_name_or_path=values.get("tokenizer_name_or_path"),
                              modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="prompt", config=PromptTuningConfig, apply=apply_prompt, to_peft=prompt_to_peft,
                from_peft=prompt_from_peft, state_dict=virtual_state_dict,
                load_state_dict=load_virtual_state_dict, why_no_merge=WHY_NO_MERGE, default_lr=3e-2,
                search_space={"num_virtual_tokens": [10, 20, 50], "init": ["vocab", "random"]})
