"""Weight decay variants. The decay itself is applied by the engine's write-back (decoupled,
``p <- p * (1 - lr * lr_scale * wd * decay_scale)``); these transforms set its schedule or act on the
proposed parameters.

``DynamicWeightDecay``: a schedule on the step counter (no paper; the originals' heuristic with
its floor made to bind, defect 13). For t > T = ``wd_transition_steps``:

    decay_scale = max(wd_min_ratio, wd_decay_factor ** ((t - T) / T))

The originals capped the exponent at 2 (LoKr 1.5), so with the defaults the multiplier never went
below 0.49 and ``wd_min_ratio`` never acted. ``scope="adapters"`` applies it to adapter factors only
(parameters with names of other kinds keep the constant decay; without names it applies to all),
``scope="all"`` to every parameter.

``SelectiveProjectionDecay`` -- SPD (Tian et al. 2024, "Rethinking Weight Decay for Robust
Fine-Tuning of Foundation Models", arXiv 2411.01713), paper form. After the base step proposes
theta_new from theta (per tensor, anchor theta_0):

    c = -<g, theta - theta_0>;   if c < 0:
        r = max(0, ||theta_new - theta_0|| - ||theta - theta_0||) / ||theta_new - theta_0||
        theta_new <- theta_new - spd_lambda * r * (theta_new - theta_0)

The anchor is 0 for adapter factors (no copy is stored, DESIGN §4) and the initial value for whole
weights (and for parameters without names), kept in the optimizer state so it survives resume.
The originals applied decay unconditionally with a different ratio and never saved the anchor
(defect 6).
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform
from .agr import l1_norms
from .projection import compute_params

_TINY = 1e-30


def dynamic_multiplier(t: int, transition: int, factor: float, floor: float) -> float:
    if t <= transition:
        return 1.0
    return max(floor, factor ** ((t - transition) / transition))


class DynamicWeightDecay(Transform):
    name = "dynamic_wd"

    def __init__(self, scope: str = "adapters") -> None:
        self.scope = scope

    def _applies(self, role) -> bool:
        return self.scope == "all" or role is None or role.adapter

    def prepare(self, b: Bucket) -> None:
        hp = b.hp
        scale = b.decay_scale or [1.0] * len(b)
        b.decay_scale = [
            s * (dynamic_multiplier(t, hp["wd_transition_steps"], hp["wd_decay_factor"], hp["wd_min_ratio"])
                 if self._applies(r) else 1.0)
            for s, t, r in zip(scale, b.steps, b.roles)]



def _needs_anchor(role) -> bool:
    return role is None or not role.adapter


class SelectiveProjectionDecay(Transform):
    name = "spd"
    post_update = True

    def __init__(self, strength: str = "spd_lambda") -> None:
        self.strength = strength  # the hyperparameter holding lambda (Improved: "weight_decay")

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (StateSpec("spd_anchor", quantizable=False, init="param", applies=_needs_anchor),)

    def _deviation(self, b: Bucket, x: list[torch.Tensor]) -> list[torch.Tensor]:
        anchors = b.state["spd_anchor"]
        return [xi - a if a is not None else xi for xi, a in zip(x, anchors)]

    def foreach(self, b: Bucket) -> None:
        dev = self._deviation(b, compute_params(b))
        b.scratch["spd_c"] = [-torch.dot(g.reshape(-1), d.reshape(-1)) for g, d in zip(b.grads, dev)]
        b.scratch["spd_prev"] = torch._foreach_norm(dev)

    def math(self, x: Slot) -> None:
        a = x.st["spd_anchor"]
        dev = x.p if a is None else x.p - a
        x.scratch["spd_c"] = -(x.g * dev).sum()
        x.scratch["spd_prev"] = dev.norm()

    def after_math(self, x: Slot, new: torch.Tensor) -> torch.Tensor:
        a = x.st["spd_anchor"]
        dev = new if a is None else new - a
        gamma = dev.norm()
        ratio = (gamma - x.scratch["spd_prev"]).clamp_min(0.0) / gamma.clamp_min(_TINY)
        coef = torch.where(x.scratch["spd_c"] < 0, x.hp[self.strength] * ratio, torch.zeros_like(ratio))
        return new - coef * dev

    def after_update(self, b: Bucket, targets: list[torch.Tensor]) -> None:
        lam = b.hp[self.strength]
        dev = self._deviation(b, targets)
        new = torch._foreach_norm(dev)
        grow = torch._foreach_sub(new, b.scratch["spd_prev"])
        torch._foreach_clamp_min_(grow, 0.0)
        denom = torch._foreach_clamp_min(new, _TINY)
        ratio = torch._foreach_div(grow, denom)
        # on the stacked 0-d values: a few ops per bucket rather than three per tensor (GPU launches)
        coef = torch.where(torch.stack(b.scratch["spd_c"]) < 0, lam * torch.stack(ratio), 0.0).unbind()
        zero = [i for i, a in enumerate(b.state["spd_anchor"]) if a is None]
        if zero:  # zero anchor: theta - k * theta = theta * (1 - k)
            keep = torch._foreach_neg([coef[i] for i in zero])
            torch._foreach_add_(keep, 1.0)
            torch._foreach_mul_([targets[i] for i in zero], keep)
        for x, d, a, k in zip(targets, dev, b.state["spd_anchor"], coef):
            if a is not None:
                x.sub_(d * k)


class NoDecoupledDecay(Transform):
    """Turns the engine's decoupled weight decay off for a recipe whose ``weight_decay`` feeds
    another technique (Automagic_CameAMP_Improved: SPD's strength)."""

    name = "no_decoupled_decay"

    def prepare(self, b: Bucket) -> None:
        b.decay_scale = [0.0] * len(b)


class AdaptiveWeightDecay(NoDecoupledDecay):
    """The Automagic_CameAMP family's adaptive weight decay (ALGORITHMS.md §2.14), repaired.

    Tensors whose gradients are larger than the group's typical gradient decay more:

        z = (mean|g_tensor| - mean|g_group|) / std|g_group|,   k = 2 * sigmoid(4 z)   in (0, 2)
        theta <- theta * (1 - rate_element * weight_decay * k)

    where ``rate_element`` is the element's effective step (lr mask, row scale, scheduler), so the
    decay follows the per-element learning rate as in the original. The group statistics are
    computed from per-tensor sums (no concatenated copy of the group's gradients, defect 34), and
    stay finite when the group's gradients are all equal (std = 0 gave inf/NaN, defect 37). The
    decay applies for the whole run; the original stopped decaying at half the warm-up (defect 37).

    ``prepare`` computes k per tensor (``Bucket.extras["awd_k"]``) and turns the engine's own
    decoupled decay off for the bucket; ``math`` adds ``weight_decay * k * theta`` to the update,
    which the write-back then scales by the element's rate. Place it after every transform that
    reshapes the update's direction (Grams, Cautious) and before the rate transforms.
    """

    name = "adaptive_wd"
    has_foreach = False

    def prepare(self, b: Bucket) -> None:
        super().prepare(b)  # the decay goes through the update instead
        # the statistics as a few bucket-wide ops (the |g| sums per tensor on the CPU: l1_norms)
        l1 = torch.stack(l1_norms(b.grads))
        sq = torch.stack(torch._foreach_norm(b.grads, 2)).square()
        sizes = torch.tensor([g.numel() for g in b.grads], dtype=l1.dtype, device=l1.device)
        # a tensor with a non-finite gradient is skipped by the engine; it must not make the
        # statistics (and so every other tensor's step) NaN too
        ok = torch.isfinite(l1) & torch.isfinite(sq)
        l1_ok, sq_ok = torch.where(ok, l1, 0.0), torch.where(ok, sq, 0.0)
        n = torch.where(ok, sizes, 0.0).sum().clamp_min(1.0)
        mean = l1_ok.sum() / n
        std = (sq_ok.sum() / n - mean.square()).clamp_min(0.0).sqrt()
        b.extras["awd_k"] = list((2 * torch.sigmoid(4 * (l1 / sizes - mean) / std.clamp_min(_TINY))).unbind())

    def math(self, x: Slot) -> None:
        u = x.u if x.upd_scale is None else x.u * x.upd_scale
        x.upd_scale = None
        x.u = u + x.p * (x.hp["weight_decay"] * x.extra["awd_k"])

