"""Sign-based masks on the update.

``Cautious`` (Liang et al. 2024, "Cautious Optimizers", arXiv 2411.16085): zero the update where
its sign disagrees with the current gradient, and rescale so the mean step size is kept:

    phi = 1[u * g > 0];   u <- u * phi * numel / (sum(phi) + 1)

``Grams`` (Cao et al. 2024, "Gradient Descent with Adaptive Momentum Scaling", arXiv 2412.17107):
take the update's magnitude and the gradient's sign:  u <- |u| * sign(g).

Order matters: after Grams, sign(u) = sign(g) everywhere, so Cautious would be a no-op (the
original HinaAdamW applied it there, defect 2). Recipes apply Cautious first: elements where
the momentum direction disagrees with the gradient are dropped, the rest take the gradient's sign.

Shapes: any; per-tensor reductions only. State: none.
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Transform


class Cautious(Transform):
    name = "cautious"

    def foreach(self, b: Bucket) -> None:
        u = b.update()
        mask = torch._foreach_mul(u, b.grads)
        mask = torch._foreach_sign(mask)
        torch._foreach_clamp_min_(mask, 0.0)  # 1 where u*g > 0, else 0
        kept = torch._foreach_norm(mask, 1)  # counts, as 0-d tensors
        torch._foreach_add_(kept, 1.0)
        scale = torch._foreach_reciprocal(kept)
        torch._foreach_mul_(scale, [float(x.numel()) for x in u])
        torch._foreach_mul_(u, mask)
        torch._foreach_mul_(u, scale)
        b.scratch["cautious_kept"] = kept  # count + 1 per tensor, for log_dict

    def single(self, b: Bucket, i: int) -> None:
        u = b.update_one(i)
        phi = (u * b.grads[i] > 0).to(u.dtype)
        b.set_update_one(i, u * phi * (u.numel() / (phi.sum() + 1)))


class Grams(Transform):
    name = "grams"

    def foreach(self, b: Bucket) -> None:
        u = b.update()
        torch._foreach_abs_(u)
        torch._foreach_mul_(u, torch._foreach_sign(b.grads))

    def single(self, b: Bucket, i: int) -> None:
        b.set_update_one(i, b.update_one(i).abs() * b.grads[i].sign())
