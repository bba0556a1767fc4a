"""AGR -- Adaptive Gradient Regularisation (Jiang et al. 2024, arXiv 2407.16944), paper form.

Per tensor, the normalised gradient magnitude is the coefficient that shrinks each element:

    alpha = |g| / sum(|g|);   g <- g * (1 - alpha)

The original HinaAdamW multiplied by (1 + |sum g| / ||g||) -- amplifying instead of attenuating --
and AdaptiveHinaAdamW clipped the norm to 1 (defects 3 and 27); the Automagic originals summed over
the whole param group, which made alpha ~ 1/N and the technique a no-op (defect 34). Here the sum
is per tensor. A new gradient list is produced; ``p.grad`` is never modified.
Shapes: any. State: none.
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, Transform

_TINY = 1e-30


class AGR(Transform):
    name = "agr"

    def foreach(self, b: Bucket) -> None:
        g = b.grads
        total = torch._foreach_norm(g, 1)  # sum |g| per tensor
        torch._foreach_clamp_min_(total, _TINY)
        alpha = torch._foreach_abs(g)
        torch._foreach_div_(alpha, total)
        b.grads = torch._foreach_addcmul(g, g, alpha, value=-1.0)  # g - g * alpha

    def math(self, x: Slot) -> None:
        alpha = x.g.abs() / x.g.abs().sum().clamp_min(_TINY)
        x.g = x.g * (1 - alpha)
