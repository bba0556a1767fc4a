"""Opt-in gradient regularisers of Automagic_CameAMP_Improved, and the extension point for yours.

These are heuristics (ALGORITHMS.md §2.15-2.19, defect 73): they treat a weight matrix's indices
as pixels, but neighbouring rows and columns of a linear layer carry no spatial order. They are
off by default, their sign, threshold and cost errors are fixed, and each switches itself off,
with one message, for tensors where it has no meaning.

``RegularizationStrategy`` is the interface: ``apply(grad, param=..., step=..., role=...)`` receives
each parameter's gradient (fp32, the parameter's shape, never modified in place) and returns the
regularised gradient, before every other technique of the recipe runs; ``applies_to(param, role)``
says on which tensors it runs (default: two or more dims). Pass instances with
``regularizers=[...]`` to the Automagic_CameAMP recipes.

Shapes: a tensor with two or more dims is seen as the matrix ``[dim 0, product of the rest]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.chain import Bucket, Slot, StateSpec, Transform
from .came import as_matrix, matrix_rows


class RegularizationStrategy:
    """Base class of a gradient regulariser (see the module docstring)."""

    name = "custom"

    def applies_to(self, param: Tensor, role: Any) -> bool:
        return param.dim() >= 2

    def apply(self, grad: Tensor, **kwargs: Any) -> Tensor:
        """Return the regularised gradient. Keyword arguments: ``param`` (the parameter, read
        only), ``step`` (its step counter, first step 1), ``role`` (its roles.Role or None)."""
        raise NotImplementedError


def laplacian(m: Tensor) -> Tensor:
    """Second differences along rows and columns of a matrix (interior only; boundaries get the
    other axis' term), as the Improved original defined it, without uninitialised borders."""
    lap = torch.zeros_like(m)
    lap[1:-1, :] += m[:-2, :] + m[2:, :] - 2 * m[1:-1, :]
    lap[:, 1:-1] += m[:, :-2] + m[:, 2:] - 2 * m[:, 1:-1]
    return lap


def _both_dims_over(param: Tensor, n: int) -> bool:
    if param.dim() < 2:
        return False
    rows = matrix_rows(param)
    return rows > n and param.numel() // rows > n


class EdgeSuppression(RegularizationStrategy):
    """g <- g * (1 - penalty * e * 1[e > threshold]), e = |Laplacian(g)| / max |Laplacian(g)|.
    The threshold is relative to the tensor's own largest edge (the original's absolute 0.6 never
    fired on raw gradients, defect 51); no per-step cache (it pinned up to 100 gradients)."""

    name = "edge_suppression"

    def __init__(self, threshold: float = 0.6, penalty: float = 0.1) -> None:
        self.threshold, self.penalty = threshold, penalty

    def applies_to(self, param: Tensor, role: Any) -> bool:
        return _both_dims_over(param, 2)

    def apply(self, grad: Tensor, *, param: Tensor, step: int, role: Any = None, **kwargs: Any) -> Tensor:
        lap = laplacian(as_matrix(grad)).abs()
        e = lap / lap.amax().clamp_min(1e-30)
        factor = 1 - self.penalty * e * (e > self.threshold)
        return grad * factor.reshape(grad.shape)


class FrequencyPenalty(RegularizationStrategy):
    """Remove a fraction of the gradient's high-frequency part (in index space):
    g <- g - penalty * (g - blur3x3(g)). The original subtracted a non-negative map
    |d/dx g| + |d/dy g|, which pushes every element in one direction (defect 50)."""

    name = "frequency_penalty"

    def __init__(self, penalty: float = 0.05) -> None:
        self.penalty = penalty

    def applies_to(self, param: Tensor, role: Any) -> bool:
        return _both_dims_over(param, 2)

    def apply(self, grad: Tensor, *, param: Tensor, step: int, role: Any = None, **kwargs: Any) -> Tensor:
        m = as_matrix(grad)
        blur = F.avg_pool2d(m[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
        return grad - self.penalty * (m - blur).reshape(grad.shape)


class LowRankPenalty(RegularizationStrategy):
    """Pull the weight toward its best rank-``keep`` approximation: every ``interval`` steps,
    g <- g + strength * interval * (theta - theta_keep), the gradient of 1/2 ||theta - theta_keep||**2
    (amortised over the interval). Only for matrices with both dims above ``keep``: the original's
    eigen-tail was exactly 0 for LoRA ranks <= 10 and a plain decay otherwise, computed by an
    ``eigh`` of every matrix on every step (defect 52). Cost: one SVD per matrix per interval."""

    name = "low_rank_penalty"

    def __init__(self, strength: float = 0.01, keep: int = 10, interval: int = 10) -> None:
        self.strength, self.keep, self.interval = strength, keep, max(1, int(interval))

    def applies_to(self, param: Tensor, role: Any) -> bool:
        return _both_dims_over(param, self.keep)

    def apply(self, grad: Tensor, *, param: Tensor, step: int, role: Any = None, **kwargs: Any) -> Tensor:
        if step % self.interval:
            return grad
        w = as_matrix(param.detach()).float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        tail = w - (u[:, :self.keep] * s[:self.keep]) @ vh[:self.keep]
        return grad + (self.strength * self.interval) * tail.reshape(grad.shape).to(grad.dtype)


class Regularize(Transform):
    """Runs the strategies on each tensor's gradient (``prepare``: before the chain's math, in the
    tensors' own shapes). A strategy that does not apply to a tensor is skipped there, and one
    message per strategy says so."""

    name = "regularize"

    def __init__(self, strategies: Sequence[RegularizationStrategy]) -> None:
        self.strategies = list(strategies)

    def prepare(self, b: Bucket) -> None:
        grads = list(b.grads)
        for strat in self.strategies:
            skipped = 0
            for i, (p, r) in enumerate(zip(b.params, b.roles)):
                if not strat.applies_to(p, r):
                    skipped += 1
                    continue
                grads[i] = strat.apply(grads[i], param=p, step=b.steps[i], role=r)
            if skipped and b.opt is not None:
                b.opt.note_once(f"{strat.name}: off for {skipped} tensor(s) where it has no meaning "
                                "(too few dims or too small)")
        b.grads = grads


class SpatialAwareness(Transform):
    """Per-row learning-rate bump scale from the gradient's spread along each row (opt-in
    heuristic, ALGORITHMS.md §2.18): sv <- EMA_0.9(sv, var_row(g)); the lr mask's bump is scaled by
    clamp(0.8 * sv / mean(sv), 0.5, 1.5). Relative to the tensor's mean, so the gradient's scale
    does not matter. State ``spatial_var``: one float per row (the original: two full-size
    tensors, one never used, defect 57)."""

    name = "spatial_awareness"
    has_foreach = False

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return (StateSpec("spatial_var", signed=False, quantizable=False, init="ones",
                          shape=lambda p: (matrix_rows(p),)),)

    def math(self, x: Slot) -> None:
        sv = x.st["spatial_var"]
        g = as_matrix(x.g)
        new = sv * 0.9 + g.var(dim=1, unbiased=False) * 0.1
        sv.copy_(new)
        scale = torch.clamp(0.8 * new / new.mean().clamp_min(1e-30), 0.5, 1.5)
        x.scratch["bump_scale"] = scale.unsqueeze(1).expand_as(g).reshape(x.g.shape)
