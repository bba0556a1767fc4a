"""Orthogonal gradient (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability",
arXiv 2501.04697), paper form: remove the gradient's component along the weight, then restore the
gradient's norm. Per tensor, flattened (any shape):

    g_perp = g - (<w, g> / (<w, w> + eps)) * w;   g <- g_perp * ||g|| / (||g_perp|| + eps)

The original HinaAdamW skipped the norm restoration and 1-D tensors (defect 7). A zero weight
(LoRA B at init) leaves the gradient unchanged. State: none.
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, Transform

_EPS = 1e-30


def compute_params(b: Bucket) -> list[torch.Tensor]:
    """The bucket's parameters in the compute dtype (the tensors themselves when possible)."""
    cached = b.scratch.get("params_compute")
    if cached is None:
        cached = [p.detach() if p.dtype == b.compute_dtype else p.detach().to(b.compute_dtype) for p in b.params]
        b.scratch["params_compute"] = cached
    return cached


class OrthogonalGradient(Transform):
    name = "orthograd"

    def foreach(self, b: Bucket) -> None:
        w, g = compute_params(b), b.grads
        dots = [torch.dot(wi.reshape(-1), gi.reshape(-1)) for wi, gi in zip(w, g)]
        ww = torch._foreach_norm(w)
        torch._foreach_mul_(ww, ww)
        torch._foreach_add_(ww, _EPS)
        coef = torch._foreach_div(dots, ww)
        perp = torch._foreach_sub(g, torch._foreach_mul(w, coef))
        scale = torch._foreach_norm(g)
        den = torch._foreach_norm(perp)
        torch._foreach_add_(den, _EPS)
        torch._foreach_div_(scale, den)
        torch._foreach_mul_(perp, scale)
        b.grads = perp

    def math(self, x: Slot) -> None:
        w, flat = x.p.reshape(-1), x.g.reshape(-1)
        perp = flat - (torch.dot(w, flat) / (torch.dot(w, w) + _EPS)) * w
        perp = perp * (flat.norm() / (perp.norm() + _EPS))
        x.g = perp.view_as(x.g)
