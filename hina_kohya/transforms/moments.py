"""First and second moments.

``ScaleByAdam``: Adam's bias-corrected update (Kingma & Ba 2015, arXiv 1412.6980), the base of
HinaAdamW / AdaptiveHinaAdamW. For every tensor (any shape; state shapes equal the param's):

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g**2
    u  = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

With decoupled weight decay in the engine's write-back this is AdamW (Loshchilov & Hutter 2019,
arXiv 1711.05101), matching ``torch.optim.AdamW`` (tested to 1e-10 in float64).

``ScaleByADOPT``: ADOPT (Taniguchi et al. 2024, arXiv 2411.02853), paper form. The gradient is
normalised by the *previous* second moment before it enters the momentum, and clipped:

    first gradient:  v = g**2, no update
    after it:        n = clip(g / max(sqrt(v), eps), t**0.25);  m <- beta1 * m + (1 - beta1) * n;  u = m
                     v <- beta2 * v + (1 - beta2) * g**2

No bias correction. "The first gradient" is per element: the paper starts v at step 1, which for
a LoRA is wrong -- the A factor's gradient is exactly zero while its zero-initialised partner B is
zero, so a step-1 start leaves v = 0 there and every later normalised gradient of A sits at the
clip, a sign step growing as t**0.25 (the lr-dependent collapse measured in docs/BENCHMARKS.md).
An element whose v is still 0 is initialised by its first non-zero gradient instead; at step 1
every element is, which is the paper's rule. (An 8-bit v that rounds to 0 against its block's
maximum restarts the same way: that element skips a step instead of taking a clipped sign step.)
(The original HinaAdamW's "ADOPT" normalised after the momentum with a delayed denominator;
AdaptiveHinaAdamW's was a one-step AMSGrad -- ALGORITHMS.md §2.4, defects 4 and 27.)

Both read the momentum input from ``bucket.m_input`` when a transform before them (TAM) set it,
else from the gradient; the second moment always sees the raw gradient.
"""

from __future__ import annotations

import math

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform

#: first and second moment, the state of both moment transforms (signed m, non-negative v)
MOMENTS = (StateSpec("exp_avg", signed=True), StateSpec("exp_avg_sq", signed=False))


class ScaleByAdam(Transform):
    name = "adam"

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return MOMENTS

    def foreach(self, b: Bucket) -> None:
        beta1, beta2 = b.hp["betas"]
        m, v, g = b.state["exp_avg"], b.state["exp_avg_sq"], b.grads
        torch._foreach_lerp_(m, b.m_input if b.m_input is not None else g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in b.steps])
        torch._foreach_add_(denom, b.hp["eps"])
        # Kept lazy (u = m / denom / bc1): a plain AdamW step is then one fused addcdiv.
        b.set_update_ratio(m, denom, [1 / (1 - beta1 ** t) for t in b.steps])

    def math(self, x: Slot) -> None:
        beta1, beta2 = x.hp["betas"]
        m, v, g = x.st["exp_avg"], x.st["exp_avg_sq"], x.g
        m.mul_(beta1).add_(x.momentum_input * (1 - beta1))
        v.mul_(beta2).add_(g * g * (1 - beta2))
        m_hat = m / (1 - beta1 ** x.t)
        v_hat = v / (1 - beta2 ** x.t)
        x.u = m_hat / (v_hat.sqrt() + x.hp["eps"])


class ScaleByADOPT(Transform):
    name = "adopt"

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return MOMENTS

    def foreach(self, b: Bucket) -> None:
        beta1, beta2 = b.hp["betas"]
        m, v, g = b.state["exp_avg"], b.state["exp_avg_sq"], b.grads
        fresh = [vi == 0 for vi in v]  # no gradient seen yet: v starts here, no update
        denom = torch._foreach_sqrt(v)
        torch._foreach_clamp_min_(denom, b.hp["eps"])
        n = torch._foreach_div(b.m_input if b.m_input is not None else g, denom)
        for ni, fi, t in zip(n, fresh, b.steps):
            ni.clamp_(-t ** 0.25, t ** 0.25).masked_fill_(fi, 0.0)
        torch._foreach_lerp_(m, n, 1 - beta1)  # where fresh n is 0: m (0 until then) only decays
        g2 = torch._foreach_mul(g, g)
        torch._foreach_mul_(v, beta2)
        torch._foreach_add_(v, g2, alpha=1 - beta2)
        for vi, fi, g2i in zip(v, fresh, g2):
            torch.where(fi, g2i, vi, out=vi)
        b.set_update(m, owned=False)  # the momentum itself, lent: copied only if modified

    def math(self, x: Slot) -> None:
        beta1, beta2 = x.hp["betas"]
        m, v, g, t = x.st["exp_avg"], x.st["exp_avg_sq"], x.g, x.t
        fresh = v == 0  # no gradient seen yet (every element at step 1): v starts here, no update
        clip = t ** 0.25
        n = torch.minimum(torch.maximum(x.momentum_input / v.sqrt().clamp_min(x.hp["eps"]), -clip), clip)
        m.copy_(m * beta1 + torch.where(fresh, 0.0, n) * (1 - beta1))
        v.copy_(torch.where(fresh, g * g, v * beta2 + g * g * (1 - beta2)))
        x.u = m


class ConsistencyMomentum(Transform):
    """The Automagic_CameAMP family's momentum (ALGORITHMS.md §2.23): an EMA whose coefficient
    decays with the step, ``beta1_t = max(beta1 * beta1_decay**t, 0.4)``, so the momentum
    shortens as training matures:

        m <- beta1_t * m + (1 - beta1_t) * input;   update = m

    The input is the normalised gradient (or TAM's damped one). One rule for the whole run: the
    originals summed without (1 - beta) before half the warm-up and switched to this EMA after,
    a ~5x jump in the update's size (defect 35). State: ``exp_avg``."""

    name = "consistency_momentum"
    has_foreach = False

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (MOMENTS[0],)

    def math(self, x: Slot) -> None:
        beta = torch.clamp_min(x.hp["betas"][0] * x.hp["beta1_decay"] ** x.t, 0.4)
        m = x.st["exp_avg"]
        m.copy_(m * beta + x.momentum_input * (1 - beta))
        x.u = m


class DualMomentum(Transform):
    """Dual momentum (Automagic_CameAMP_Improved, ALGORITHMS.md §2.24), repaired: a long-term EMA
    of the same input as the short momentum, bias-corrected, mixed into the update:

        L <- long_term_beta * L + (1 - long_term_beta) * input
        update = (1 - alpha) * m + alpha * L / (1 - long_term_beta**t),  alpha = alpha_mix_ratio

    ``alpha_mix_ratio=None`` means 0.5. The original summed without (1 - beta), mixed with
    alpha = 20, and overwrote the short momentum with the mix (defect 49); here both momenta keep
    their own meaning. Runs after the short momentum. State: ``exp_avg_long``."""

    name = "dual_momentum"
    has_foreach = False

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (StateSpec("exp_avg_long", signed=True),)

    def math(self, x: Slot) -> None:
        beta = x.hp["long_term_beta"]
        alpha = x.hp.get("alpha_mix_ratio", 0.5)
        long = x.st["exp_avg_long"]
        long.copy_(long * beta + x.momentum_input * (1 - beta))
        x.u = x.u * (1 - alpha) + long * (alpha / (1 - beta ** x.t))
