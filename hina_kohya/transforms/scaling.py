"""Per-tensor learning-rate scales derived from parameter roles and statistics.

``LoRAPlusRatio`` -- LoRA+ (Hayou et al. 2024, arXiv 2402.12354): every paired B factor (the
zero-initialised one, see roles.py) steps ``alora_ratio`` times the rate of its A. Pairs are found
across param groups by name. If sd-scripts' own ``loraplus_lr_ratio`` already put the B factors in
a group with a higher learning rate, the ratio is not applied again (one message says so). The
original applied the ratio only to *unpaired* B, and twice under sd-scripts LoRA+ (defect 1).

``LoKrScale``: for a LoKr module with Kronecker factors w1 (w1_a @ w1_b when split) and w2
(w2_a @ w2_b when split), every factor's rate is scaled by 1 / (1 + 0.3 * ||w1|| * ||w2||), which
shrinks the step as the Kronecker product grows (the original's rule, with the factorised layouts
LyCORIS produces actually paired, defect 12). Computed on the device, no host sync.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform
from .came import as_matrix


def _initial_lr(group: dict) -> float:
    return float(group.get("initial_lr", group.get("hina_lr0", group["lr"])))


def lora_plus_factors(opt, ratio_of_group) -> dict[int, float]:
    """Flat index of each paired B -> the factor its rate is multiplied by."""
    st = opt.structure
    group_of = {}
    for gi, idx in enumerate(opt._flat_index):
        for i in idx:
            group_of[i] = gi
    out: dict[int, float] = {}
    already = False
    for a, b_idx in st.pairs:
        ga, gb = group_of[a], group_of[b_idx]
        lr_a, lr_b = _initial_lr(opt.param_groups[ga]), _initial_lr(opt.param_groups[gb])
        if ga != gb and lr_b > lr_a * (1 + 1e-6):
            already = True  # the trainer's LoRA+ split: B's group already runs faster
            continue
        out[b_idx] = ratio_of_group(gb)
    if already:
        opt.note_once("B factors already sit in faster param groups (sd-scripts loraplus_lr_ratio); alora_ratio "
                      "is not applied on top of it")
    return out


class LoRAPlusRatio(Transform):
    name = "lora_plus"

    def prepare(self, b: Bucket) -> None:
        opt = b.opt
        cache = opt._derived.get("lora_plus")
        if cache is None:
            cache = lora_plus_factors(opt, lambda gi: float(opt.param_groups[gi]["alora_ratio"]))
            opt._derived["lora_plus"] = cache
        b.lr_scale = [s * cache.get(idx, 1.0) for s, idx in zip(b.lr_scale, b.indices)]


def _product(opt, indices: tuple[int, ...]) -> torch.Tensor:
    """The Kronecker factor from its parameters: the tensor, or a @ b flattened for split layouts."""
    ps = [opt._flat_params[i].detach() for i in indices]
    ps = [p if p.dtype == torch.float64 else p.float() for p in ps]
    if len(ps) == 1:
        return ps[0]
    a, c = ps[0], ps[1]
    a2, c2 = a.reshape(a.shape[0], -1), c.reshape(c.shape[0], -1)
    if a2.shape[1] == c2.shape[0]:
        return a2 @ c2
    return a2.T @ c2  # Tucker layouts store both factors rank-first


class LoKrScale(Transform):
    name = "lokr_scale"

    def prepare(self, b: Bucket) -> None:
        scales_by_param = self._scales(b.opt)
        if not any(idx in scales_by_param for idx in b.indices):
            return
        one = torch.ones((), device=b.params[0].device, dtype=b.compute_dtype)
        scales = [scales_by_param[idx].to(one.device, b.compute_dtype) if idx in scales_by_param else one
                  for idx in b.indices]
        b.lr_scale_t = scales if b.lr_scale_t is None else torch._foreach_mul(b.lr_scale_t, scales)

    @staticmethod
    def _scales(opt) -> dict[int, torch.Tensor]:
        """Scale of every LoKr parameter, computed once per optimizer step from the parameters as
        they were before any group of this step was updated."""
        cached = opt._derived.get("lokr_scales")
        if cached is not None and cached[0] == opt.step_count:
            return cached[1]
        out: dict[int, torch.Tensor] = {}
        for w1, w2 in opt.structure.kron:
            scale = 1.0 / (1.0 + 0.3 * _product(opt, w1).norm() * _product(opt, w2).norm())
            for i in w1 + w2:
                out[i] = scale
        opt._derived["lokr_scales"] = (opt.step_count, out)
        return out



class RowScaling(Transform):
    """ALLoRA row scaling (Huang & Balestriero 2024, "ALLoRA", arXiv 2410.09692), the
    Automagic_CameAMP family's ``full_finetune=False`` rule: each row's update is scaled by

        rho_row = 1 / sqrt(||theta_row||**2 + 1 / eta**2)      (eta = ``eta``, default 2)

    recomputed from the current weights every step (the original computed it once at init, with an
    unsquared norm, defect 38), for adapter factors with two or more dims -- every such tensor
    when names are unknown. A zero-initialised row (LoRA B) gets ``eta``; rows that grew get less.
    Rows are dim 0 of the tensor. The matrix shape comes from the factored statistics ``factored``
    of another transform when there are some (CAME's ``came_v_row`` / ``came_v_col``: no extra
    memory), or from a small state of its own (``row_scale``, the last rho)."""

    name = "row_scaling"
    has_foreach = False

    def __init__(self, factored: Optional[str] = None) -> None:
        self.factored = factored

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        if self.factored is not None:
            return ()
        return (StateSpec("row_scale", quantizable=False, shape=lambda p: (p.shape[0],) if p.dim() >= 2 else None,
                          applies=_adapter_or_unknown),)

    def prepare(self, b: Bucket) -> None:
        if self.factored is None:
            return  # the state exists exactly where the scaling applies
        # 1-D tensors have no rows: the statistics' shape decides in math (as_matrix), the role here
        b.extras["row_on"] = [on if p.dim() >= 2 else torch.zeros_like(on)
                              for p, on in zip(b.params, b.role_flags(_adapter_or_unknown))]

    def math(self, x: Slot) -> None:
        if self.factored is None:
            ref = x.st.get("row_scale")
            if ref is None:
                return
            row = col = None
        else:  # borrowed shape (see came.as_matrix): 1-D tensors and non-adapters have it too
            row, col = x.st[f"{self.factored}_row"], x.st[f"{self.factored}_col"]
        w, u = as_matrix(x.p, row, col), as_matrix(x.u, row, col)
        rho = torch.rsqrt(w.square().sum(dim=1) + 1.0 / x.hp["eta"] ** 2)
        if self.factored is None:
            ref.copy_(rho)
        else:  # ... and are not scaled
            rho = torch.where(x.extra["row_on"] > 0, rho, torch.ones_like(rho))
        x.u = (u * rho.unsqueeze(1)).reshape(x.u.shape)


def _adapter_or_unknown(role) -> bool:
    return role is None or role.adapter
