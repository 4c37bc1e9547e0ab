"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; the
block form of Liu et al. 2024): rotate each layer's input by a learned block-diagonal orthogonal
matrix R, so the frozen weight W becomes W·Rᵀ — its rows keep their lengths and the angles between
them ("hyperspherical energy"), which is what OFT preserves and LoRA does not.

    y = (x R) Wᵀ + b         R = diag(R₁, …, R_r), each Rᵢ (b × b), b = oft_block_size
    Rᵢ = Cayley(Qᵢ)          Qᵢ skew-symmetric, stored as its b(b-1)/2 upper-triangle entries

Cayley(Q) is (I - Q)(I + Q)⁻¹ (exact, an inverse per block) or, with `use_cayley_neumann`
(PEFT's default), its truncated series I + 2Q + 2Q² + … + Qᵏ (no inverse; orthogonal up to the
truncation). Q = 0 at the start, so R = I and the model starts equal to the base.
Trainable parameters per layer: in_features · (b - 1) / 2 (r blocks), or b(b-1)/2 with
`block_share`. `coft` (constrained OFT) keeps each ‖Qᵢ‖ within eps.

Merging folds R into W (W ← W·Rᵀ); unmerging multiplies by the blocks' inverses, so it is exact
for the series form too. Tensor name and shape are PEFT's: `oft_R.weight`, (r, b(b-1)/2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.weight_layer import (TargetedConfig, apply_weight_deltas, merge_weight_layers,
                                            nearest_divisors, peft_targets, targets_from_peft,
                                            unmerge_weight_layers)


@dataclass
class OFTConfig(TargetedConfig):
    method = "oft"
    peft_type = "OFT"

    # Give one of the two (the other 0): the block size b, or r, the number of blocks per layer
    # (r · b = the layer's in_features). Bigger blocks: denser rotations, more parameters.
    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0       # in training, each block is the identity with this probability
    init_weights: bool = True         # True: R = I (the base model); False: random rotations
    coft: bool = False                # constrained OFT: each ‖Qᵢ‖ at most eps / sqrt(blocks)
    eps: float = 6e-5
    block_share: bool = False         # one rotation block shared by the whole layer
    use_cayley_neumann: bool = True   # the series form of the Cayley map (no matrix inverse)
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        self.check_positive_int("r", allow_zero=True)
        self.check_positive_int("oft_block_size", allow_zero=True)
        if (self.r == 0) == (self.oft_block_size == 0):
            self.fail("oft_block_size", f"give either r or oft_block_size (the other 0), got r={self.r} "
                                        f"and oft_block_size={self.oft_block_size}")
        self.check_dropout("module_dropout")
        for flag in ("init_weights", "coft", "block_share", "use_cayley_neumann"):
            self.check_flag(flag)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or self.eps <= 0:
            self.fail("eps", f"must be a positive number, got {self.eps!r}")
        self.check_positive_int("num_cayley_neumann_terms")

    def blocks(self, in_features: int, path: str) -> tuple[int, int]:
        """(number of blocks, block size) for a layer of this width, or a one-line error."""
        wanted = self.oft_block_size or self.r
        if in_features % wanted:
            field_name = "oft_block_size" if self.oft_block_size else "r"
            self.fail(field_name, f"{wanted} does not divide the input width {in_features} of {path}; "
                                  f"nearest that do: {nearest_divisors(in_features, wanted)}")
        if self.oft_block_size:
            return in_features // self.oft_block_size, self.oft_block_size
        return self.r, in_features // self.r


# ------------------------------------------------------------------ pure functions of tensors
def skew_symmetric(upper: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size(size-1)/2) upper-triangle entries -> (n, size, size) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(size, size, 1, device=upper.device)
    matrix = upper.new_zeros(upper.shape[0], size, size)
    matrix[:, rows, cols] = upper
    return matrix - matrix.transpose(1, 2)


def neumann_terms(terms: int) -> list[tuple[int, float]]:
    """(power of Q, coefficient) of the truncated Cayley series, as PEFT (>= 0.18) sums it:
    I + 2Q + 2Q² + … + 2Q^(k-1) + Q^k, k = max(3, terms - 1) (just I + 2Q for two terms)."""
    if terms <= 1:
        return []
    if terms == 2:
        return [(1, 2.0)]
    last = max(3, terms - 1)
    return [(p, 2.0) for p in range(1, last)] + [(last, 1.0)]


def cayley(skew: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal (n, b, b) blocks from skew-symmetric ones."""
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype).expand_as(skew)
    if not neumann:
        return torch.linalg.solve(eye + skew, eye - skew, left=False)  # (I - Q)(I + Q)⁻¹
    result, power, have = eye.clone(), None, 0
    for exponent, coefficient in neumann_terms(terms):
        while have < exponent:
            power = skew if power is None else torch.bmm(power, skew)
            have += 1
        result = result + coefficient * power
    return result


def project_within(upper: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """COFT: each block's skew matrix scaled back to Frobenius norm eps / sqrt(blocks) if larger."""
    norms = torch.linalg.norm(skew_symmetric(upper, size), dim=(1, 2)).unsqueeze(1)
    limit = eps / upper.shape[0] ** 0.5
    return torch.where(norms <= limit, upper, upper * (limit / norms))


# ------------------------------------------------------------------ modules
class Rotation(nn.Module):
    """Holds PEFT's `oft_R.weight`: the upper triangles of the blocks' skew-symmetric matrices."""

    def __init__(self, stored_blocks: int, block_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(stored_blocks, block_size * (block_size - 1) // 2))


class OFTDelta(nn.Module):
    def __init__(self, in_features: int, config: OFTConfig, path: str) -> None:
        super().__init__()
        self.blocks, self.block_size = config.blocks(in_features, path)
        self.oft_R = Rotation(1 if config.block_share else self.blocks, self.block_size)
        if not config.init_weights:
            nn.init.normal_(self.oft_R.weight, mean=0.0, std=0.1)
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.dropout = config.module_dropout

    def rotation_blocks(self, drop: bool = True) -> torch.Tensor:
        """(blocks, b, b): every block's rotation (a shared block repeated); dropout only in
        training, never to merge."""
        weight = self.oft_R.weight
        if self.coft:  # the constraint is a projection of the stored weight itself, as in PEFT
            with torch.no_grad():
                weight.copy_(project_within(weight, self.block_size, self.eps))
        blocks = cayley(skew_symmetric(weight, self.block_size), self.neumann, self.terms)
        if blocks.shape[0] != self.blocks:
            blocks = blocks.expand(self.blocks, -1, -1)
        if drop and self.training and self.dropout > 0:
            dropped = torch.rand(self.blocks, device=blocks.device) < self.dropout
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            blocks = torch.where(dropped.view(-1, 1, 1), eye, blocks)
        return blocks

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x R, block by block along the last dimension (never the dense in × in matrix)."""
        blocks = self.rotation_blocks()
        shape = x.shape
        pieces = x.to(blocks.dtype).reshape(*shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", pieces, blocks).reshape(shape).to(x.dtype)

    def output(self, base_layer: nn.Module, x: torch.Tensor, transposed: bool, *args, **kwargs) -> torch.Tensor:
        return base_layer(self.rotate(x), *args, **kwargs)

    def _apply_blocks(self, weight: torch.Tensor, blocks: torch.Tensor, transposed: bool) -> None:
        """W ← W·Bᵀ for a Linear weight (out, in); W ← B·W for Conv1D's (in, out)."""
        b, n = self.block_size, self.blocks
        blocks = blocks.to(weight.dtype)
        if transposed:
            pieces = weight.data.reshape(n, b, -1)
            weight.data.copy_(torch.einsum("ick,iko->ico", blocks, pieces).reshape(weight.shape))
        else:
            pieces = weight.data.reshape(-1, n, b)
            weight.data.copy_(torch.einsum("oik,ick->oic", pieces, blocks).reshape(weight.shape))

    def merge_into(self, weight: torch.Tensor, transposed: bool) -> None:
        self._apply_blocks(weight, self.rotation_blocks(drop=False).float(), transposed)

    def unmerge_from(self, weight: torch.Tensor, transposed: bool) -> None:
        self._apply_blocks(weight, torch.linalg.inv(self.rotation_blocks(drop=False).float()), transposed)


# ------------------------------------------------------------------ apply, PEFT fields
def apply_oft(model: nn.Module, config: OFTConfig, name: str) -> None:
    apply_weight_deltas(model, config, name,
                        lambda path, in_f, out_f, weight: OFTDelta(in_f, config, path))


def oft_to_peft(config: OFTConfig, model: nn.Module, name: str) -> dict:
    return {**peft_targets(config, model, name), "r": config.r, "oft_block_size": config.oft_block_size,
            "module_dropout": config.module_dropout, "init_weights": config.init_weights,
            "coft": config.coft, "eps": config.eps, "block_share": config.block_share,
            "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms}


def oft_from_peft(values: dict) -> OFTConfig:
    if "oft_block_size" not in values:
        raise DeltatuneError("adapter_config.json: no oft_block_size — an OFT adapter from PEFT before "
                             "0.14, whose tensors are laid out differently; retrain it")
    return OFTConfig(**targets_from_peft(values), r=values.get("r", 0),
                     oft_block_size=values["oft_block_size"],
                     module_dropout=values.get("module_dropout", 0.0),
                     init_weights=bool(values.get("init_weights", True)),
                     coft=bool(values.get("coft", False)), eps=values.get("eps", 6e-5),
                     block_share=bool(values.get("block_share", False)),
                     use_cayley_neumann=bool(values.get("use_cayley_neumann", True)),
                     num_cayley_neumann_terms=values.get("num_cayley_neumann_terms", 5))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="oft", config=OFTConfig, apply=apply_oft, to_peft=oft_to_peft,
                from_peft=oft_from_peft, merge=merge_weight_layers, unmerge=unmerge_weight_layers,
                default_lr=1e-3,
                search_space={"oft_block_size": [16, 32, 64]})
