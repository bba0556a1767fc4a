"""``hina-kohya check-args``: sd-scripts optimizer arguments checked before a run starts.

Everything is parsed the way sd-scripts parses it (``args.split_items``: one ``=``, literal
values) and checked against the optimizer's constructor; unlike a training run, which stops at
the first bad value, every problem is reported, each with its fix.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional

import torch

from . import registry
from .args import OptimizerArgumentError, collect_items, signature_defaults, validate_one
from .kohya.hooks import LR_IN_OPTIMIZER_ARGS

# names sd-scripts resolves itself (INTEGRATION.md §1.3), lower-cased
UPSTREAM = ("adamw", "adamw8bit", "lion", "lion8bit", "sgdnesterov", "sgdnesterov8bit", "pagedadamw8bit",
            "pagedlion8bit", "pagedadamw", "pagedadamw32bit", "prodigy", "adafactor", "dadaptation",
            "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptlion", "dadaptsgd", "dadaptadampreprint",
            "dadaptadanip", "radamschedulefree", "adamwschedulefree", "sgdschedulefree")


def check_optimizer(optimizer_type: str, items: Optional[Iterable[str]],
                    learning_rate: Any = None) -> tuple[list[str], list[str]]:
    """(problems, notes) for an ``--optimizer_type`` / ``--optimizer_args`` pair."""
    problems: list[str] = []
    notes: list[str] = []
    if optimizer_type is not None and not isinstance(optimizer_type, str):
        return [f"optimizer_type must be a string, e.g. optimizer_type = \"HinaAdamW\", not {optimizer_type!r}"], notes
    spec = registry.resolve(optimizer_type or "")
    if spec is None:
        low = (optimizer_type or "").strip().lower()
        if (not low or low in UPSTREAM or ("." in low and not low.startswith("hina_kohya."))
                or hasattr(torch.optim, (optimizer_type or "").strip())):
            notes.append(f"optimizer_type {optimizer_type!r} is not a hina_kohya optimizer: sd-scripts resolves it "
                         "itself; only the argument syntax is checked.")
            _syntax(items, problems)
            return problems, notes
        names = registry.list_optimizers(include_aliases=True)
        last = low.rpartition(".")[2]
        close = difflib.get_close_matches(last, [n.lower() for n in names], n=3, cutoff=0.5)
        shown = [n for n in names if n.lower() in close]
        hint = f" Did you mean {', '.join(shown)}?" if shown else ""
        problems.append(f"optimizer_type {optimizer_type!r} is not a registered optimizer.{hint} "
                        f"Known: {', '.join(registry.list_optimizers())} (any case).")
        return problems, notes
    if "." in optimizer_type and optimizer_type.strip().lower().endswith("8bit"):
        base = f"{spec.cls.__module__.split('.')[0]}.{spec.cls.__name__.removesuffix('8bit')}"
        notes.append(f"optimizer_type {optimizer_type!r}: sd-scripts routes names ending in 8bit through its "
                     f"bitsandbytes branch first, so bitsandbytes must import; optimizer_type={base} with "
                     "optimizer_args state_precision='8bit' (the presets' form) avoids that.")
    notes.append(f"optimizer_type {optimizer_type!r} -> {spec.cls.__module__}.{spec.cls.__name__}")
    kwargs = _syntax(items, problems)
    defaults = signature_defaults(spec.cls)
    valid: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "lr":
            problems.append(LR_IN_OPTIMIZER_ARGS)
            continue
        try:
            valid[key] = validate_one(spec.name, defaults, key, value)
        except OptimizerArgumentError as exc:
            problems.append(str(exc))
    if learning_rate is not None:
        valid["lr"] = learning_rate
    problems.extend(_ranges(spec.cls, valid))
    return problems, notes


def _syntax(items: Optional[Iterable[str]], problems: list[str]) -> dict[str, Any]:
    """Every item, so that one bad item does not hide the next."""
    out, found = collect_items(items)
    problems.extend(str(exc) for exc in found)
    return out


def _ranges(cls: type, kwargs: dict[str, Any]) -> list[str]:
    """Range rules run in the constructor: build on a dummy parameter, one argument at a time."""
    out = []
    probe = [torch.nn.Parameter(torch.zeros(2, 2))]
    for key, value in kwargs.items():
        try:
            cls(probe, **{key: value})
        except (OptimizerArgumentError, ValueError, TypeError) as exc:
            out.append(str(exc))
    return out


def check_config(text: str) -> tuple[list[str], list[str]]:
    """(problems, notes) for an sd-scripts ``--config_file`` TOML: value types (TOML values get no
    conversion in sd-scripts), the optimizer and its arguments, and our ``hina_*`` network args."""
    from .networks.groups import pop_options
    from .presets import read_config

    try:
        values = read_config(text)
    except Exception as exc:  # toml's decode errors carry the line
        return [f"not valid TOML: {exc}"], []
    problems: list[str] = []
    for key in ("optimizer_args", "network_args", "lr_scheduler_args"):
        v = values.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            problems.append(f"{key} must be an array of strings, e.g. {key} = [\"k=v\"], not {v!r} "
                            "(sd-scripts would iterate a bare string character by character).")
    for key in ("learning_rate", "unet_lr", "max_grad_norm"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            problems.append(f"{key} = {v!r} must be a number (quotes make it a string in TOML).")
    network_args = values.get("network_args") or []
    if isinstance(network_args, list):
        kwargs = dict(item.split("=", 1) for item in network_args if isinstance(item, str) and "=" in item)
        try:
            pop_options(kwargs)
        except ValueError as exc:
            problems.append(str(exc))
    items = values.get("optimizer_args") if isinstance(values.get("optimizer_args"), list) else []
    lr = values.get("learning_rate") if isinstance(values.get("learning_rate"), (int, float)) else None
    more, notes = check_optimizer(values.get("optimizer_type", ""), items, lr)
    return problems + more, notes
