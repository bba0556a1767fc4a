"""The Automagic_CameAMP family: CAME with Automagic per-element learning rates.

``Automagic_CameAMP(params, config=None, **kwargs)`` -- kwargs are fields of ``OptimizerConfig``
(so ``--optimizer_args "lr=1e-4" "warmup_steps=300"`` work), plus the engine options. Recipe, in
order (phases: early warm-up t < W/2, late warm-up, stable t >= W, see transforms/phase.py):

    [regularizers]           Regularize          opt-in gradient regularisers / your strategies
    early warm-up            OrthogonalGradient  gradient made orthogonal to the weight
                             AGR                 paper-form gradient regularisation
                             FactoredSecondMoment CAME's factored normalisation + RMS clip
    early warm-up            TorqueAwareMomentum damp the momentum input by the gradient's turn
                             ConsistencyMomentum EMA with beta1_t = max(beta1 * beta1_decay**t, 0.4)
                             CAMEConfidence      factored confidence (AdaBelief-style residual)
                             Grams (blended)     a * |u| sign(g) + (1 - a) u, a = grams_decay**t
    [weight_decay > 0]       AdaptiveWeightDecay decay scaled by the tensor's gradient size
    [not full_finetune]      RowScaling          ALLoRA rows
                             LRMask              per-element rates in [min_lr, max_lr]

``Automagic_CameAMP_COptim`` adds the C-Optim context multiplier (transforms/context.py), fed by
the loss (``step(closure)`` or ``set_loss(loss)``) or by the gradient norm.
``Automagic_CameAMP_Improved`` replaces the tail: dual momentum [enable_dual_momentum],
pure Grams in the early warm-up, Cautious [+ Background] after it, the lr mask with ``d_coef``
[+ spatial awareness], SPD during the warm-up with strength ``weight_decay`` (no plain decay), and
the opt-in regularisers from its flags. The ``*8bit`` classes are the same recipes with
``state_precision="8bit"``.

What differs from the originals is listed in each transform's docstring (ALGORITHMS.md §5.3-5.6);
in short: real factored CAME (state ~6 B/element instead of 21), no skipped first step, bias
corrections, one momentum rule, decay for the whole run, C-Optim that actually sees a signal, an
Improved recipe that does not freeze at half the warm-up, and checkpoints that resume.

Defaults that differ from the originals', measured on tasks whose optimum is reachable (an
outside benchmark had found the original defaults 16x behind AdamW; docs/BENCHMARKS.md, "Defaults
that win on tasks we did not design"): the lr masks' cap ``max_lr`` is ``max_lr_ratio`` (10) x each
group's lr, not an absolute 1e-3 that capped every larger lr; ``betas`` are CAME's (0.9, 0.999,
0.9999) instead of (0.8, 0.99, 0.999); ``beta1_decay`` is 1.0, so the momentum keeps beta1 for the
whole run (the original shortened it to 0.4 within ~1,400 steps, a sign-descent-like update that
stalled short of the optimum). The Grams blend fades with its own ``grams_decay`` (0.9995, the
original's rate, which it took from ``beta1_decay``). The regularisers (edge suppression, background,
spatial awareness, low-rank penalty, frequency penalty) are off -- they are heuristics in weight
index space (DESIGN.md §4); ``frequency_penalty`` is its own switch (0 = off, the original's 0.05
ran whenever ``spatial_awareness`` was on); ``context_window`` / ``edge_threshold`` /
``adaptation_rate`` are numbers (the originals' were 1-tuples by accident), with the C-Optim
module's own defaults 50 / 0.9 / 0.1; ``tam_beta`` (0.9, the originals' fixed value) is exposed.
``low_rank_emphasis``, ``detail_preservation``, ``enable_cache``, ``max_cache_size`` and
``use_approximate_svd`` are accepted so existing argument strings keep working, and have no effect:
their only uses in the originals were the TAM state growth that froze training (defect 48), unused
buffers (defect 57) and caches this implementation does not need.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from .. import diagnostics
from ..core.chain import Chain, Transform
from ..core.optimizer import ENGINE_OPTIONS, HinaOptimizer
from ..transforms.agr import AGR
from ..transforms.came import CAMEConfidence, FactoredSecondMoment
from ..transforms.context import Context, ContextRate
from ..transforms.decay import AdaptiveWeightDecay, NoDecoupledDecay, SelectiveProjectionDecay
from ..transforms.lr_mask import GRANULARITIES, LRMask, note_capped_groups, resolve_max_lr
from ..transforms.masks import Background, Cautious, Grams
from ..transforms.moments import ConsistencyMomentum, DualMomentum
from ..transforms.phase import PHASES, Phase, phase_index
from ..transforms.projection import OrthogonalGradient
from ..transforms.scaling import RowScaling
from ..transforms.spatial import (EdgeSuppression, FrequencyPenalty, LowRankPenalty, RegularizationStrategy,
                                  Regularize, SpatialAwareness)
from ..transforms.torque import TorqueAwareMomentum
from .hina_adamw import move_state


@dataclass
class OptimizerConfig:
    """Every setting of the Automagic_CameAMP family (ALGORITHMS.md §3.3, §3.5-3.7), validated.
    Round-trips with ``to_dict()`` / ``from_dict()`` and ``to_toml()`` / ``from_toml()``."""

    lr: float = 1e-6
    min_lr: float = 1e-7
    max_lr: Optional[float] = None      # None: max_lr_ratio x each group's lr
    max_lr_ratio: float = 10.0
    lr_mask_granularity: str = "element"
    lr_bump: float = 3e-6
    eps: tuple = (1e-30, 1e-16, 1e-8)
    clip_threshold: float = 1.0
    betas: tuple = (0.9, 0.999, 0.9999)
    eta: float = 2.0
    beta1_decay: float = 1.0
    grams_decay: float = 0.9995
    weight_decay: float = 5e-4
    warmup_steps: int = 500
    tam_beta: float = 0.9
    came: bool = True
    full_finetune: bool = False
    verbose: bool = False
    # C-Optim
    context_window: int = 50
    edge_threshold: float = 0.9
    adaptation_rate: float = 0.1
    # Improved
    d_coef: float = 2.0
    edge_suppression: bool = False
    edge_penalty: float = 0.1
    background_regularization: bool = False
    spatial_awareness: bool = False
    frequency_penalty: float = 0.0
    detail_preservation: float = 0.8
    lora_rank_penalty: bool = False
    rank_penalty_strength: float = 0.01
    low_rank_emphasis: float = 1.2
    enable_cache: bool = True
    max_cache_size: int = 100
    use_approximate_svd: bool = True
    enable_dual_momentum: bool = True
    long_term_beta: float = 0.99
    alpha_mix_ratio: Optional[float] = None
    # engine
    state_precision: str = "fp32"

    def __post_init__(self) -> None:
        # a list (TOML) becomes a tuple; a scalar stays as given and is refused below
        self.eps, self.betas = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (self.eps, self.betas))
        problems = []

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                problems.append(f"{name}={getattr(self, name)!r}: {what}")

        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        need(num(self.lr) and self.lr > 0, "lr", "use a number > 0")
        need(self.max_lr is None or (num(self.max_lr) and self.max_lr > 0), "max_lr",
             "use None (max_lr_ratio x lr) or a number > 0")
        need(num(self.max_lr_ratio) and self.max_lr_ratio > 0, "max_lr_ratio", "use a number > 0, e.g. 10.0")
        need(self.lr_mask_granularity in GRANULARITIES, "lr_mask_granularity",
             f"use one of {', '.join(map(repr, GRANULARITIES))}")
        cap = self.max_lr if self.max_lr is not None else (
            self.max_lr_ratio * self.lr if num(self.max_lr_ratio) and num(self.lr) else None)
        need(num(self.min_lr) and cap is not None and num(cap) and 0 < self.min_lr < cap, "min_lr",
             f"use 0 < min_lr < max_lr (max_lr={self.max_lr!r}, max_lr_ratio={self.max_lr_ratio!r}, lr={self.lr!r})")
        need(num(self.lr_bump) and self.lr_bump >= 0, "lr_bump", "use a number >= 0")
        need(isinstance(self.eps, tuple) and len(self.eps) >= 2 and all(num(e) and e > 0 for e in self.eps), "eps",
             "use a tuple of at least two numbers > 0, e.g. (1e-30, 1e-16, 1e-8)")
        need(isinstance(self.betas, tuple) and len(self.betas) == 3 and all(num(b) and 0 <= b < 1 for b in self.betas),
             "betas",
             "use three numbers in [0, 1), e.g. (0.9, 0.999, 0.9999)")
        for name in ("clip_threshold", "eta"):
            need(num(getattr(self, name)) and getattr(self, name) > 0, name, "use a number > 0")
        for name in ("tam_beta", "long_term_beta"):
            need(num(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, "use a number in [0, 1)")
        need(num(self.beta1_decay) and 0 < self.beta1_decay <= 1, "beta1_decay",
             "use a number in (0, 1]; 1.0 keeps beta1 constant")
        need(num(self.grams_decay) and 0 < self.grams_decay <= 1, "grams_decay",
             "use a number in (0, 1]; 1.0 keeps Grams at full strength")
        need(num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "use a number >= 0")
        need(isinstance(self.warmup_steps, int) and not isinstance(self.warmup_steps, bool)
             and self.warmup_steps >= 1, "warmup_steps", "use an integer >= 1")
        need(isinstance(self.context_window, int) and self.context_window >= 2, "context_window",
             "use an integer >= 2")
        need(num(self.adaptation_rate) and 0 < self.adaptation_rate <= 1, "adaptation_rate", "use a number in (0, 1]")
        need(num(self.edge_threshold) and self.edge_threshold > 0, "edge_threshold", "use a number > 0")
        for name in ("edge_penalty", "frequency_penalty", "rank_penalty_strength", "d_coef"):
            need(num(getattr(self, name)) and getattr(self, name) >= 0, name, "use a number >= 0")
        need(self.alpha_mix_ratio is None or (num(self.alpha_mix_ratio) and 0 <= self.alpha_mix_ratio <= 1),
             "alpha_mix_ratio", "use None (0.5) or a number in [0, 1]")
        need(self.state_precision in ("fp32", "bf16", "8bit"), "state_precision", 'use "fp32", "bf16" or "8bit"')
        # accepted for compatibility, no effect (README): still only sensible values
        need(num(self.detail_preservation) and self.detail_preservation >= 0, "detail_preservation", "use a number >= 0")
        need(num(self.low_rank_emphasis) and self.low_rank_emphasis > 0, "low_rank_emphasis", "use a number > 0")
        need(isinstance(self.max_cache_size, int) and not isinstance(self.max_cache_size, bool)
             and self.max_cache_size >= 0, "max_cache_size", "use an integer >= 0")
        if problems:
            raise ValueError("OptimizerConfig: " + "; ".join(problems))

    # -- round trips ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizerConfig":
        check_fields(d, set(_FIELDS), "OptimizerConfig")
        return cls(**d)

    def to_toml(self) -> str:
        import toml

        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.to_dict().items() if v is not None}
        return toml.dumps(d)

    @classmethod
    def from_toml(cls, text: str) -> "OptimizerConfig":
        import toml

        d = toml.loads(text)
        return cls.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


#: kept for code written against the originals' two config classes
ImprovedOptimizerConfig = OptimizerConfig
_FIELDS = tuple(f.name for f in dataclasses.fields(OptimizerConfig))


#: what a recipe's constructor accepts as keywords
_RECIPE_KEYS = set(_FIELDS) | set(ENGINE_OPTIONS) | {"regularizers", "config"}


def check_fields(d: dict, known: set, owner: str) -> None:
    """Raise a TypeError naming the first unknown key of ``d``, with the closest known ones."""
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known settings: {', '.join(_FIELDS)}"
            raise TypeError(f"{owner}: unknown setting {key!r}{hint}")


class _AutomagicBase(HinaOptimizer):
    """The family's constructor and diagnostics; recipes differ in ``build_chain``."""

    #: defaults of this recipe that differ from OptimizerConfig's (used when no config is given)
    recipe_defaults: dict = {}

    def __init__(self, params: Iterable, config: Optional[OptimizerConfig] = None,
                 regularizers: Sequence[RegularizationStrategy] = (), **kwargs: Any) -> None:
        owner = type(self).__name__
        check_fields(kwargs, _RECIPE_KEYS, owner)
        engine = {k: kwargs.pop(k) for k in list(kwargs) if k in ENGINE_OPTIONS and k != "state_precision"}
        if config is not None and not isinstance(config, OptimizerConfig):
            raise TypeError(f"{owner}: config must be an OptimizerConfig, not {type(config).__name__}")
        base = config.to_dict() if config is not None else dict(self.recipe_defaults)
        cfg = OptimizerConfig(**{**base, **kwargs})
        for r in regularizers:
            if not isinstance(r, RegularizationStrategy):
                raise TypeError(f"{owner}: regularizers must be RegularizationStrategy instances, got {r!r}")
        self.config = cfg
        self.regularizers = list(regularizers)
        defaults = {k: v for k, v in cfg.to_dict().items()
                    if k != "state_precision" and (v is not None or k == "max_lr")}
        defaults["eps"], defaults["betas"] = tuple(cfg.eps), tuple(cfg.betas)
        if cfg.alpha_mix_ratio is None:
            defaults["alpha_mix_ratio"] = 0.5
        super().__init__(params, defaults, state_precision=cfg.state_precision, **engine)
        note_capped_groups(self)

    def complete_group(self, group: dict) -> None:
        resolve_max_lr(group, type(self).__name__)

    # -- the shared head and tail of the chains ----------------------------------------------
    def _regularizers(self, hp: dict) -> list[Transform]:
        strategies: list[RegularizationStrategy] = []
        if hp.get("edge_suppression"):
            strategies.append(EdgeSuppression(hp["edge_threshold"], hp["edge_penalty"]))
        if hp.get("frequency_penalty", 0) > 0:
            strategies.append(FrequencyPenalty(hp["frequency_penalty"]))
        if hp.get("lora_rank_penalty"):
            strategies.append(LowRankPenalty(hp["rank_penalty_strength"]))
        strategies += self.regularizers
        return [Regularize(strategies)] if strategies else []

    def _head(self, hp: dict) -> list[Transform]:
        return [*self._regularizers(hp), Phase(OrthogonalGradient(), end="half_warmup"), AGR(),
                FactoredSecondMoment(came=bool(hp["came"]))]

    def _rows(self, hp: dict) -> list[Transform]:
        if hp["full_finetune"]:
            return []
        return [RowScaling(factored="came_v" if hp["came"] else None)]

    # -- diagnostics ---------------------------------------------------------------------------
    def get_group_lr(self, group: dict) -> float:
        """Mean per-element learning rate of a group's lr masks, scheduler ratio applied (the
        original's ``_get_group_lr``); the group's lr before the first step."""
        masks = [m for _, m in self.stored_lr_rates(group)]
        if not masks:
            return float(group["lr"])
        mean = torch.cat([m.float().abs().reshape(-1) for m in masks]).mean()
        return float(mean) * group["max_lr"] * group["lr"] / group.get("hina_lr0", group["lr"])

    _get_group_lr = get_group_lr

    def phase(self) -> str:
        """The current phase name (of the most advanced parameter)."""
        steps = [st["step"] for st in self.state.values() if "step" in st]
        return PHASES[phase_index(max(steps) if steps else 0, self.defaults["warmup_steps"])]

    def get_memory_stats(self) -> dict:
        """The Improved original's cache report. This implementation keeps no caches or pools."""
        return {"cache_size": 0, "max_cache_size": int(self.defaults["max_cache_size"]), "buffer_pools": {},
                "total_buffers": 0, "state_bytes_per_element": self.state_bytes_per_element()}

    def clear_cache(self) -> None:
        """Nothing to clear (no caches); kept for code written against the original."""

    def get_optimization_info(self) -> dict:
        return {"optimizer_type": type(self).__name__, "config": self.config.to_dict(), "phase": self.phase(),
                "total_params": sum(len(g["params"]) for g in self.param_groups),
                **diagnostics.role_counts(self), "state_precision": self.state_precision,
                "regularizers": [getattr(r, "name", type(r).__name__) for r in self.regularizers],
                "training_stats": {"global_step": diagnostics.global_step(self)}}

    def log_dict(self) -> dict[str, float]:
        """The engine's entries plus ``hina/phase`` (0 early warm-up .. 3 mature)."""
        out = super().log_dict()
        out["hina/phase"] = float(PHASES.index(self.phase()))
        return out

    def update_device(self, device) -> None:
        move_state(self, device)

    def step(self, closure=None):
        loss = super().step(closure)
        if self.defaults.get("verbose"):
            print(", ".join(f"group {i} lr {self.get_group_lr(g):.3e}" for i, g in enumerate(self.param_groups)))
        return loss


class Automagic_CameAMP(_AutomagicBase):  # noqa: N801 - the original's public name
    """See the module docstring."""

    def build_chain(self, hp: dict) -> Chain:
        tail: list[Transform] = [Grams(blend="grams_decay")]
        if hp["weight_decay"] > 0:
            tail.append(AdaptiveWeightDecay())
        return Chain([*self._head(hp), Phase(TorqueAwareMomentum(), end="half_warmup"), ConsistencyMomentum(),
                      CAMEConfidence(), *tail, *self._rows(hp), LRMask(granularity=hp["lr_mask_granularity"])])


def _mean_over_ranks(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``value`` averaged over the ranks of the default process group (DESIGN.md §5: under DDP
    every rank computes the same update, and each rank's loss differs); as is without one."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return value
    total = value.detach().to(device=device, dtype=torch.float32).clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return total / dist.get_world_size()


class Automagic_CameAMP_COptim(Automagic_CameAMP):  # noqa: N801
    """Automagic_CameAMP with the C-Optim context multiplier (transforms/context.py).

    Give it the loss: ``optimizer.step(closure)`` or ``optimizer.set_loss(loss)`` before
    ``step()`` (the sd-scripts hook does this). Without a loss it uses the global gradient norm
    as the signal and says so once; ``log_dict()`` reports ``hina/coptim/signal_is_loss``. Under
    ``torch.distributed`` each rank's loss is averaged over the ranks at ``step()`` (one
    all-reduce of a scalar), so data-parallel ranks keep identical parameters; every rank must
    therefore call ``step()``, as DDP training loops do."""

    def __init__(self, params: Iterable, config: Optional[OptimizerConfig] = None,
                 regularizers: Sequence[RegularizationStrategy] = (), **kwargs: Any) -> None:
        super().__init__(params, config, regularizers, **kwargs)
        d = self.defaults
        self.context = Context(d["context_window"], d["edge_threshold"], d["adaptation_rate"])
        self._loss: Optional[torch.Tensor] = None
        self._loss_count = 0

    @property
    def c_optim(self) -> Context:
        return self.context

    def set_loss(self, loss: Any) -> None:
        """The training loss of the coming step (a tensor -- no sync -- or a number). Several
        calls before one step (the micro-batches of gradient accumulation) average."""
        if isinstance(loss, torch.Tensor):
            value = loss.detach()
            value = (value if value.is_floating_point() else value.float()).mean()
        else:
            value = torch.tensor(float(loss))
        if self._loss is None:
            self._loss, self._loss_count = value, 1
        else:
            self._loss, self._loss_count = self._loss + value.to(self._loss.device), self._loss_count + 1

    def before_step(self, loss: Any) -> None:
        if loss is not None:
            self.set_loss(loss)
        signal, is_loss = self._loss, self._loss is not None
        if signal is not None and self._loss_count > 1:
            signal = signal / self._loss_count
        self._loss, self._loss_count = None, 0
        if signal is not None:
            signal = _mean_over_ranks(signal, self.param_groups[0]["params"][0].device)
        if signal is None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return
            device = grads[0].device
            signal = torch.stack([n.to(device) for n in torch._foreach_norm(grads)]).square().sum().sqrt()
            self.note_once("C-Optim: no loss given (step(closure) or set_loss(loss)); using the gradient norm "
                           "as the context signal")
        self.context.update(signal, is_loss)

    def build_chain(self, hp: dict) -> Chain:
        chain = super().build_chain(hp)
        return Chain([ContextRate(), *chain.transforms])

    def log_dict(self) -> dict[str, float]:
        out = super().log_dict()
        c = self.context
        if c.multiplier is not None:
            out["hina/coptim/multiplier"] = float(c.multiplier)
            out["hina/coptim/edge_cases"] = float(c.t["edge_cases"])
            out["hina/coptim/signal_is_loss"] = float(bool(c.signal_is_loss))
        return out

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["hina_context"] = self.context.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ctx = state_dict.pop("hina_context", None)
        super().load_state_dict(state_dict)
        # the context's settings follow the rule of resume_hparams like every hyperparameter
        hp = self.param_groups[0]
        window = int(hp.get("context_window", self.context.window))
        if self.resume_hparams == "saved" and window != self.context.window:
            self.context = Context(window, self.context.edge_threshold, self.context.adaptation_rate)
        self.context.edge_threshold = float(hp.get("edge_threshold", self.context.edge_threshold))
        self.context.adaptation_rate = float(hp.get("adaptation_rate", self.context.adaptation_rate))
        if ctx is not None:
            self.context.load_state_dict(ctx)


class Automagic_CameAMP_Improved(_AutomagicBase):  # noqa: N801
    """See the module docstring. ``edge_threshold`` is edge suppression's relative threshold here
    (default 0.6, the original's); in the C-Optim recipe it is the context's instability threshold."""

    recipe_defaults = {"edge_threshold": 0.6}

    def build_chain(self, hp: dict) -> Chain:
        mid: list[Transform] = [ConsistencyMomentum()]
        if hp["enable_dual_momentum"]:
            mid.append(DualMomentum())
        late: list[Transform] = [Phase(Cautious(), start="half_warmup")]
        if hp["background_regularization"]:
            late.append(Phase(Background(), start="half_warmup"))
        spatial = [SpatialAwareness()] if hp["spatial_awareness"] else []
        return Chain([NoDecoupledDecay(), *self._head(hp), *spatial, Phase(TorqueAwareMomentum(), end="half_warmup"),
                      *mid, CAMEConfidence(), Phase(Grams(), end="half_warmup"), *late, *self._rows(hp),
                      LRMask(d_coef=True, bump_scale=bool(hp["spatial_awareness"]),
                             granularity=hp["lr_mask_granularity"]),
                      Phase(SelectiveProjectionDecay(strength="weight_decay"), end="warmup")])


def _with_config_signature(cls: type) -> None:
    """Give the recipe a constructor of its own with an explicit signature (the config's fields
    and the engine options), so argument checking and ``help()`` see every setting; the inherited
    constructor is shared, so its signature cannot be set in place."""
    base_init = cls.__init__

    def __init__(self, params, config=None, regularizers=(), **kwargs):  # noqa: N807
        base_init(self, params, config, regularizers, **kwargs)

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
              inspect.Parameter("regularizers", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=())]
    for f in dataclasses.fields(OptimizerConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default))
    sig = inspect.signature(HinaOptimizer.__init__)
    for name in ENGINE_OPTIONS:
        if name != "state_precision" and name in sig.parameters:
            params.append(sig.parameters[name].replace(kind=inspect.Parameter.KEYWORD_ONLY))
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    __init__.__doc__ = cls.__doc__
    __init__.__qualname__ = f"{cls.__name__}.__init__"
    cls.__init__ = __init__


for _cls in (Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved):
    _with_config_signature(_cls)

#: the documented presets of the factories (the refactored original's), overridable
LORA_PRESET = dict(full_finetune=False, lora_rank_penalty=True, edge_suppression=True, spatial_awareness=True)
FULL_FINETUNE_PRESET = dict(full_finetune=True, lora_rank_penalty=False, edge_suppression=True,
                            spatial_awareness=True)


def create_lora_optimizer(params: Iterable, lr: float = 1e-6, **overrides: Any) -> Automagic_CameAMP_Improved:
    """Automagic_CameAMP_Improved with the documented LoRA preset (``LORA_PRESET``); any setting,
    the preset's included, can be overridden (the original raised TypeError, defect 64)."""
    return Automagic_CameAMP_Improved(params, **{**LORA_PRESET, "lr": lr, **overrides})


def create_full_finetune_optimizer(params: Iterable, lr: float = 1e-6,
                                   **overrides: Any) -> Automagic_CameAMP_Improved:
    """Automagic_CameAMP_Improved with the documented full fine-tune preset
    (``FULL_FINETUNE_PRESET``), overridable."""
    return Automagic_CameAMP_Improved(params, **{**FULL_FINETUNE_PRESET, "lr": lr, **overrides})
