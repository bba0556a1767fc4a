"""Sign-based masks on the update.

``Cautious`` (Liang et al. 2024, "Cautious Optimizers", arXiv 2411.16085): zero the update where
its sign disagrees with the current gradient, and rescale so the mean step size is kept:

    phi = 1[u * g > 0];   u <- u * phi * numel / (sum(phi) + 1)

``Grams`` (Cao et al. 2024, "Gradient Descent with Adaptive Momentum Scaling", arXiv 2412.17107):
take the update's magnitude and the gradient's sign:  u <- |u| * sign(g).

The two are redundant when combined, in either order: after Grams, sign(u) = sign(g) everywhere,
so a following Cautious is a no-op (the original HinaAdamW applied it there, defect 2); after
Cautious, every kept element already has sign(u) = sign(g), so a following Grams is exactly the
identity. Recipes therefore run Cautious when it is on and Grams only when Cautious is off; with
both switched on (the originals' defaults) the result is Cautious, exactly.

Shapes: any; per-tensor reductions only. State: none.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.chain import Bucket, Slot, Transform


class Cautious(Transform):
    name = "cautious"

    def foreach(self, b: Bucket) -> None:
        u = b.update_view()
        kept, masked = [], []
        for ui, gi in zip(u, b.grads):
            mask = torch.mul(ui, gi).gt_(0)  # 1.0 where u * g > 0, else 0.0
            kept.append(mask.sum())
            masked.append(mask.mul_(ui))  # reuse the mask's buffer for the masked update
        torch._foreach_add_(kept, 1.0)
        # the rescale numel / (kept + 1) is a per-tensor factor of the update: the write-back
        # applies it in its single pass instead of a pass here
        scale = torch._foreach_reciprocal(kept)
        torch._foreach_mul_(scale, [float(x.numel()) for x in u])
        scale = [s.to(b.compute_dtype) for s in scale]
        b.update_scale_t = scale if b.update_scale_t is None else torch._foreach_mul(b.update_scale_t, scale)
        b.set_update(masked)
        b.scratch["cautious_kept"] = kept  # count + 1 per tensor, for log_dict

    def math(self, x: Slot) -> None:
        phi = (x.u * x.g > 0).to(x.u.dtype)
        kept = phi.sum()
        x.u = x.u * phi
        scale = x.u.numel() / (kept + 1)  # applied by the write-back, to the update only
        x.upd_scale = scale if x.upd_scale is None else x.upd_scale * scale
        x.scratch["cautious_kept"] = kept + 1


class Grams(Transform):
    """``blend=None``: the paper's ``|u| * sign(g)``. ``blend="grams_decay"`` (the Automagic
    family, ALGORITHMS.md §2.5): ``a * |u| * sign(g) + (1 - a) * u`` with ``a = hp[blend]**t``, so
    Grams fades out as training matures."""

    name = "grams"

    def __init__(self, blend: Optional[str] = None) -> None:
        self.blend = blend
        self.has_foreach = blend is None

    def foreach(self, b: Bucket) -> None:
        u = b.update()
        torch._foreach_abs_(u)
        torch._foreach_mul_(u, torch._foreach_sign(b.grads))

    def math(self, x: Slot) -> None:
        signed = x.u.abs() * x.g.sign()
        if self.blend is None:
            x.u = signed
        else:
            a = x.hp[self.blend] ** x.t
            x.u = signed * a + x.u * (1 - a)


class Background(Transform):
    """Background regularisation (Automagic_CameAMP_Improved, ALGORITHMS.md §2.17), opt-in
    heuristic: a tensor whose (processed) gradient is nearly constant -- variance below 1e-3
    times its mean square, a scale-free test -- is treated as
    "background" and its update halved. The original compared the raw variance with 1e-6, which a
    normalised gradient practically never reaches (defect 58), with a host sync per tensor."""

    name = "background"
    has_foreach = False

    def math(self, x: Slot) -> None:
        g = x.g.reshape(-1)
        mean_sq = g.square().mean()
        var = mean_sq - g.mean().square()
        flat = var < 1e-3 * mean_sq
        x.u = x.u * torch.where(flat, 0.5, 1.0).to(x.u.dtype)
