"""``--optimizer_args`` parsing and hyperparameter validation.

Parsing follows kohya sd-scripts' ``get_optimizer`` exactly: each item is split on ``=`` into
exactly two parts, the key is used verbatim and the value goes through ``ast.literal_eval``
(literals only: no code is ever evaluated). So ``betas=0.9,0.999`` and ``betas=(0.9,0.999)`` are
tuples, ``weight_decay=0`` is the int 0, booleans are ``True``/``False``. On top of sd-scripts,
values are coerced to the type of the constructor's default (int 0 -> 0.0 for a float argument,
a list -> tuple for ``betas``) and checked against the rules below; every error names the
argument, the value and the fix.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
from typing import Any, Callable, Iterable, Optional


class OptimizerArgumentError(ValueError):
    """A bad optimizer argument (wrong type or out of range)."""


class UnknownOptimizerArgument(OptimizerArgumentError, TypeError):
    """An argument the optimizer does not take. Also a TypeError, as Python raises for unknown
    keyword arguments."""


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x: Any) -> bool:
    return _num(x) and math.isfinite(x)


def _each(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, (tuple, list)):
            return len(v) > 0 and all(pred(x) for x in v)
        return pred(v)

    return check


# name -> (predicate, what is allowed). Shared by every recipe; a recipe's own arguments add rows.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "betas": (_each(lambda b: _finite(b) and 0 <= b < 1), "numbers in [0, 1), e.g. betas=(0.9,0.999)"),
    "eps": (_each(lambda e: _finite(e) and e > 0), "a number > 0 (or a tuple of them)"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "spd_lambda": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "tam_beta": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "alora_ratio": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "riemannian_reg": (lambda v: _finite(v) and v > 0, "a finite number > 0, e.g. 1e-2"),
    "wd_transition_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "wd_decay_factor": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "wd_min_ratio": (lambda v: _finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_8bit_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "optim_bits": (lambda v: v in (8, 32), "8 or 32"),
    "state_precision": (lambda v: v in ("fp32", "bf16", "8bit"), "'fp32', 'bf16' or '8bit'"),
    "bf16_rounding": (lambda v: v in ("stochastic", "kahan", "nearest"), "'stochastic', 'kahan' or 'nearest'"),
    "resume_hparams": (lambda v: v in ("saved", "new"), "'saved' or 'new'"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
}
# switches: a string such as "False" would silently count as True
_SWITCHES = ("use_spd", "use_cautious", "use_orthogonal_grad", "use_adopt_stability", "use_grams", "use_agr", "use_tam",
             "use_alora", "use_riemannian", "dynamic_weight_decay", "use_dynamic_adaptation", "use_lr_mask", "came", "full_finetune",
             "verbose", "edge_suppression", "background_regularization", "spatial_awareness", "lora_rank_penalty",
             "enable_cache", "enable_dual_momentum", "use_approximate_svd", "enable_stage_optimization", "foreach",
             "skip_nonfinite", "master_weights", "amsgrad", "block_wise", "is_paged")
RULES.update({name: (lambda v: isinstance(v, bool), "True or False") for name in _SWITCHES})
RULES["fused"] = (lambda v: v is None or isinstance(v, bool), "None, True or False")


def check_hparams(owner: str, values: dict[str, Any], extra_rules: Optional[dict] = None) -> None:
    """Raise OptimizerArgumentError for the first value that breaks a rule."""
    rules = dict(RULES)
    if extra_rules:
        rules.update(extra_rules)
    for name, value in values.items():
        rule = rules.get(name)
        if rule is None:
            continue
        pred, allowed = rule
        if not pred(value):
            what = "is not allowed" if allowed in ("True or False", "None, True or False") else "is out of range"
            raise OptimizerArgumentError(f"{owner}: {name}={value!r} {what}; {name} must be {allowed}.")


def signature_defaults(cls: type) -> dict[str, Any]:
    """Keyword arguments of ``cls.__init__`` and their defaults (``inspect.Parameter.empty`` if none)."""
    sig = inspect.signature(cls.__init__)
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if name in ("self", "params") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = p.default
    return out


def suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.strip(), list(choices), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def coerce(owner: str, name: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` or raise a message naming the fix."""
    def bad(expected: str) -> OptimizerArgumentError:
        return OptimizerArgumentError(f"{owner}: {name}={value!r} has the wrong type; expected {expected} "
                                      f"(default {default!r}).")

    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("True or False (capitalised)")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if isinstance(default, float):
        if _num(value):
            return float(value)
        raise bad("a number")
    if isinstance(default, tuple):
        if _num(value) and len(default) == 1:
            return (float(value),)
        if isinstance(value, (tuple, list)) and len(value) == len(default) and all(_num(v) for v in value):
            return tuple(float(v) for v in value)
        raise bad(f"a tuple of {len(default)} numbers, e.g. {name}={default!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad(f"a quoted string, e.g. {name}='{default}'")
    return value


def validate_kwargs(cls: type, kwargs: dict[str, Any], owner: Optional[str] = None) -> dict[str, Any]:
    """Check names against ``cls``'s constructor, coerce types; range rules run in the constructor."""
    owner = owner or cls.__name__
    defaults = signature_defaults(cls)
    return {name: validate_one(owner, defaults, name, value) for name, value in kwargs.items()}


def validate_one(owner: str, defaults: dict[str, Any], name: str, value: Any) -> Any:
    """One argument against the constructor's ``defaults`` (``signature_defaults``): the coerced
    value, or UnknownOptimizerArgument / OptimizerArgumentError naming the fix."""
    if name not in defaults:
        hint = suggest(name, defaults)
        if name != name.strip():
            hint = (f" The key has surrounding spaces ({name!r}); sd-scripts keeps keys verbatim, write "
                    f"'{name.strip()}=...' with no spaces around '='.") + hint
        raise UnknownOptimizerArgument(f"{owner} has no argument {name!r}.{hint}")
    return coerce(owner, name, value, defaults[name])


def refuse_unknown(cls: type, unknown: dict[str, Any]) -> None:
    """For constructors that take ``**unknown``: Python's own message for an unexpected keyword
    names no alternative; this one suggests the closest valid argument."""
    if unknown:
        defaults = signature_defaults(cls)
        for name, value in unknown.items():
            validate_one(cls.__name__, defaults, name, value)


def parse_literal(key: str, raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    # TypeError: an unhashable set / dict key ("{[]: 1}"); RecursionError / MemoryError: absurd nesting
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
        low = raw.strip().lower()
        if low in ("true", "false", "none"):
            fix = f"write {key}={low.capitalize()} (capitalised)"
        elif low in ("inf", "+inf", "-inf", "nan"):
            fix = f"write {key}={'-' if low.startswith('-') else ''}1e999 for infinity"
        else:
            fix = f"quote strings as {key}='{raw}'"
        raise OptimizerArgumentError(
            f"optimizer_args: the value of {key!r} ({raw!r}) is not a Python literal ({type(exc).__name__}); "
            f"{fix}.") from None


def split_items(items: Optional[Iterable[str]]) -> dict[str, Any]:
    """sd-scripts' rule: ``key=value`` with exactly one '=', value through ast.literal_eval.
    Raises the first problem (``collect_items`` has them all)."""
    out, problems = collect_items(items)
    if problems:
        raise problems[0]
    return out


def collect_items(items: Optional[Iterable[str]]) -> tuple[dict[str, Any], list[OptimizerArgumentError]]:
    """``split_items`` that goes on past a bad item: the parsed items and every problem, in order."""
    out: dict[str, Any] = {}
    problems: list[OptimizerArgumentError] = []
    for item in items or []:
        try:
            if not isinstance(item, str):
                raise OptimizerArgumentError(f"optimizer_args: items must be strings 'key=value', got {item!r}")
            parts = item.split("=")
            if len(parts) != 2:
                raise OptimizerArgumentError(
                    f"optimizer_args: {item!r} must be exactly one 'key=value' pair with a single '=' "
                    f"(sd-scripts splits on every '='); found {len(parts) - 1}.")
            key, raw = parts
            if key in out:
                raise OptimizerArgumentError(f"optimizer_args: {key!r} is given twice; keep one.")
            out[key] = parse_literal(key, raw)
        except OptimizerArgumentError as exc:
            problems.append(exc)
    return out, problems


def parse_optimizer_args(items: Optional[Iterable[str]], cls: Optional[type] = None) -> dict[str, Any]:
    """Parse ``["k=v", ...]`` like sd-scripts; with ``cls``, also check names and coerce types."""
    kwargs = split_items(items)
    if cls is not None:
        kwargs = validate_kwargs(cls, kwargs)
    return kwargs
