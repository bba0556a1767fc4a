"""``hina-kohya bench ablate``: what each default-on technique contributes.

For a recipe, every technique that is on by default is turned off in turn, and each chosen task
(``converge.TASKS``) is trained with that variant at one learning rate over several seeds (the
recipes with their defaults, as in ``bench converge``); the rows show
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
from typing import Callable, Optional

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


def _probe(cls: type, **kw) -> torch.optim.Optimizer:
    """``cls`` on one small tensor: enough to read its chain."""
    return cls([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-4, **kw)


def _chain_of(cls: type, **kw) -> tuple:
    """What a switch can change: the transforms and the state they keep."""
    probe = _probe(cls, **kw)
    chain = probe.chain_for(0)
    return [t.name for t in chain.transforms], [s.key for s in chain.state_specs(probe.param_groups[0])]


def default_on(cls: type) -> list[str]:
    """The technique switches ``cls`` turns on by default and that change its chain (the
    Automagic config's ``enable_dual_momentum`` is True everywhere but acts in one recipe only)."""
    params = inspect.signature(cls.__init__).parameters
    on = [n for n in SWITCHES if n in params and params[n].default is True]
    chain = _chain_of(cls)
    return [n for n in on if _chain_of(cls, **{n: False}) != chain]


def unswitched(cls: type, switches: Optional[list[str]] = None) -> list[str]:
    """The removable transforms of ``cls``'s default chain that no default-on switch controls
    (``switches``: ``default_on(cls)`` when the caller has it already)."""
    switched = {SWITCHED[s] for s in (default_on(cls) if switches is None else switches)}
    return [n for n in dict.fromkeys(_chain_of(cls)[0]) if n in REMOVABLE and n not in switched]


def without(cls: type, names: tuple[str, ...]) -> type:
    """``cls`` whose chains leave out the transforms called ``names`` (an ablation, not a recipe)."""
    def build_chain(self, hp: dict) -> Chain:
        return Chain([t for t in cls.build_chain(self, hp).transforms if t.name not in names])

    return type(cls.__name__, (cls,), {"build_chain": build_chain, "__module__": cls.__module__})


def _variant(recipe: str, cls: type = None, **kw) -> Callable:
    return converge._hina(cls or recipe, **kw)


def techniques(cls: type) -> dict[str, tuple[str, str]]:
    """Every technique ``bench ablate`` turns off in ``cls``: the name ``--only`` takes (the
    switch, or the transform's name for a technique without one) -> (row key, row label suffix)."""
    switches = default_on(cls)
    out = {s: (f"no_{s}", f"{s}=False") for s in switches}
    out.update({n: (f"without_{n}", f"without {n}") for n in unswitched(cls, switches)})
    return out


def late_starts(cls: type) -> dict[str, int]:
    """The transforms ``cls`` starts part-way through its default warm-up (a ``Phase`` with a
    start bound, e.g. Automagic_CameAMP_Improved's Cautious at half of it) -> their first step."""
    from ..transforms.phase import Phase

    probe = _probe(cls)
    warmup = probe.param_groups[0].get("warmup_steps", 0)
    out: dict[str, int] = {}
    for t in probe.chain_for(0).transforms:
        first = t.first_step(warmup) if isinstance(t, Phase) else 1
        if first > 1:
            out[t.name] = min(out.get(t.name, first), first)
    return out


def first_active_step(cls: type, name: str, starts: Optional[dict[str, int]] = None) -> int:
    """The first step at which technique ``name`` (a switch or a transform's name, as ``chosen``
    takes it) acts in ``cls`` with its default warm-up (``starts``: ``late_starts(cls)`` when
    the caller has it already)."""
    return (late_starts(cls) if starts is None else starts).get(SWITCHED.get(name, name), 1)


def chosen(cls: type, only: Optional[list[str]]) -> dict[str, tuple[str, str]]:
    """The techniques named by ``only`` (a switch such as ``use_tam`` or the transform it
    controls, ``tam``); all of them when ``only`` is empty."""
    every = techniques(cls)
    if not only:
        return every
    # either name of a technique reaches it: the transform's for a switch, the switch's for a
    # transform a recipe applies without one (use_tam -> tam in the Automagic recipes)
    alias = {SWITCHED[s]: s for s in every if s in SWITCHED}
    alias.update({s: t for s, t in SWITCHED.items() if t in every})
    picked = {}
    for name in only:
        key = name if name in every else alias.get(name)
        if key is None:
            raise ValueError(f"--only {name!r}: {cls.__name__} has no default-on technique of that name; "
                             f"choose from {', '.join(every)}")
        picked[key] = every[key]
    return picked


def main(recipe: str, tasks: list[str], lr: float, seeds: int, steps: Optional[int], output: Path, quick: bool,
         device: str = "cpu", progress: bool = True, only: Optional[list[str]] = None) -> dict:
    """Train the defaults and each chosen technique's variant (``chosen``); write the report."""
    from .. import optim

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    cls = getattr(optim, recipe)
    picked = chosen(cls, only)
    # a technique that starts after the run's last step would give a row identical to the
    # defaults' at the cost of a full run: left out, with the step it starts at
    starts = late_starts(cls)
    longest = max(converge.task_steps(t, steps) for t in tasks)  # steps=None: each task's own
    late = {name: first_active_step(cls, name, starts) for name in picked}
    late = {name: first for name, first in late.items() if first > longest}
    if late and len(late) == len(picked):
        starts = ", ".join(f"{name} starts at step {first}" for name, first in late.items())
        raise ValueError(f"nothing to ablate: in {recipe}, {starts}, after the run's {longest} steps; "
                         f"pass --steps {max(late.values()) + 100} or more")
    entries = [("defaults", _variant(recipe), (lr,))]
    labels = {"defaults": f"{recipe}, defaults"}
    for name, first in late.items():
        if progress:
            print(f"{name}: left out, it starts at step {first} (after the run's {longest} steps)", flush=True)
    for name, (key, suffix) in picked.items():
        if name in late:
            continue
        variant = _variant(recipe, **{name: False}) if key.startswith("no_") else _variant(recipe, without(cls, (name,)))
        entries.append((key, variant, (lr,)))
        labels[key] = f"{recipe}, {suffix}"
    on_cell = converge.partial_writer(output, f"ablate-{recipe}", steps, seeds, labels=labels, reference="defaults")
    cells = converge.run(tasks, entries, seeds, steps, quick, device=device, progress=progress, on_cell=on_cell)
    summary = converge.report(cells, steps, seeds, labels=labels, reference="defaults")
    summary["recipe"], summary["lr"] = recipe, lr
    summary["left_out"] = {name: f"starts at step {first}, after the run's {longest} steps" for name, first in late.items()}
    converge.write(summary, output, f"ablate-{recipe}")
    return summary
