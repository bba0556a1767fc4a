"""``hina-kohya bench ablate``: what each default-on technique contributes.

For a recipe, every technique that is on by default is turned off in turn, and each chosen task
(``converge.TASKS``) is trained with that variant at one learning rate over several seeds (the
Automagic_CameAMP recipes with ``max_lr = 10 * lr``, as in ``bench converge``); the rows show
held-out loss (mean and spread) and steps to the defaults' final loss, so a technique whose
removal does not hurt is visible as such.

Two ways off: a constructor switch that defaults to True (``SWITCHES``), as a user would turn it
off; and, for the techniques a recipe applies without a switch (the Automagic recipes' orthogonal
gradient, TAM, Grams, AGR, CAME confidence, adaptive weight decay, row scaling, lr mask, C-Optim
context), the recipe's chain without that transform (``REMOVABLE``). A transform that produces
the update (the moments, CAME's factored second moment) cannot be removed.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from ..core.chain import Chain
from . import converge

#: constructor switches that turn a technique on; others that default to True (``skip_nonfinite``,
#: ``block_wise``, accepted-but-inert settings) are safety or storage choices, not techniques
SWITCHES = ("use_spd", "use_cautious", "use_orthogonal_grad", "use_adopt_stability", "use_grams", "use_agr", "use_tam",
            "use_alora", "dynamic_weight_decay", "use_dynamic_adaptation", "use_lr_mask", "came",
            "enable_dual_momentum")
#: the transform each switch controls (so that one technique is not ablated twice)
SWITCHED = {"use_spd": "spd", "use_cautious": "cautious", "use_orthogonal_grad": "orthograd",
            "use_adopt_stability": "adopt", "use_grams": "grams", "use_agr": "agr", "use_tam": "tam",
            "use_alora": "lora_plus", "dynamic_weight_decay": "dynamic_wd", "use_lr_mask": "lr_mask",
            "enable_dual_momentum": "dual_momentum", "came": "came", "use_dynamic_adaptation": "importance"}
#: transforms a chain still works without (each reshapes or rescales an update made before it)
REMOVABLE = ("orthograd", "agr", "tam", "came_confidence", "grams", "cautious", "adaptive_wd", "row_scaling",
             "lr_mask", "c_optim", "dual_momentum", "spd")
RECIPES = ("HinaAdamW", "AdaptiveHinaAdamW", "Automagic_CameAMP", "Automagic_CameAMP_COptim",
           "Automagic_CameAMP_Improved")


def _chain_of(cls: type, **kw) -> tuple:
    """What a switch can change: the transforms and the state they keep."""
    probe = cls([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-4, **kw)
    chain = probe.chain_for(0)
    return [t.name for t in chain.transforms], [s.key for s in chain.state_specs(probe.param_groups[0])]


def default_on(cls: type) -> list[str]:
    """The technique switches ``cls`` turns on by default and that change its chain (the
    Automagic config's ``enable_dual_momentum`` is True everywhere but acts in one recipe only)."""
    params = inspect.signature(cls.__init__).parameters
    on = [n for n in SWITCHES if n in params and params[n].default is True]
    chain = _chain_of(cls)
    return [n for n in on if _chain_of(cls, **{n: False}) != chain]


def unswitched(cls: type) -> list[str]:
    """The removable transforms of ``cls``'s default chain that no default-on switch controls."""
    switched = {SWITCHED[s] for s in default_on(cls)}
    return [n for n in dict.fromkeys(_chain_of(cls)[0]) if n in REMOVABLE and n not in switched]


def without(cls: type, names: tuple[str, ...]) -> type:
    """``cls`` whose chains leave out the transforms called ``names`` (an ablation, not a recipe)."""
    def build_chain(self, hp: dict) -> Chain:
        return Chain([t for t in cls.build_chain(self, hp).transforms if t.name not in names])

    return type(cls.__name__, (cls,), {"build_chain": build_chain, "__module__": cls.__module__})


def _variant(recipe: str, cls: type = None, **kw) -> Callable:
    # the recipes with lr masks get max_lr = 10 x lr, as in bench converge
    masked = recipe.startswith(("Automagic", "AdaptiveHinaAdamW"))
    return (converge._masked if masked else converge._hina)(cls or recipe, **kw)


def main(recipe: str, tasks: list[str], lr: float, seeds: int, steps: int, output: Path, quick: bool,
         device: str = "cpu", progress: bool = True) -> dict:
    from .. import optim

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    cls = getattr(optim, recipe)
    entries = [("defaults", _variant(recipe), (lr,))]
    labels = {"defaults": f"{recipe}, defaults"}
    for switch in default_on(cls):
        entries.append((f"no_{switch}", _variant(recipe, **{switch: False}), (lr,)))
        labels[f"no_{switch}"] = f"{recipe}, {switch}=False"
    for name in unswitched(cls):
        entries.append((f"without_{name}", _variant(recipe, without(cls, (name,))), (lr,)))
        labels[f"without_{name}"] = f"{recipe}, without {name}"
    on_cell = converge.partial_writer(output, f"ablate-{recipe}", steps, seeds, labels=labels, reference="defaults")
    cells = converge.run(tasks, entries, seeds, steps, quick, device=device, progress=progress, on_cell=on_cell)
    summary = converge.report(cells, steps, seeds, labels=labels, reference="defaults")
    summary["recipe"], summary["lr"] = recipe, lr
    converge.write(summary, output, f"ablate-{recipe}")
    return summary
