"""CAME -- Confidence-guided Adaptive Memory Efficient optimisation (Luo et al. 2023,
arXiv 2307.02047), the factored core of the Automagic_CameAMP family.

Every tensor is seen as a matrix ``G`` of shape ``[rows, cols]``: rows = dim 0 and cols = the
product of the other dims for tensors with two or more dims; ``[1, numel]`` for 1-D tensors.

``FactoredSecondMoment`` (the normalisation, Adafactor's factoring):

    q = G**2 + eps1
    R <- beta2 * R + (1 - beta2) * mean_cols(q)        shape [rows]
    C <- beta2 * C + (1 - beta2) * mean_rows(q)        shape [cols]
    V = (R / mean(R)) (outer) C / (1 - beta2**t)
    n = G / sqrt(V);   n <- n / max(1, rms(n) / clip_threshold)

``CAMEConfidence`` (the confidence, after the momentum ``m`` was updated from ``n``):

    U = (n - m)**2 + eps2, factored the same way with beta3 into R_U, C_U  ->  S
    u = m / sqrt(S);   u <- u / max(1, rms(u) / clip_threshold)

For a 1-D tensor (rows = 1) the factoring is exact: R / mean(R) = 1, so V and S are the
unfactored EMAs -- one code path, no full-size second moment anywhere. State: ``[rows] + [cols]``
floats per statistic instead of the originals' full-size ``v`` and residual (ALGORITHMS.md §2.9,
defect 31: they never factored).

Choices that differ from the paper or the originals, and why:
- rows = dim 0 and cols = the rest (the paper factors the last two dims): conv kernels
  ``[out, in, k, k]`` with k = 1 or 3 would otherwise factor into a near-full row statistic.
- V and S are bias-corrected (the originals' residual was not: first updates ~31x too large,
  defect 33); the ratio R / mean(R) is scale-free, so only C needs the correction.
- ``u`` is RMS-capped like ``n``: when successive normalised gradients agree exactly (a
  deterministic toy problem) ``S`` falls to ``eps2`` and the uncapped update grows by up to 1e8.
- The RMSprop order (statistics updated before normalising) on every step: the original's step 1
  was skipped entirely for ``came=True`` (defect 32).
- ``came=False`` keeps the original's alternative: the raw gradient clipped to +-t**0.25.

Hyperparameters: ``betas = (beta1, beta2, beta3)``, ``eps = (eps1, eps2, ...)``, ``clip_threshold``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.chain import Slot, StateSpec, Transform


def matrix_rows(p: Tensor) -> int:
    """Rows of the matrix view: dim 0 for tensors with two or more dims, 1 otherwise."""
    return int(p.shape[0]) if p.dim() >= 2 else 1


def factored_specs(prefix: str) -> tuple[StateSpec, StateSpec]:
    """Row and column statistics of a factored non-negative EMA (``prefix_row``, ``prefix_col``)."""
    return (StateSpec(f"{prefix}_row", signed=False, shape=lambda p: (matrix_rows(p),)),
            StateSpec(f"{prefix}_col", signed=False, shape=lambda p: (p.numel() // matrix_rows(p),)))


def factored_ema(row: Tensor, col: Tensor, q: Tensor, beta, t) -> Tensor:
    """Update the factored EMA of the non-negative matrix ``q`` ([rows, cols]) in place and return
    its bias-corrected reconstruction (R / mean(R)) outer C / (1 - beta**t)."""
    new_row = row * beta + q.mean(dim=1) * (1 - beta)
    new_col = col * beta + q.mean(dim=0) * (1 - beta)
    row.copy_(new_row)
    col.copy_(new_col)
    return (new_row / new_row.mean()).unsqueeze(1) * new_col.unsqueeze(0) / (1 - beta ** t)


def as_matrix(t: Tensor, row: Optional[Tensor] = None, col: Optional[Tensor] = None) -> Tensor:
    """``t`` as its matrix view ``[dim 0, the rest]`` (``[1, numel]`` for 1-D). Given the factored
    statistics ``row`` / ``col`` that describe it, both sizes come from them rather than
    ``reshape(rows, -1)``: in a kernel compiled for dynamic shapes, ``-1`` becomes
    ``numel // rows`` and every index pays for a division (measured about 2x slower on CPU)."""
    if row is None or col is None:
        return t.reshape(matrix_rows(t), -1)
    return t.reshape(row.shape[0], col.shape[0])


def rms_cap(u: Tensor, threshold) -> Tensor:
    """Adafactor's update clipping: u / max(1, rms(u) / threshold)."""
    rms = u.square().mean().sqrt()
    return u / torch.clamp_min(rms / threshold, 1.0)


class FactoredSecondMoment(Transform):
    """The gradient normalised by CAME's factored second moment (``came=True``), or the raw
    gradient clipped to +-t**0.25 (``came=False``). Replaces ``x.g`` by the normalised gradient."""

    name = "came"
    has_foreach = False

    def __init__(self, came: bool = True) -> None:
        self.came = came

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return factored_specs("came_v") if self.came else ()

    def math(self, x: Slot) -> None:
        if not self.came:
            clip = x.t ** 0.25
            x.g = torch.minimum(torch.maximum(x.g, -clip), clip)
            return
        row, col = x.st["came_v_row"], x.st["came_v_col"]
        g = as_matrix(x.g, row, col)
        v = factored_ema(row, col, g * g + x.hp["eps"][0], x.hp["betas"][1], x.t)
        x.g = rms_cap(g * torch.rsqrt(v), x.hp["clip_threshold"]).reshape(x.g.shape)


class CAMEConfidence(Transform):
    """CAME's confidence: the update is the momentum (``x.u``, set by the momentum transform)
    divided by the factored RMS of its disagreement with the normalised gradient (``x.g``)."""

    name = "came_confidence"
    has_foreach = False

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return factored_specs("came_r")

    def math(self, x: Slot) -> None:
        row, col = x.st["came_r_row"], x.st["came_r_col"]
        m, n = as_matrix(x.u, row, col), as_matrix(x.g, row, col)
        s = factored_ema(row, col, (n - m) ** 2 + x.hp["eps"][1], x.hp["betas"][2], x.t)
        x.u = rms_cap(m * torch.rsqrt(s), x.hp["clip_threshold"]).reshape(x.u.shape)
