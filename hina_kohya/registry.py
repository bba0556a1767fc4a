"""The optimizer registry: names (case-insensitive), aliases and capabilities.

sd-scripts resolves ``--optimizer_type`` by name; ``hina_kohya.kohya`` installs this registry into
it. Here it is also the Python entry point: ``create_optimizer("hinaadamw", params, lr=1e-4)``.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Iterable

from .args import validate_kwargs


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    aliases: tuple[str, ...] = ()
    supports_8bit: bool = True      # accepts state_precision="8bit"
    uses_names: bool = False        # name-aware features (needs param_names to reach them)
    train_eval: bool = False        # needs optimizer.train()/eval() around sampling and saving
    fused_backward: bool = False    # can step per parameter from backward hooks
    summary: str = ""

    @property
    def dotted_path(self) -> str:
        return f"{self.cls.__module__.split('.')[0]}.{self.cls.__name__}"


_SPECS: list[OptimizerSpec] = []
_BY_NAME: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    for key in (spec.name, *spec.aliases):
        low = key.lower()
        if low in _BY_NAME and _BY_NAME[low] is not spec:
            raise ValueError(f"optimizer name {key!r} is registered twice")
        _BY_NAME[low] = spec
    _SPECS.append(spec)
    return spec


def find(name: str) -> OptimizerSpec | None:
    """The spec for a name or alias (case-insensitive), or None."""
    return _BY_NAME.get(name.strip().lower()) if isinstance(name, str) else None


def resolve(optimizer_type: str) -> OptimizerSpec | None:
    """The spec an sd-scripts ``--optimizer_type`` names, or None when it is not ours: a
    registered name or alias (any case), or a dotted path into this package
    (``hina_kohya.HinaAdamW``, ``hina_kohya.optim.HinaAdamW``) whose last part is one."""
    if not isinstance(optimizer_type, str):
        return None
    text = optimizer_type.strip()
    if "." in text:
        package, _, last = text.rpartition(".")
        if package.split(".")[0] != __name__.split(".")[0]:
            return None
        spec = find(last)
        try:  # only a path sd-scripts' own import would also find (hina_kohya.nope.X is not ours)
            module = importlib.import_module(package)
        except ImportError:
            return None
        return spec if spec is not None and getattr(module, last, None) is spec.cls else None
    return find(text)


def get_spec(name: str) -> OptimizerSpec:
    spec = find(name)
    if spec is None:
        close = difflib.get_close_matches(str(name).lower(), list(_BY_NAME), n=3, cutoff=0.5)
        shown = [next(k for s in _SPECS for k in (s.name, *s.aliases) if k.lower() == c) for c in close]
        hint = f" Did you mean {', '.join(shown)}?" if shown else ""
        raise KeyError(f"unknown optimizer {name!r}.{hint} Known: {', '.join(list_optimizers())}.")
    return spec


def get_optimizer_class(name: str) -> type:
    return get_spec(name).cls


def list_optimizers(include_aliases: bool = False) -> list[str]:
    if include_aliases:
        return [k for s in _SPECS for k in (s.name, *s.aliases)]
    return [s.name for s in _SPECS]


def create_optimizer(name: str, params: Iterable, **kwargs: Any):
    """Build a registered optimizer; arguments are checked (unknown names get a suggestion)."""
    spec = get_spec(name)
    return spec.cls(params, **validate_kwargs(spec.cls, kwargs))


def _register_builtins() -> None:
    from . import optim

    register(OptimizerSpec("HinaAdamW", optim.HinaAdamW, aliases=("HinaAdamWOptimizer",), uses_names=True,
                           summary="AdamW with LoRA/LoKr-aware techniques"))
    register(OptimizerSpec("HinaAdamW8bit", optim.HinaAdamW8bit, aliases=("HinaAdamWOptimizer8bit",),
                           uses_names=True, summary="HinaAdamW with 8-bit state"))
    register(OptimizerSpec("AdaptiveHinaAdamW", optim.AdaptiveHinaAdamW, aliases=("HinaAdaptiveAdamW",),
                           uses_names=True, summary="HinaAdamW techniques + per-element lr masks + importance "
                           "scaling; works without names"))
    # the old fork's memory-optimised variant kept its state in bf16 (where slow EMAs stop moving,
    # ALGORITHMS.md E12); its name maps to the 8-bit recipe, the memory-saving mode that works
    register(OptimizerSpec("AdaptiveHinaAdamW8bit", optim.AdaptiveHinaAdamW8bit,
                           aliases=("HinaAdaptiveAdamW8bit", "HinaAdaptiveAdamWMemoryOptimized8bit"), uses_names=True,
                           summary="AdaptiveHinaAdamW with 8-bit state"))
    register(OptimizerSpec("Automagic_CameAMP", optim.Automagic_CameAMP, uses_names=True,
                           summary="factored CAME + Automagic per-element lr masks"))
    register(OptimizerSpec("Automagic_CameAMP8bit", optim.Automagic_CameAMP8bit, uses_names=True,
                           summary="Automagic_CameAMP with 8-bit state"))
    register(OptimizerSpec("Automagic_CameAMP_COptim", optim.Automagic_CameAMP_COptim, uses_names=True,
                           summary="Automagic_CameAMP + C-Optim context-aware lr (loss via set_loss)"))
    register(OptimizerSpec("Automagic_CameAMP_COptim8bit", optim.Automagic_CameAMP_COptim8bit, uses_names=True,
                           summary="Automagic_CameAMP_COptim with 8-bit state"))
    register(OptimizerSpec("Automagic_CameAMP_Improved", optim.Automagic_CameAMP_Improved, uses_names=True,
                           summary="Automagic_CameAMP + dual momentum, phase schedule, opt-in regularisers"))


_register_builtins()
