"""The Transform protocol and the Bucket a transform works on.

A recipe (``hina_kohya.optim``) is a short chain of Transforms, in the spirit of optax's
``chain(scale_by_adam(), add_decayed_weights(), ...)``. Each step, the engine groups the
parameters of one param group that have a gradient into Buckets (one per device and dtype) and
runs the chain over each Bucket. A Transform reads the gradients and its own state and produces,
or rescales, the *update*; only the engine (``core/optimizer.py``) writes parameters.

Every Transform has two paths that must agree (tests check it):

* ``foreach(bucket)``: list-wise ``torch._foreach_*`` ops over the whole Bucket (the eager fast path);
* ``math(slot)``: the readable single-tensor version (the ground truth). It uses tensor ops only --
  the step counter and the hyperparameters arrive as 0-d tensors, branches are ``torch.where`` --
  so the same function is also compiled into one fused kernel per tensor (``core/fused.py``).

Transforms whose work is per tensor but not per element -- learning-rate scales from roles or
statistics, weight-decay schedules -- implement ``prepare(bucket)`` instead; every path runs all
``prepare`` hooks first, on the raw gradients.

Shapes: ``bucket.params[i]``, ``bucket.grads[i]``, ``bucket.state[key][i]`` and the update of
tensor ``i`` all have the shape of parameter ``i``, unless a StateSpec says otherwise (factored
states, later). All tensors a transform sees are in the compute dtype (fp32, or fp64 for fp64
params); how state is stored (fp32 / bf16 / 8-bit) is hidden by ``core/quant.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class StateSpec:
    """One per-parameter state tensor a Transform owns.

    key:         name in ``optimizer.state[p]`` (stable: it is saved in checkpoints).
    signed:      values can be negative (chooses the signed or unsigned 8-bit map).
    quantizable: may be stored in bf16 / 8-bit when ``state_precision`` asks for it. States whose
                 precision matters more than their size (anchors, small statistics) say False.
    init:        ``"zeros"``, ``"ones"``, ``"param"`` (a copy of the parameter's current value) or a
                 float (a constant fill).
    shape:       None for the parameter's shape, else a function ``param -> shape``; the
                 function returns None where the state does not apply (e.g. 1-D params).
    applies:     None for every parameter, else ``role -> bool`` (e.g. an anchor only for full
                 weights). Where it does not apply, the state view is None.
    fixed_format: "fp32", "fp16" or "uint8" (small integers such as packed bits; transforms see
                 them as floats) to store this state so whatever ``state_precision`` says
                 (fp16 for the lr mask: 2 bytes, 0.05 % relative resolution).
    """

    key: str
    signed: bool = True
    quantizable: bool = True
    init: Any = "zeros"
    shape: Optional[Callable[[Tensor], Sequence[int]]] = None
    applies: Optional[Callable[[Any], bool]] = None
    fixed_format: Optional[str] = None

    def applies_to(self, role: Any) -> bool:
        return self.applies is None or bool(self.applies(role))

    def shape_of(self, p: Tensor) -> Optional[Sequence[int]]:
        return tuple(p.shape) if self.shape is None else self.shape(p)


class Bucket:
    """The tensors of one param group on one device and dtype, for one step.

    Attributes read by transforms:
      hp:       the param group dict (``lr``, ``betas``, ``weight_decay``, ...), read each step.
      params:   the parameters (never written by transforms).
      grads:    gradients in the compute dtype. Never modify them in place: for fp32 params they
                are the ``.grad`` tensors themselves. A transform that transforms the gradient
                replaces the list (``bucket.grads = new_list``).
      state:    ``{key: [tensor per param]}`` compute-dtype views of each declared state.
      steps:    per-parameter step counters *after* the increment (first step is 1), Python ints.
      roles:    per-parameter ``roles.Role`` or None when names are unknown.
      indices:  flat positions of the params in the optimizer (stable ids for pairing and seeds).
      opt:      the optimizer (read-only: its ``structure`` and ``param_groups``).
      m_input:  optional replacement of ``grads`` as the input of the first moment (TAM damps
                the gradient entering the momentum while the second moment keeps the raw one).
      scratch:  per-step values a transform passes to its own ``after_update``.

    Written by transforms, consumed by the engine's write-back:
      update (via ``set_update`` / ``set_update_ratio`` / ``update()``),
      lr_scale:   per-tensor Python floats multiplying the learning rate (default 1.0),
      lr_scale_t: optional per-tensor 0-d tensors (data-dependent rates, no host sync),
      update_scale_t: optional per-tensor 0-d tensors scaling the update only, not the decay
                  (e.g. Cautious' rescale of the kept elements),
      lr_mask:    optional per-element multipliers (same shapes as params); they scale the update
                  only, times ``lr_mask_scale`` (a Python float, e.g. the mask's storage unit),
      decay_scale: optional per-tensor multipliers of the decoupled weight decay,
      extras:     ``{key: [0-d tensor per param]}``: data-dependent per-tensor values a
                  ``prepare`` hook computes for the per-tensor math (``Slot.extra``); they reach
                  the fused kernels as inputs (e.g. group statistics).
    """

    def __init__(
        self,
        hp: dict,
        params: list[Tensor],
        grads: list[Tensor],
        state: dict[str, list[Tensor]],
        steps: list[int],
        roles: list[Any],
        indices: list[int],
        compute_dtype: torch.dtype,
        opt: Any = None,
    ) -> None:
        self.hp = hp
        self.params = params
        self.grads = grads
        self.state = state
        self.steps = steps
        self.roles = roles
        self.indices = indices
        self.compute_dtype = compute_dtype
        self.opt = opt
        self.m_input: Optional[list[Tensor]] = None
        self.scratch: dict[str, Any] = {}
        n = len(params)
        self.lr_scale: list[float] = [1.0] * n
        self.lr_scale_t: Optional[list[Tensor]] = None
        self.update_scale_t: Optional[list[Tensor]] = None
        self.lr_mask: Optional[list[Tensor]] = None
        self.lr_mask_scale: float = 1.0
        self.decay_scale: Optional[list[float]] = None
        self.extras: dict[str, list[Tensor]] = {}
        self._update: Optional[list[Optional[Tensor]]] = None
        # Lazy form u_i = ratio_scale_i * num_i / den_i, kept so that a plain Adam step can be
        # written back with one fused addcdiv, as torch.optim.AdamW does.
        self._ratio: Optional[tuple[list[Tensor], list[Tensor], list[float]]] = None
        self._borrowed = False

    def __len__(self) -> int:
        return len(self.params)

    def subset(self, idx: list[int]) -> "Bucket":
        """The tensors ``idx`` of this bucket as a bucket of their own, after ``prepare`` and
        before any update: every per-tensor list (the ``prepare`` hooks' outputs included) is
        sliced, the tensors in them are shared. The list-wise path runs its ``foreach`` transforms
        on such slices to bound a step's temporaries (transforms work per tensor once
        ``prepare`` has run on the whole bucket)."""
        if self._update is not None or self._ratio is not None or self.m_input is not None:
            raise RuntimeError("Bucket.subset: take slices before any transform's foreach has run")

        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        sub = Bucket(self.hp, pick(self.params), pick(self.grads), {k: pick(v) for k, v in self.state.items()},
                     pick(self.steps), pick(self.roles), pick(self.indices), self.compute_dtype, self.opt)
        sub.lr_scale, sub.lr_scale_t, sub.update_scale_t = (pick(self.lr_scale), pick(self.lr_scale_t),
                                                            pick(self.update_scale_t))
        sub.lr_mask, sub.decay_scale, sub.lr_mask_scale = pick(self.lr_mask), pick(self.decay_scale), self.lr_mask_scale
        sub.extras = {k: pick(v) for k, v in self.extras.items()}
        sub.scratch = {k: pick(v) if isinstance(v, list) and len(v) == len(self) else v for k, v in self.scratch.items()}
        return sub

    def role_flags(self, predicate: Callable[[Any], bool]) -> list[Tensor]:
        """Per tensor a 0-d 1 where ``predicate(role)`` holds, else 0: a role-based decision the
        per-tensor math (and so the fused kernels, which see no roles) gets through ``extras``."""
        one = torch.ones((), dtype=self.compute_dtype, device=self.params[0].device)
        zero = torch.zeros_like(one)
        return [one if predicate(r) else zero for r in self.roles]

    # -- the update -----------------------------------------------------------------------
    def set_update(self, tensors: list[Tensor], owned: bool = True) -> None:
        """Set the update. ``owned=False`` lends tensors that must not be modified (e.g. a state
        tensor): ``update()`` then copies them before anyone writes, ``update_view()`` does not."""
        self._update = list(tensors)
        self._ratio = None
        self._borrowed = not owned

    def set_update_ratio(self, num: list[Tensor], den: list[Tensor], scale: list[float]) -> None:
        """Set the update lazily to ``scale_i * num_i / den_i``; ``num``/``den`` are not owned."""
        self._ratio = (num, den, scale)
        self._update = None

    @property
    def has_ratio(self) -> bool:
        return self._ratio is not None

    @property
    def ratio(self) -> tuple[list[Tensor], list[Tensor], list[float]]:
        assert self._ratio is not None
        return self._ratio

    def update(self) -> list[Tensor]:
        """The update as owned tensors, materialising a lazy ratio if needed."""
        if self._ratio is not None:
            num, den, scale = self._ratio
            upd = torch._foreach_div(num, den)
            if any(s != 1.0 for s in scale):
                torch._foreach_mul_(upd, scale)
            self._update = list(upd)
            self._ratio = None
        if self._update is None or any(u is None for u in self._update):
            raise RuntimeError("the recipe's chain produced no update; its first transform must set one")
        if self._borrowed:
            self._update = copies(self._update)  # type: ignore[arg-type]
            self._borrowed = False
        return self._update  # type: ignore[return-value]

    def update_view(self) -> list[Tensor]:
        """The update for reading only (no copy of lent tensors)."""
        if self._borrowed and self._update is not None:
            return self._update  # type: ignore[return-value]
        return self.update()


class Slot:
    """One tensor for the per-tensor math (the single-tensor path and the fused kernel).

    p:        the parameter in the compute dtype (read-only for transforms); shape of the param.
    g:        the gradient (a transform may replace it; never modify it in place).
    m_in:     the momentum input when a transform set one (TAM), else None.
    u:        the update, once a transform produced it.
    st:       ``{key: state tensor or None}`` -- modify in place (``mul_``, ``copy_``).
    t:        the step counter after the increment, a 0-d tensor.
    hp:       ``{name: value}``: numbers as 0-d tensors of the compute dtype, other values as is.
    role:     the parameter's roles.Role or None.
    rate:     per-tensor rate factor (0-d): lr_scale * lr_scale_t, set by ``prepare`` hooks.
    decay:    per-tensor weight-decay multiplier (0-d).
    upd_scale: per-tensor factor of the update only (0-d).
    mask, mask_scale: per-element rates (or None) and their unit factor (0-d).
    scratch:  values a transform keeps for its own ``after_math`` or for log_dict().
    extra:    ``{key: 0-d tensor}`` from ``Bucket.extras`` (values computed by ``prepare`` hooks).
    static:   while a transform runs, its ``static_key`` for this tensor's step (a Python value
              the engine knows without reading a tensor), or None when the path does not know it.
    """

    def __init__(self, p, g, st, t, hp, role, rate, decay, mask_scale):
        self.p, self.g, self.st, self.t, self.hp, self.role = p, g, st, t, hp, role
        self.m_in = None
        self.u = None
        self.rate, self.decay, self.mask_scale = rate, decay, mask_scale
        self.upd_scale = None
        self.mask = None
        self.scratch: dict[str, Any] = {}
        self.extra: dict[str, Tensor] = {}
        self.static: Any = None

    @property
    def momentum_input(self):
        return self.g if self.m_in is None else self.m_in


class Transform:
    """Base class of one technique. Subclasses declare ``state_specs`` and implement the paths."""

    #: short name used in logs and diagnostics
    name: str = "transform"

    #: False for transforms that only implement ``math`` (the per-tensor path). A chain with one
    #: of them runs the fused kernels, or, unfused, the per-tensor math eagerly; never list-wise.
    has_foreach: bool = True

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        return ()

    def prepare(self, b: Bucket) -> None:
        """Bucket-level work run before any per-tensor math (rate scales, decay schedules)."""

    def static_key(self, step: int, hp: dict) -> Any:
        """A hashable value that ``math`` may branch on in Python (``x.static``), computed by the
        engine from the tensor's step counter -- a Python int, so no host sync. Compiled kernels
        are specialised per distinct tuple of keys (keep the set of values small: a phase, not
        the step). None (the default): nothing to specialise."""
        return None

    def foreach(self, b: Bucket) -> None:
        """The list-wise path. Transforms with only ``prepare`` work leave it empty."""

    def math(self, x: Slot) -> None:
        """The per-tensor path: readable, tensor ops only (see the module docstring)."""

    #: True for transforms that act on the proposed parameters (SPD): the engine calls
    #: ``after_update(b, targets)`` / ``after_math(x, new)`` inside its write-back, after the
    #: update and weight decay and before rounding. ``targets`` / ``new`` are compute-dtype.
    post_update: bool = False

    def after_update(self, b: Bucket, targets: list[Tensor]) -> None:  # pragma: no cover - optional
        raise NotImplementedError

    def after_math(self, x: Slot, new: Tensor) -> Tensor:  # pragma: no cover - optional
        raise NotImplementedError


def copies(tensors: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """Copies of the tensors (None stays None) in one list-wise op instead of a clone per tensor
    (on a GPU, one launch per tensor): ``x * 1`` is exact, NaN, inf and -0 included (subnormals
    too, unless ``torch.set_flush_denormal(True)`` flushes them as it does in any arithmetic)."""
    present = [t for t in tensors if t is not None]
    it = iter(torch._foreach_mul(present, 1.0) if present else [])
    return [next(it) if t is not None else None for t in tensors]


def static_keys(transforms: list[Transform], step: int, hp: dict) -> tuple:
    """Every transform's ``static_key`` for one tensor's step, in chain order."""
    return tuple(t.static_key(step, hp) for t in transforms)


def tensor_step(transforms: list[Transform], x: Slot, skip_nonfinite: bool = True,
                static: Optional[tuple] = None, never_skip: Optional[Tensor] = None) -> Tensor:
    """One tensor's whole step: the chain's math, then the write-back formula of the engine,
    ``new = p * (1 - lr * rate * wd * decay) - lr * rate * upd_scale * mask_scale * mask * u``,
    then post-update projections. Returns the new parameter value (compute dtype).

    A non-finite gradient, update or new state skips the tensor's step: its state is restored and
    the parameter value returned unchanged (``x.scratch["skipped"]`` is 1). In the fused kernel the
    snapshot and the selection fuse into the loops that run anyway.

    ``static``: the transforms' ``static_keys`` for this tensor's step, or None when unknown.
    ``never_skip``: a 0-d bool that, when true, applies the step even if it is not finite (the
    fused kernels' form of ``skip_nonfinite=False``, see ``fused._compile``)."""
    if skip_nonfinite:
        finite = torch.isfinite(x.g).all()
        saved = {k: v.clone() for k, v in x.st.items() if v is not None}
    for i, t in enumerate(transforms):
        x.static = None if static is None else static[i]
        t.math(x)
    if x.u is None:
        raise RuntimeError("the recipe's chain produced no update; its first transform must set one")
    lr_rate = x.hp["lr"] * x.rate
    u = x.u if x.upd_scale is None else x.u * x.upd_scale
    if x.mask is not None:
        u = u * (x.mask * x.mask_scale)
    new = x.p * (1 - lr_rate * x.hp["weight_decay"] * x.decay) - lr_rate * u
    for i, t in enumerate(transforms):
        if t.post_update:
            x.static = None if static is None else static[i]
            new = t.after_math(x, new)
    if not skip_nonfinite:
        x.scratch["skipped"] = torch.zeros((), dtype=x.p.dtype, device=x.p.device)
        return new
    finite = finite & torch.isfinite(new).all()
    for k in saved:  # a finite step can still overflow a state (g**2 past fp32's range)
        finite = finite & torch.isfinite(x.st[k]).all()
    if never_skip is not None:
        finite = finite | never_skip
    for k, old in saved.items():
        x.st[k].copy_(torch.where(finite, x.st[k], old))
    x.scratch["skipped"] = (~finite).to(x.p.dtype)
    return torch.where(finite, new, x.p)


@dataclass
class Chain:
    """An ordered list of transforms; the recipe of one param group."""

    transforms: list[Transform] = field(default_factory=list)

    def state_specs(self, hp: dict) -> list[StateSpec]:
        specs: list[StateSpec] = []
        seen: set[str] = set()
        for t in self.transforms:
            for s in t.state_specs(hp):
                if s.key in seen:
                    raise ValueError(f"two transforms declare the state key {s.key!r}")
                seen.add(s.key)
                specs.append(s)
        return specs
