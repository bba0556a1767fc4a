"""First and second moments.

``ScaleByAdam``: Adam's bias-corrected update (Kingma & Ba 2015, arXiv 1412.6980), the base of
HinaAdamW / AdaptiveHinaAdamW. For every tensor (any shape; state shapes equal the param's):

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g**2
    u  = (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

With decoupled weight decay in the engine's write-back this is AdamW (Loshchilov & Hutter 2019,
arXiv 1711.05101), matching ``torch.optim.AdamW`` (tested to 1e-10 in float64).
"""

from __future__ import annotations

import math

import torch

from ..core.chain import Bucket, StateSpec, Transform


class ScaleByAdam(Transform):
    name = "adam"

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (StateSpec("exp_avg", signed=True), StateSpec("exp_avg_sq", signed=False))

    def foreach(self, b: Bucket) -> None:
        beta1, beta2 = b.hp["betas"]
        m, v, g = b.state["exp_avg"], b.state["exp_avg_sq"], b.grads
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in b.steps])
        torch._foreach_add_(denom, b.hp["eps"])
        # Kept lazy (u = m / denom / bc1): a plain AdamW step is then one fused addcdiv.
        b.set_update_ratio(m, denom, [1 / (1 - beta1 ** t) for t in b.steps])

    def single(self, b: Bucket, i: int) -> None:
        beta1, beta2 = b.hp["betas"]
        t, g = b.steps[i], b.grads[i]
        m, v = b.state["exp_avg"][i], b.state["exp_avg_sq"][i]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        b.set_update_one(i, m_hat / (v_hat.sqrt() + b.hp["eps"]))
