"""``hina-kohya bench ablate``: what each default-on technique contributes.

For a recipe, every switch that is on by default (``SWITCHES`` among the constructor's arguments
whose default is True) is turned off in turn, and each chosen task (``converge.TASKS``) is trained
with that variant at one learning rate over several seeds (the Automagic_CameAMP recipes with
``max_lr = 10 * lr``, as in ``bench converge``); the rows show held-out loss (mean and spread) and steps
to the defaults' final loss, so a technique whose removal does not hurt is visible as such.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from . import converge

#: constructor switches that turn a technique on; others that default to True (``skip_nonfinite``,
#: ``block_wise``, accepted-but-inert settings) are safety or storage choices, not techniques
SWITCHES = ("use_spd", "use_cautious", "use_orthogonal_grad", "use_adopt_stability", "use_grams", "use_agr", "use_tam",
            "use_alora", "dynamic_weight_decay", "use_dynamic_adaptation", "use_lr_mask", "came",
            "enable_dual_momentum")
RECIPES = ("HinaAdamW", "AdaptiveHinaAdamW", "Automagic_CameAMP", "Automagic_CameAMP_COptim",
           "Automagic_CameAMP_Improved")


def default_on(cls: type) -> list[str]:
    """The technique switches ``cls`` turns on by default."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n in SWITCHES if n in params and params[n].default is True]


def _variant(recipe: str, **kw) -> Callable:
    return (converge._automagic if recipe.startswith("Automagic") else converge._hina)(recipe, **kw)


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
    cells = converge.run(tasks, entries, seeds, steps, quick, device=device, progress=progress)
    summary = converge.report(cells, steps, seeds, labels=labels, reference="defaults")
    summary["recipe"], summary["lr"] = recipe, lr
    converge.write(summary, output, f"ablate-{recipe}")
    return summary
