"""Short names inside sd-scripts: wrappers around ``library.train_util`` (INTEGRATION.md §2.2).

sd-scripts resolves ``--optimizer_type`` in ``train_util.get_optimizer`` and every training script
calls it through the module attribute, so replacing the attribute redirects every call, including
calls made inside ``train_util``. The wrappers handle only names this package registers (any
case, the old fork's aliases, dotted paths into ``hina_kohya``) and pass every other name to the
original function unchanged. Installing them is idempotent (a marker on the wrapper), and nothing
here ever imports sd-scripts: a process without ``library.train_util`` loaded is left alone.
"""

from __future__ import annotations

import difflib
import functools
import logging
import sys
from typing import Any, Callable, Optional

from .. import registry
from ..args import parse_optimizer_args
from . import accel

log = logging.getLogger(__name__)

MARKER = "__hina_kohya_hook__"
LR_IN_OPTIMIZER_ARGS = ("optimizer_args sets lr; set the learning rate with --learning_rate (or --unet_lr / "
                        "--text_encoder_lr) instead.")


class SdScriptsArgumentError(AssertionError, ValueError):
    """A combination of sd-scripts arguments that sd-scripts itself rejects (it asserts); raised
    for our optimizer names with a message that says what to change."""


def _check_upstream_rules(args: Any) -> None:
    """The checks sd-scripts' ``get_optimizer`` runs before it resolves the name (§1.3)."""
    name = getattr(args, "optimizer_type", "")
    for flag, meaning in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, flag, False):
            raise SdScriptsArgumentError(
                f"--{flag} (the legacy switch to {meaning}) and --optimizer_type {name} are both given; "
                f"remove --{flag}.")
    if getattr(args, "fused_backward_pass", False):
        raise SdScriptsArgumentError(
            f"--fused_backward_pass works only with optimizer_type Adafactor in sd-scripts, not {name}; "
            "remove --fused_backward_pass.")


def build_registered_optimizer(args: Any, trainable_params: Any) -> Optional[tuple[str, str, Any]]:
    """sd-scripts' ``get_optimizer`` for our names: ``(qualified class name, "k=v,..." string,
    optimizer)`` as upstream returns it, or None when ``args.optimizer_type`` is not ours.
    ``optimizer_args`` are parsed exactly as sd-scripts parses them, then checked against the
    class (unknown names get a suggestion, bad values a message naming the fix)."""
    spec = registry.resolve(getattr(args, "optimizer_type", "") or "")
    if spec is None:
        return None
    _check_upstream_rules(args)
    kwargs = parse_optimizer_args(getattr(args, "optimizer_args", None) or [], spec.cls)
    if "lr" in kwargs:
        raise SdScriptsArgumentError(LR_IN_OPTIMIZER_ARGS)
    optimizer = spec.cls(trainable_params, lr=getattr(args, "learning_rate", None), **kwargs)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    accel.track(optimizer)
    accel.install()  # accelerate is imported by now even where it was not when the hooks went in
    name = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
    rendered = ",".join(f"{k}={v}" for k, v in kwargs.items())
    groups = optimizer.param_groups
    total = sum(len(g["params"]) for g in groups)
    named = sum(len(g["params"]) for g in groups if g.get("param_names") or g.get("named"))
    log.info("hina_kohya: %s resolved to %s (%s); %d group(s), %d of %d parameters named", args.optimizer_type, name,
             rendered or "defaults", len(groups), named, total)
    if spec.uses_names and named == 0 and total:
        log.warning("hina_kohya: no parameter names reached %s: its LoRA/LoKr-aware features stay off. Train with "
                    "a wrapper network module (--network_module hina_kohya.networks.lycoris, "
                    "hina_kohya.networks.lora, ...).", spec.name)
    return name, rendered, optimizer


def train_eval_for(optimizer: Any) -> Optional[tuple[Callable, Callable]]:
    """The optimizer's own ``train`` / ``eval`` when it is one of ours and needs them (through
    accelerate's wrapper too), else None."""
    inner = optimizer
    for _ in range(4):  # AcceleratedOptimizer -> ours; never loops forever on odd wrappers
        spec = registry.find(type(inner).__name__)
        if spec is not None and isinstance(inner, spec.cls):
            return (inner.train, inner.eval) if spec.train_eval else None
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            return None
    return None


def _close_names(optimizer_type: Any) -> str:
    """Our registered names close to an unresolved ``--optimizer_type`` ("" when none is)."""
    if not isinstance(optimizer_type, str) or not optimizer_type.strip():
        return ""
    from ..check import UPSTREAM  # sd-scripts' own names (AdamW8bit, ...) are not typos of ours

    if optimizer_type.strip().lower() in UPSTREAM:
        return ""
    last = optimizer_type.strip().rpartition(".")[2].lower()
    names = registry.list_optimizers(include_aliases=True)
    close = difflib.get_close_matches(last, [n.lower() for n in names], n=3, cutoff=0.75)
    return ", ".join(n for n in names if n.lower() in close)


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def install() -> bool:
    """Wrap ``library.train_util.get_optimizer`` and ``get_optimizer_train_eval_fn`` once, and the
    accelerate hooks (``accel.install``). Returns False when sd-scripts is not loaded."""
    tu = sys.modules.get("library.train_util")
    if tu is None:
        return False
    original = getattr(tu, "get_optimizer", None)
    if original is not None and not getattr(original, MARKER, False):
        @functools.wraps(original)
        def get_optimizer(*args: Any, **kwargs: Any) -> Any:
            cli_args = _arg(args, kwargs, 0, "args")
            built = build_registered_optimizer(cli_args, _arg(args, kwargs, 1, "trainable_params"))
            if built is not None:
                return built
            try:
                return original(*args, **kwargs)
            except (AttributeError, ModuleNotFoundError) as exc:  # sd-scripts' generic branch found nothing
                hint = _close_names(getattr(cli_args, "optimizer_type", ""))
                if not hint:
                    raise
                try:  # a typo of one of our names: say so next to sd-scripts' own error
                    richer = type(exc)(f"{exc} (hina_kohya: did you mean {hint}?)")
                except Exception:  # an exception type that takes other arguments: keep it as it is
                    raise exc from None
                if isinstance(exc, ImportError):
                    richer.name, richer.path = exc.name, exc.path
                raise richer from exc

        setattr(get_optimizer, MARKER, True)
        tu.get_optimizer = get_optimizer
    original_te = getattr(tu, "get_optimizer_train_eval_fn", None)
    if original_te is not None and not getattr(original_te, MARKER, False):
        @functools.wraps(original_te)
        def get_optimizer_train_eval_fn(*args: Any, **kwargs: Any) -> Any:
            ours = train_eval_for(_arg(args, kwargs, 0, "optimizer"))
            return ours if ours is not None else original_te(*args, **kwargs)

        setattr(get_optimizer_train_eval_fn, MARKER, True)
        tu.get_optimizer_train_eval_fn = get_optimizer_train_eval_fn
    accel.install()
    return True
