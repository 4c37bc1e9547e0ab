"""AdaLoRA's training-time hooks: the rank budget (called after each optimizer step) and the
orthogonality penalty (added to each step's loss). The trainer calls them through the method's
`after_step` / `training_loss` fields, knowing nothing of AdaLoRA.

Budget at step t (1-based, T = total_step, b0 = Σ init_r over layers, b1 = target_r × layers):

    t <= tinit                 b0, nothing pruned (the warm-up)
    tinit < t < T - tfinal     b1 + (b0 - b1) · (1 - (t - tinit) / (T - tfinal - tinit))³,
                               re-allocated every deltaT steps
    t == T - tfinal            b1, the last allocation; the pattern is then fixed
    t > T - tfinal             b1, pruned triplets zeroed again after every step

An allocation scores every triplet i of every layer by s(E_i) + mean_j s(A_ij) + mean_j s(B_ji),
s(θ) = Ī(θ) · Ū(θ): Ī the EMA (beta1) of the sensitivity I = |θ · ∂L/∂θ| and Ū the EMA (beta2)
of |I - Ī|. The lowest b0 - budget triplets over the whole model get E_i = 0 (PEFT's
RankAllocator, same order of operations). A pruned triplet can come back at a later allocation:
its E still receives gradient.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from deltatune.methods.base import delta_state


def budget_at(step: int, initial: int, target: int, tinit: int, tfinal: int, total: int,
              delta_t: int) -> tuple[int, bool]:
    """(the budget at `step`, whether to allocate at this step)."""
    if step <= tinit:
        return initial, False
    if step > total - tfinal:
        return target, True
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((initial - target) * progress ** 3 + target), step % delta_t == 0


def _update_importance(delta: nn.Module, beta1: float, beta2: float) -> None:
    for key in ("lora_A", "lora_E", "lora_B"):
        param = getattr(delta, key)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        with torch.no_grad():
            sensitivity = (param * grad).abs()
            mean, spread = delta.importance.get(key, (torch.zeros_like(param), torch.zeros_like(param)))
            mean = beta1 * mean + (1 - beta1) * sensitivity
            spread = beta2 * spread + (1 - beta2) * (sensitivity - mean).abs()
        delta.importance[key] = (mean, spread)


def _triplet_scores(delta: nn.Module) -> torch.Tensor:
    """One score per triplet (row of A, entry of E, column of B): (rank,)."""
    def score(key: str) -> torch.Tensor:
        mean, spread = delta.importance.get(key, (torch.zeros_like(getattr(delta, key)),) * 2)
        return mean * spread

    return score("lora_E").view(-1) + score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)


def _mask_to_budget(deltas: list[nn.Module], initial: int, budget: int) -> None:
    scores = [_triplet_scores(d) for d in deltas]
    prune = initial - budget
    if prune <= 0:  # nothing to prune (PEFT's kthvalue would fail on k = 0)
        for delta in deltas:
            delta.kept = torch.ones_like(delta.kept)
        return
    threshold = torch.kthvalue(torch.cat(scores), k=prune).values.item()
    with torch.no_grad():
        for delta, score in zip(deltas, scores):
            pruned = score <= threshold
            delta.lora_E.masked_fill_(pruned.view(-1, 1), 0.0)
            delta.kept = (~pruned).cpu()


def _mask_again(deltas: list[nn.Module]) -> None:
    with torch.no_grad():
        for delta in deltas:
            delta.lora_E.masked_fill_(~delta.kept.view(-1, 1).to(delta.lora_E.device), 0.0)


def allocate(model: nn.Module, name: str, step: int, total_steps: int, deltas: list[nn.Module]) -> None:
    """After optimizer step `step` (1-based) of `total_steps`: update the importance scores of
    adapter `name`'s `deltas` and prune to the step's budget (that step's gradients still there)."""
    state = delta_state(model)
    config = state.configs[name]
    if config.total_step is None:  # the run's steps: checked (and written to the file) now
        config.check_schedule(total_steps, "the run's optimizer steps")
        config = state.configs[name] = dataclasses.replace(config, total_step=total_steps)
    total = config.total_step
    initial = sum(len(d.slots) for d in deltas)
    target = config.target_r * len(deltas)
    if step < total - config.tfinal:
        for delta in deltas:
            _update_importance(delta, config.beta1, config.beta2)
        budget, now = budget_at(step, initial, target, config.tinit, config.tfinal, total, config.deltaT)
        if now:
            _mask_to_budget(deltas, initial, budget)
    elif step == total - config.tfinal:
        _mask_to_budget(deltas, initial, target)
        for delta in deltas:
            delta.importance = {}
    else:
        _mask_again(deltas)


def orthogonality_penalty(model: nn.Module, name: str, deltas: list[nn.Module]) -> torch.Tensor | None:
    """orth_reg_weight × the mean over A and B matrices of ‖AAᵀ - I‖_F and ‖BᵀB - I‖_F."""
    weight = delta_state(model).configs[name].orth_reg_weight
    if weight == 0:
        return None
    terms = []
    for delta in deltas:
        for gram in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return weight * torch.stack(terms).mean() if terms else None
