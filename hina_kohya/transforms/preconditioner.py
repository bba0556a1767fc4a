"""Riemannian preconditioner for factor pairs (Zhang & Pilanci, "Riemannian Preconditioned LoRA for
Fine-Tuning Foundation Models", ICML 2024, arXiv 2402.02347). Opt-in (HinaAdamW ``use_riemannian``).

For a product W = L @ R of a pair that ``roles.py`` finds (L: [m, r], R: [r, n] as matrices --
LoRA's ``lora_up @ lora_down``, LoKr's ``lokr_w2_a @ lokr_w2_b``; conv factors flattened past
dim 0), each factor's gradient is preconditioned by its partner's r x r Gram matrix:

    G_R <- P(L^T L) G_R,      G_L <- G_L P(R R^T),
    P(M) = mu (M + delta mu I)^-1,   mu = trace(M) / r,   delta = ``riemannian_reg``

The paper's preconditioner is (M + delta I)^-1: the step of W then follows the metric of the
rank-r manifold instead of depending on how the two factors happen to be scaled against each
other. Two changes, both because an Adam-style second moment follows the preconditioned gradient:
the damping is relative to the partner's mean eigenvalue ``mu`` (an absolute delta either vanishes
or dominates as the factors grow), and P is multiplied by ``mu`` so that its overall size stays
near 1 -- a zero-initialised partner grows by orders of magnitude, and a second moment averaged
over ~1000 steps would otherwise remember the early, far larger gradients and stall the factor.
Per-element normalisation divides such a per-tensor scale out anyway; what remains is the r x r
mixing, which is the technique. A partner that is exactly zero (LoRA's B at step 1) leaves the
gradient as it is.

Runs in ``prepare`` on the raw gradients (before the other gradient transforms), with the
partners' current values; pairs whose factors are not matrices that chain (Tucker cores, shapes
that do not share a rank) are left alone. No host sync: ``inv_ex`` does not check for singular
matrices (the damped Gram matrix is positive definite). State: none.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.chain import Bucket, Transform


def chain_order(a: torch.Tensor, b: torch.Tensor) -> Optional[tuple[int, int]]:
    """(0, 1) when ``a @ b`` is the product (a: [m, r], b: [r, n] as matrices), (1, 0) when
    ``b @ a`` is; the smaller shared size wins when both chain; None when neither does."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    options = []
    if a2.shape[1] == b2.shape[0]:
        options.append((a2.shape[1], (0, 1)))
    if b2.shape[1] == a2.shape[0]:
        options.append((b2.shape[1], (1, 0)))
    return min(options)[1] if options else None


def damped_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """``mu (gram + reg mu I)^-1`` with ``mu`` the mean eigenvalue; the identity for a zero ``gram``."""
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    mu = torch.diagonal(gram).sum() / r
    inv = torch.linalg.inv_ex(gram + (reg * mu + torch.finfo(gram.dtype).tiny) * eye).inverse
    return torch.where(mu > 0, inv * mu, eye)


class RiemannianPreconditioner(Transform):
    name = "riemannian"

    def prepare(self, b: Bucket) -> None:
        opt = b.opt
        partners = opt.structure.partner_of()
        params = opt._flat_params
        reg = float(b.hp["riemannian_reg"])
        grads = list(b.grads)
        for i, idx in enumerate(b.indices):
            other = partners.get(idx)
            if other is None:
                continue
            order = chain_order(params[idx], params[other])
            if order is None:
                continue
            g = grads[i]
            partner = params[other].detach().to(g.dtype)
            p2 = partner.reshape(partner.shape[0], -1)
            g2 = g.reshape(g.shape[0], -1)
            if order == (0, 1):  # this factor is L (left of the product): G_L (R R^T)
                grads[i] = (g2 @ damped_inverse(p2 @ p2.T, reg)).reshape(g.shape)
            else:  # this factor is R: (L^T L) G_R
                grads[i] = (damped_inverse(p2.T @ p2, reg) @ g2).reshape(g.shape)
        b.grads = grads
