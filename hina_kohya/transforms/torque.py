"""TAM -- Torque-Aware Momentum (Malviya et al. 2024, arXiv 2412.18790), paper form.

Per tensor, the cosine between the previous momentum and the new gradient measures how much the
gradient turns; the gradient entering the momentum is damped by it:

    s = cos(m_{t-1}, g)   (1 when m_{t-1} = 0: nothing to disagree with)
    s_hat <- EMA_{tam_beta}(s_hat, s), bias-corrected by 1 - tam_beta**t
    d = (1 + s_hat) / 2  in [0, 1];   momentum input = d * g

The second moment keeps the raw gradient. Differences from the originals (ALGORITHMS.md §2.7,
defect 5): the cosine uses m_{t-1} (not a momentum that already contains g), the damping acts on
the momentum input (not on the final update), and the EMA is bias-corrected, so a slow
``tam_beta`` = 0.999 no longer halves the learning rate for the first ~1000 steps.
State: ``tam_s`` (a 0-d tensor per parameter).
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform

_TINY = 1e-30


class TorqueAwareMomentum(Transform):
    name = "tam"

    def __init__(self, momentum_key: str = "exp_avg") -> None:
        self.momentum_key = momentum_key

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (StateSpec("tam_s", quantizable=False, shape=lambda p: ()),)

    def foreach(self, b: Bucket) -> None:
        beta = b.hp["tam_beta"]
        m, g, s_hat = b.state[self.momentum_key], b.grads, b.state["tam_s"]
        dots = [torch.dot(mi.reshape(-1), gi.reshape(-1)) for mi, gi in zip(m, g)]
        mn, gn = torch._foreach_norm(m), torch._foreach_norm(g)
        den = torch._foreach_mul(mn, gn)
        torch._foreach_clamp_min_(den, _TINY)
        cos = torch._foreach_div(dots, den)
        # on the stacked 0-d values: a few ops per bucket rather than three per tensor (GPU launches)
        cos = list(torch.where(torch.stack(mn) > 0, torch.stack(cos), 1.0).unbind())
        torch._foreach_lerp_(s_hat, cos, 1 - beta)
        damp = torch._foreach_div(s_hat, [1 - beta ** t for t in b.steps])
        torch._foreach_add_(damp, 1.0)
        torch._foreach_mul_(damp, 0.5)
        b.m_input = torch._foreach_mul(b.m_input if b.m_input is not None else g, damp)

    def math(self, x: Slot) -> None:
        beta = x.hp["tam_beta"]
        m, g, s_hat = x.st[self.momentum_key], x.g, x.st["tam_s"]
        mn = m.norm()
        cos = torch.dot(m.reshape(-1), g.reshape(-1)) / (mn * g.norm()).clamp_min(_TINY)
        cos = torch.where(mn > 0, cos, torch.ones_like(cos))
        # copy_(expression), not mul_().add_(): torch.compile (2.13) loses chained in-place updates
        # of float64 0-d inputs; this form is correct in every dtype and on every path
        new_s = s_hat * beta + cos * (1 - beta)
        s_hat.copy_(new_s)
        damp = (1 + new_s / (1 - beta ** x.t)) / 2
        x.m_in = x.momentum_input * damp
