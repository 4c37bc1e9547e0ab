"""`deltatune generate --model M [--adapter A] "prompt"`: the generated text, nothing else.

Chat models get their chat template (one user turn + the assistant prompt) unless
--no-chat-template; decoding is greedy unless --temperature > 0 (then top-p sampling, seeded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError


def prompt_ids(tokenizer: Any, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """(1, seq) input ids: the chat-templated user turn for chat models, else the raw prompt."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def check_options(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise DeltatuneError(f"--temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise DeltatuneError(f"--top-p: must be in (0, 1], got {top_p}")
    if max_new_tokens <= 0:
        raise DeltatuneError(f"--max-new-tokens: must be > 0, got {max_new_tokens}")


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Any, prompt: str, *, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  chat_template: bool = True) -> str:
    """Greedy (temperature 0) or sampled continuation of `prompt`, decoded without specials."""
    check_options(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt, chat_template).to(device)  # (1, seq)
    sampling = temperature > 0
    options: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_new_tokens,
                               "pad_token_id": tokenizer.pad_token_id}
    if sampling:
        torch.manual_seed(seed)
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # the model's generation_config may ask for sampling; the CLI promises greedy
        options.update(temperature=None, top_p=None, top_k=None)
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def load_for_generation(model_name: str, adapter: str | None, quantize: str | None = None):
    """(model, tokenizer) for generation: the base with the adapter's delta, or a full model dir.
    The base is quantized as the adapter was trained (its record), or as `quantize` says."""
    from deltatune.adapters_io import load_adapter
    from deltatune.models import load_model
    from deltatune.quantization import recorded_quantization

    if adapter is not None:
        directory = Path(adapter)
        if not directory.is_dir():
            raise DeltatuneError(f"{adapter}: adapter directory not found")
        if not (directory / "adapter_config.json").is_file() and (directory / "config.json").is_file():
            return load_model(str(directory), task="causal-lm")  # full fine-tune: a whole model
    model, tokenizer = load_model(model_name, task="causal-lm",
                                  quantize=quantize or recorded_quantization(adapter))
    if adapter is not None:
        load_adapter(model, adapter)
    return model, tokenizer


def generate_from_cli(args: Any) -> str:
    from deltatune.quantization import use_inference_kernel

    check_options(args.max_new_tokens, args.temperature, args.top_p)  # before the slow load
    model, tokenizer = load_for_generation(args.model, args.adapter, getattr(args, "quantize", None))
    use_inference_kernel(model)  # this process only generates
    if torch.cuda.is_available():
        model.to("cuda")
    return generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         chat_template=not args.no_chat_template)
