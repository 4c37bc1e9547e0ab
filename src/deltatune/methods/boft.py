"""BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
Factorization"): OFT whose orthogonal matrix is a product of m block-diagonal factors, each
with its rows shuffled by a butterfly permutation, so few small blocks still mix every input
dimension with every other (OFT's one block-diagonal factor never mixes across blocks).

    y = ((x M) Wᵀ) ⊙ s + b          M = P_{m-1} B_{m-1} P_{m-1}ᵀ ⋯ P₀ B₀ P₀ᵀ,  s: (out,), starts at 1
    Bᵢ = diag(Cayley(Q_{i,1}), …)   Cayley(Q) = (I - S)(I + S)⁻¹, S = (Q - Qᵀ)/2, blocks b × b

m = boft_n_butterfly_factor; P₀ = I, and Pᵢ interleaves halves of blocks 2ⁱ apart (the FFT's
butterfly). Q = 0 at the start: M = I, s = 1, the base model. Trainable per layer:
m · in_features · b (the full b × b matrices are stored; only their skew part acts) plus out.
x M is computed factor by factor (a gather, a block product, a gather), never as a dense matrix.

Merging folds M and s into W (W ← diag(s)·W·Mᵀ); unmerging uses Mᵀ = M⁻¹ (exact Cayley: M is
orthogonal to rounding). Tensor names and shapes are PEFT's: `boft_R` (m, blocks, b, b) and
`boft_s` (out, 1). PEFT runs m > 1 only through its CUDA kernel: on a machine without one it
builds every BOFT layer with m = 1, so a file with m > 1 loads in PEFT only there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.weight_layer import (TargetedConfig, apply_weight_deltas, merge_weight_layers,
                                            peft_targets, targets_from_peft, unmerge_weight_layers)


@dataclass
class BOFTConfig(TargetedConfig):
    method = "boft"
    peft_type = "BOFT"

    # Give one of the two (the other 0): the block size b, or the number of blocks per factor.
    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1  # m, the butterfly factors (1: block-diagonal, like OFT)
    boft_dropout: float = 0.0         # in training, blocks of one random factor become the identity
    init_weights: bool = True         # True: M = I, s = 1 (the base model); False: random

    def validate(self) -> None:
        super().validate()
        self.check_positive_int("boft_block_size", allow_zero=True)
        self.check_positive_int("boft_block_num", allow_zero=True)
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            self.fail("boft_block_size", f"give either boft_block_size or boft_block_num (the other 0), "
                                         f"got {self.boft_block_size} and {self.boft_block_num}")
        self.check_positive_int("boft_n_butterfly_factor")
        self.check_dropout("boft_dropout")
        self.check_flag("init_weights")

    def blocks(self, width: int, path: str) -> tuple[int, int]:
        """(blocks per factor, block size) for a layer of this input width, or a one-line error."""
        extra = self.boft_n_butterfly_factor - 1
        if self.boft_block_num:
            num = self.boft_block_num
            if width % num:
                self.fail("boft_block_num", f"{num} does not divide the input width {width} of {path}")
            if extra and (extra > int(math.log2(num)) or num % 2 ** extra):
                self.fail("boft_n_butterfly_factor", f"{extra + 1} factors need boft_block_num a multiple "
                                                     f"of 2^{extra}, got {num} (at {path})")
            size = width // num
        else:
            size = self.boft_block_size
            if width % size:
                self.fail("boft_block_size", f"{size} does not divide the input width {width} of {path}")
            if extra and width % (size * 2 ** extra):
                self.fail("boft_n_butterfly_factor", f"{extra + 1} factors of {size}-blocks need the input "
                                                     f"width a multiple of {size * 2 ** extra}, {path} has {width}")
            num = width // size
        if extra and (num % 2 or size % 2):
            self.fail("boft_n_butterfly_factor", f"butterfly factors need an even block size and count, "
                                                 f"{path} gets {num} blocks of {size}")
        return num, size


# ------------------------------------------------------------------ pure functions of tensors
def butterfly_permutation(width: int, spans: int, half: int) -> torch.Tensor:
    """Indices p with (P x)[j] = x[p[j]]: within each of `spans` equal spans, the chunks of `half`
    entries reordered even-numbered first, then odd-numbered (PEFT's block_butterfly_perm)."""
    span = width // spans
    chunks = span // half
    order = [*range(0, chunks, 2), *range(1, chunks, 2)]
    within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
    return torch.cat([start + within for start in range(0, width, span)])


def cayley_exact(matrices: torch.Tensor) -> torch.Tensor:
    """(n, b, b) -> orthogonal (n, b, b): (I - S)(I + S)⁻¹ with S the skew part."""
    skew = 0.5 * (matrices - matrices.transpose(1, 2))
    eye = torch.eye(matrices.shape[-1], device=matrices.device, dtype=matrices.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


# ------------------------------------------------------------------ modules
class BOFTDelta(nn.Module):
    def __init__(self, in_features: int, out_features: int, config: BOFTConfig, path: str) -> None:
        super().__init__()
        self.blocks, self.block_size = config.blocks(in_features, path)
        factors = config.boft_n_butterfly_factor
        self.boft_R = nn.Parameter(torch.zeros(factors, self.blocks, self.block_size, self.block_size))
        self.boft_s = nn.Parameter(torch.ones(out_features, 1))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, mean=0.0, std=0.1)
            nn.init.normal_(self.boft_s, mean=1.0, std=0.1)
        self.dropout = config.boft_dropout
        for i in range(1, factors):  # factor 0's permutation is the identity
            perm = butterfly_permutation(in_features, self.blocks // 2 ** i, self.block_size // 2)
            self.register_buffer(f"perm{i}", perm, persistent=False)
            self.register_buffer(f"inverse{i}", torch.argsort(perm), persistent=False)

    def factor_blocks(self, drop: bool = True) -> torch.Tensor:
        """(factors, blocks, b, b) orthogonal blocks (dropout only in training, never to merge)."""
        m, n, b, _ = self.boft_R.shape
        blocks = cayley_exact(self.boft_R.reshape(m * n, b, b)).reshape(m, n, b, b)
        if drop and self.training and self.dropout > 0:
            factor = int(torch.randint(0, m, (1,)))
            dropped = torch.zeros(m, n, 1, 1, dtype=torch.bool, device=blocks.device)
            dropped[factor, torch.randperm(n)[:int(self.dropout * n)]] = True
            blocks = torch.where(dropped, torch.eye(b, device=blocks.device, dtype=blocks.dtype), blocks)
        return blocks

    def rotate(self, x: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """x M along the last dimension: x Pᵢ Bᵢ Pᵢᵀ for i = m-1 down to 0."""
        blocks = self.factor_blocks(drop)
        shape, dtype = x.shape, x.dtype
        x = x.to(blocks.dtype)
        for i in reversed(range(blocks.shape[0])):
            if i:
                x = x.index_select(-1, getattr(self, f"inverse{i}"))  # x P
            pieces = x.reshape(*shape[:-1], self.blocks, self.block_size)
            x = torch.einsum("...rk,rkc->...rc", pieces, blocks[i]).reshape(shape)
            if i:
                x = x.index_select(-1, getattr(self, f"perm{i}"))     # · Pᵀ
        return x.to(dtype)

    def output(self, base_layer: nn.Module, x: torch.Tensor, transposed: bool, *args, **kwargs) -> torch.Tensor:
        out = base_layer(self.rotate(x), *args, **kwargs)
        scale = self.boft_s.view(-1).to(out.dtype)
        bias = getattr(base_layer, "bias", None)
        if bias is None:
            return out * scale
        return torch.addcmul(bias.to(out.dtype) * (1 - scale), out, scale)  # (out - b)·s + b

    def matrix(self) -> torch.Tensor:
        """M as a dense (in, in) matrix, in float32 (for merging)."""
        eye = torch.eye(self.blocks * self.block_size, device=self.boft_R.device, dtype=self.boft_R.dtype)
        return self.rotate(eye, drop=False).float()

    def merge_into(self, weight: torch.Tensor, transposed: bool) -> None:
        matrix, scale = self.matrix().float(), self.boft_s.detach().float().view(-1)
        if transposed:  # Conv1D (in, out): W ← M W diag(s)
            weight.data.copy_(((matrix @ weight.data.float()) * scale.view(1, -1)).to(weight.dtype))
        else:           # Linear (out, in): W ← diag(s) W Mᵀ
            weight.data.copy_(((weight.data.float() @ matrix.T) * scale.view(-1, 1)).to(weight.dtype))

    def unmerge_from(self, weight: torch.Tensor, transposed: bool) -> None:
        matrix, scale = self.matrix().float(), self.boft_s.detach().float().view(-1)
        if transposed:
            weight.data.copy_((matrix.T @ (weight.data.float() / scale.view(1, -1))).to(weight.dtype))
        else:
            weight.data.copy_(((weight.data.float() / scale.view(-1, 1)) @ matrix).to(weight.dtype))


# ------------------------------------------------------------------ apply, PEFT fields
def apply_boft(model: nn.Module, config: BOFTConfig, name: str) -> None:
    apply_weight_deltas(model, config, name,
                        lambda path, in_f, out_f, weight: BOFTDelta(in_f, out_f, config, path))


def boft_to_peft(config: BOFTConfig, model: nn.Module, name: str) -> dict:
    return {**peft_targets(config, model, name), "boft_block_size": config.boft_block_size,
            "boft_block_num": config.boft_block_num,
            "boft_n_butterfly_factor": config.boft_n_butterfly_factor,
            "boft_dropout": config.boft_dropout, "init_weights": config.init_weights}


def boft_from_peft(values: dict) -> BOFTConfig:
    return BOFTConfig(**targets_from_peft(values), boft_block_size=values.get("boft_block_size", 4),
                      boft_block_num=values.get("boft_block_num", 0),
                      boft_n_butterfly_factor=values.get("boft_n_butterfly_factor", 1),
                      boft_dropout=values.get("boft_dropout", 0.0),
                      init_weights=bool(values.get("init_weights", True)))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="boft", config=BOFTConfig, apply=apply_boft, to_peft=boft_to_peft,
                from_peft=boft_from_peft, merge=merge_weight_layers, unmerge=unmerge_weight_layers,
                default_lr=1e-3,
                search_space={"boft_block_size": [4, 8, 16]})
