"""The phase schedule of the Automagic_CameAMP family (ALGORITHMS.md §2.20) and a gate that runs
a transform only inside a phase.

With W = ``warmup_steps`` and t the parameter's step (first step 1):

    early warm-up  t <  W/2     TAM, orthogonal gradient, Grams (Improved: + edge suppression)
    late warm-up   W/2 <= t < W lr masks still adapt; Improved: Cautious (+ background), SPD
    stable         W <= t < 2W  masks frozen (they follow the scheduler)
    mature         t >= 2W

``phase_index(t, W)`` is 0..3 in that order (reported by ``log_dict()``). ``Phase(transform,
start=..., end=...)`` gates a transform to ``start <= t < end``, with ``start`` / ``end`` one of
``"half_warmup"`` (W/2) and ``"warmup"`` (W).

The engine knows each tensor's step as a Python int, so the gate is decided on the host
(``static_key``): outside its phase the transform does not run at all (its own statistics, e.g.
TAM's cosine EMA, stay as they were), inside it runs ungated, and compiled kernels are specialised
per phase -- after the warm-up, the step pays nothing for the warm-up-only techniques. Where the
step is not known on the host, the gate selects with ``torch.where`` on the step tensor (no
sync): everything the transform changes in the Slot (gradient, momentum input, update, scales,
mask, the post-update value) is kept only inside the phase.
"""

from __future__ import annotations

import math

from typing import Optional

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform

PHASES = ("early_warmup", "late_warmup", "stable", "mature")
_BOUNDS = {"half_warmup": 0.5, "warmup": 1.0}


def phase_index(t: int, warmup_steps: int) -> int:
    """0 early warm-up, 1 late warm-up, 2 stable, 3 mature (see the module docstring)."""
    w = float(warmup_steps)
    return 0 if t < w / 2 else 1 if t < w else 2 if t < 2 * w else 3


class Phase(Transform):
    has_foreach = False

    def __init__(self, inner: Transform, start: Optional[str] = None, end: Optional[str] = None) -> None:
        for bound in (start, end):
            if bound is not None and bound not in _BOUNDS:
                raise ValueError(f"phase bound {bound!r}: use one of {sorted(_BOUNDS)} or None")
        self.inner, self.start, self.end = inner, start, end
        self.name = inner.name
        self.post_update = inner.post_update

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return self.inner.state_specs(hp)

    def prepare(self, b: Bucket) -> None:
        self.inner.prepare(b)

    def _within(self, t, w):
        """``start <= t < end`` for a Python step (a bool: the host decision) or a step tensor (a
        bool tensor: the in-kernel gate, no sync) -- one rule for both."""
        on = t == t  # True, as a bool or a bool tensor
        if self.start is not None:
            on = on & (t >= w * _BOUNDS[self.start])
        if self.end is not None:
            on = on & (t < w * _BOUNDS[self.end])
        return on

    def first_step(self, warmup_steps: float) -> int:
        """The first step (counted from 1, as ``Bucket.steps``) at which this phase is on."""
        return 1 if self.start is None else max(1, math.ceil(float(warmup_steps) * _BOUNDS[self.start]))

    def static_key(self, step: int, hp: dict) -> bool:
        return bool(self._within(step, float(hp["warmup_steps"])))

    def _active(self, x: Slot):
        return self._within(x.t, x.hp["warmup_steps"])

    def math(self, x: Slot) -> None:
        if x.static is not None:
            if x.static:
                self.inner.math(x)
            return
        on = self._active(x)
        before = {"g": x.g, "m_in": x.momentum_input, "u": x.u, "upd_scale": x.upd_scale, "mask": x.mask,
                  "mask_scale": x.mask_scale}
        self.inner.math(x)
        after = {"g": x.g, "m_in": x.m_in, "u": x.u, "upd_scale": x.upd_scale, "mask": x.mask,
                 "mask_scale": x.mask_scale}
        for key, new in after.items():
            old = before[key]
            if new is old or new is None:
                continue
            if old is None:  # a factor that did not exist yet: 1 outside the phase
                old = torch.ones_like(new)
            setattr(x, key, torch.where(on, new, old))

    def after_math(self, x: Slot, new: torch.Tensor) -> torch.Tensor:
        if x.static is not None:
            return self.inner.after_math(x, new) if x.static else new
        return torch.where(self._active(x), self.inner.after_math(x, new), new)
