"""Model FLOPs of a Llama-style decoder, written out, and model-FLOPs utilisation (MFU).

MFU = the FLOPs the model *needs* for the work done / seconds / the machine's measured matmul
peak at the run's precision (deltatune.hardware: `deltatune inspect --hardware`). The
FLOPs are the useful ones only: real tokens (no padding), the LM head only at positions that
carry a label, causal attention counted over the keys each query may see. A tool that computes
more (padding, full logits, a dense mask) gets no credit for it, so MFU ratios between tools on
the same rows equal their real-tokens/s ratios.

One multiply-add = 2 FLOPs. For a linear map with `i` inputs and `o` outputs, per token:
  forward              2·i·o
  input gradient       2·i·o   (needed wherever anything below the layer trains)
  weight gradient      2·i·o   (only for a weight that trains; frozen weights need none)
Per layer of SmolLM2-135M (hidden 576, 9 heads of 64, 3 key/value heads, MLP 1536):
  q 576·576, k 576·192, v 576·192, o 576·576, gate 576·1536, up 576·1536, down 1536·576
  = 3.54M weights -> 7.08 MFLOP forward per token per layer; x30 layers = 212 MFLOP.
Attention (per layer, per query, `keys` = how many keys it sees; causal: position p sees p+1):
  forward   scores q·kᵀ 2·heads·head_dim·keys + weighted values 2·heads·head_dim·keys
  backward  twice the forward (gradients of q and k from the scores; of the weights and v)
LM head (tied embeddings, 576 x 49,152): 2·576·49,152 = 56.6 MFLOP forward per labelled
position, as much again for its input gradient, and again for its weight gradient when the
embedding trains (full fine-tuning).
LoRA rank r on a linear i->o: forward 2·r·(i+o), weight gradients 2·r·(i+o), input gradients
2·r·o (into the rank-r intermediate) + 2·i·r (into x, where something below trains) — under 3%
of the base layer at r=8.

So a LoRA SFT token costs ~2 x 212 MFLOP in the projections (forward + input gradient; layer 0's
q/k/v need no input gradient, nothing below them trains), plus the head twice on labelled
positions, plus attention; full fine-tuning adds the weight gradients (another 212 MFLOP and the
head's third product).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers LlamaConfig (or any config with the same fields)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear map in one layer."""
        h, q, kv, m = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")  # layer 0: their input (the embeddings) is frozen


def projection_flops(shape: Shape, training: str, lora_rank: int = 0,
                     lora_targets: Iterable[str] = (), input_needs_grad_at_layer0: bool = False) -> float:
    """FLOPs per token in the layers' linear maps.

    training: "inference" (forward only), "frozen" (forward + input gradient, nothing trains:
    the floor of any method that trains inside the network), "lora", or "full".
    """
    per_layer = shape.projections()
    targets = set(lora_targets)
    total = 0.0
    for layer in range(shape.layers):
        for name, (i, o) in per_layer.items():
            dense = 2 * i * o
            total += dense  # forward
            if training == "inference":
                continue
            below_trains = layer > 0 or name not in ATTENTION_INPUTS or input_needs_grad_at_layer0 \
                or training == "full"
            # full fine-tuning: the embeddings train, so even layer 0 needs input gradients
            if below_trains:
                total += dense  # input gradient
            if training == "full":
                total += dense  # weight gradient
            if training == "lora" and name in targets:
                into, out_of = 2 * i * lora_rank, 2 * lora_rank * o  # A: i -> r, B: r -> o
                # forward, both weight gradients, B's input gradient (A's weight gradient needs
                # it), A's input gradient only where something below trains
                total += 2 * (into + out_of) + out_of + (into if below_trains else 0)
    return total


def attention_flops(shape: Shape, length: int, training: str, prefix: int = 0) -> float:
    """Causal attention FLOPs of one example of `length` tokens (each sees `prefix` extra keys)."""
    keys = length * prefix + length * (length + 1) / 2  # summed over the example's queries
    forward = 4 * shape.heads * shape.head_dim * keys * shape.layers
    return forward * (1 if training == "inference" else 3)


def head_flops(shape: Shape, labelled: int, training: str) -> float:
    """The LM head at the `labelled` positions (the only ones whose logits a loss needs)."""
    dense = 2 * shape.hidden * shape.vocab * labelled
    return dense * {"inference": 1, "full": 3}.get(training, 2)


def example_flops(shape: Shape, length: int, labelled: int, training: str, *, lora_rank: int = 0,
                  lora_targets: Iterable[str] = (), virtual_tokens: int = 0, prefix: int = 0) -> float:
    """Model FLOPs of training (or running) one example: `length` real tokens, `labelled` of them
    with a label; prompt tuning's `virtual_tokens` run through every layer too; prefix tuning's
    `prefix` keys are seen by every query. Trainable virtual tokens sit below layer 0, so they
    need every input gradient."""
    positions = length + virtual_tokens
    needs_layer0 = bool(virtual_tokens)
    return (positions * projection_flops(shape, training, lora_rank, lora_targets, needs_layer0)
            + attention_flops(shape, positions, training, prefix)
            + head_flops(shape, labelled, training))


def batch_flops(shape: Shape, examples: Sequence, training: str, **method) -> float:
    """Sum over examples (each with .input_ids and .labels, -100 = no label; causal LM: the
    label of position p is predicted at p-1, so a row with n labels has n-1 scored positions
    unless it is the first token)."""
    total = 0.0
    for example in examples:
        labels = list(example.labels)
        scored = sum(1 for y in labels[1:] if y != -100)
        total += example_flops(shape, len(example.input_ids), scored, training, **method)
    return total


def generate_flops(shape: Shape, prompt: int, new_tokens: int) -> float:
    """Greedy decoding: the prompt's forward (head at its last position only), then one forward
    per new token after the first, each seeing the whole context so far."""
    total = prompt * projection_flops(shape, "inference") + attention_flops(shape, prompt, "inference")
    total += head_flops(shape, 1, "inference")
    for step in range(1, new_tokens):
        context = prompt + step  # keys the new token sees, itself included
        total += projection_flops(shape, "inference") + head_flops(shape, 1, "inference")
        total += 4 * shape.heads * shape.head_dim * context * shape.layers
    return total


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Fraction of the measured peak: flops / seconds / (peak GFLOP/s · 1e9)."""
    return flops / seconds / (peak_gflops * 1e9)


def measured_peak(bf16: bool) -> dict:
    """This machine's measured matmul peak at the run's precision (the cached probe)."""
    from deltatune.hardware import machine_profile

    profile = machine_profile("cpu")
    key = "bf16_gflops" if bf16 else "fp32_gflops"
    return {"precision": "bf16" if bf16 else "fp32", "peak_gflops": profile[key],
            "cpu_flags": profile.get("flags", []), "probe_threads": profile["threads"]}
