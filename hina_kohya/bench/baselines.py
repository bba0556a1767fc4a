"""Outside optimizers the benchmarks measure the recipes against (optional packages).

Each factory takes ``(groups, lr)`` -- the named, decay-split groups the tasks build -- and
imports its package only when called; ``PACKAGES`` names the pip package and module of each, so
the benchmarks can say what to install before a run starts.

* adv_optm (OneTrainer's optimizers): ``AdamW_adv`` and ``Prodigy_adv``, defaults but weight decay;
* pytorch_optimizer's ``LoRARite`` (Tang et al. 2024, arXiv 2410.20625): it steps LoRA factor
  *pairs* only (the rest of a network it skips), so ``lorarite`` hands it the pairs ``roles.py``
  finds (2-D, the rank-first factor first, as it expects) and an AdamW the other tensors (a LoKr's
  ``lokr_w1``, a classifier head);
* prodigy-plus-schedule-free 2.x (``ProdigyPlusScheduleFree``): schedule-free, so it has
  ``train()`` / ``eval()``, which the training loop calls around evaluations.

All take ``weight_decay=0.01``, as the torch AdamW baseline. The Prodigy-style ones get ``lr`` as a
multiplier of their own step-size estimate (grid ``PRODIGY_GRID``).
"""

from __future__ import annotations

from typing import Optional

import torch

#: pip package -> importable module, for every optional package a baseline needs
PACKAGES = {"adv-optm": "adv_optm", "pytorch-optimizer": "pytorch_optimizer",
            "prodigy-plus-schedule-free": "prodigyplus"}
#: the learning rates of the Prodigy-style optimizers: multipliers of their own estimate
PRODIGY_GRID = (0.5, 1.0, 2.0)
WEIGHT_DECAY = 0.01


def adv_adamw(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    from adv_optm import AdamW_adv

    return AdamW_adv(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def adv_prodigy(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    from adv_optm import Prodigy_adv

    return Prodigy_adv(groups, lr=lr, weight_decay=WEIGHT_DECAY)


def prodigy_plus(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    from prodigyplus import ProdigyPlusScheduleFree

    return ProdigyPlusScheduleFree(groups, lr=lr, weight_decay=WEIGHT_DECAY)


class Composite:
    """Several optimizers stepped as one (what the training loop needs of an optimizer)."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        for part in self.parts:
            loss = part.step(closure) if loss is None else part.step()
        return loss

    @property
    def state(self) -> dict:
        return {p: s for part in self.parts for p, s in part.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]


def lora_pairs(groups: list[dict]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """The 2-D factor pairs of named groups, each ordered (rank-first factor, rank-last factor),
    and the parameters in no such pair."""
    from ..roles import build_structure

    params = [p for g in groups for p in g["params"]]
    names = [n for g in groups for n in (g.get("param_names") or [None] * len(g["params"]))]
    structure = build_structure(names, [tuple(p.shape) for p in params])
    pairs, paired = [], set()
    for a, b in structure.pairs:
        pa, pb = params[a], params[b]
        if pa.dim() != 2 or pb.dim() != 2:
            continue
        rank = ({pa.shape[0], pa.shape[1]} & {pb.shape[0], pb.shape[1]})
        r = min(rank)
        first, second = (pa, pb) if pa.shape[0] == r and pb.shape[1] == r else (pb, pa)
        if first.shape[0] != r or second.shape[1] != r:
            continue
        pairs.append((first, second))
        paired |= {a, b}
    rest = [p for i, p in enumerate(params) if i not in paired]
    return pairs, rest


def lorarite(groups: list[dict], lr: float) -> Composite:
    """LoRARite on the factor pairs, torch AdamW on every other tensor (both at ``lr``)."""
    from pytorch_optimizer import LoRARite

    pairs, rest = lora_pairs(groups)
    parts: list[torch.optim.Optimizer] = []
    if pairs:
        parts.append(LoRARite([p for pair in pairs for p in pair], lr=lr, weight_decay=WEIGHT_DECAY))
    if rest:
        parts.append(torch.optim.AdamW(rest, lr=lr, weight_decay=WEIGHT_DECAY))
    return Composite(parts)


def missing(packages: list[Optional[str]]) -> list[str]:
    """The packages of ``PACKAGES`` in ``packages`` that this environment cannot import."""
    import importlib.util

    return sorted({p for p in packages if p in PACKAGES and importlib.util.find_spec(PACKAGES[p]) is None})
