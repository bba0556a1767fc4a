"""The recommended configurations as sd-scripts ``--config_file`` TOML files (``configs/``, shipped
in the wheel), and the same presets for Python.

    hina-kohya presets list / show NAME / export NAME     # the command line
    opt = create_from_preset("lokr-sd", groups)            # Python: the preset's class and arguments

Files are read the way sd-scripts reads a config file (``read_config``): every table's keys are
merged into one namespace, a later table overriding an earlier one; ``optimizer_args`` are parsed
as sd-scripts parses them (literals only, no code is evaluated).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

import toml

from . import registry
from .args import validate_kwargs, split_items

CONFIG_DIR = Path(__file__).with_name("configs")


def list_presets() -> list[str]:
    """The preset names (file names without ``.toml``), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    """The file of a preset; an unknown name raises KeyError listing the close and all names."""
    names = list_presets()
    key = str(name).strip().lower()
    if key.endswith(".toml"):
        key = key[:-5]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown preset {name!r}.{hint} Available: {', '.join(names)}.")
    return CONFIG_DIR / f"{key}.toml"


def preset_text(name: str) -> str:
    return preset_path(name).read_text(encoding="utf-8")


def description(name: str) -> str:
    """The preset's leading comment, as one line (what it is for)."""
    lines = []
    for line in preset_text(name).splitlines():
        if not line.startswith("#") or line.startswith("# Use:"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def read_config(text: str) -> dict[str, Any]:
    """A config file's values as sd-scripts sees them: top-level keys kept, each table's keys merged
    into one namespace in file order (a later table overrides an earlier one), deeper tables
    left as dicts (INTEGRATION.md §5)."""
    data = toml.loads(text)
    flat: dict[str, Any] = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for value in data.values():
        if isinstance(value, dict):
            flat.update(value)
    return flat


def load_preset(name: str) -> dict[str, Any]:
    """The preset's optimizer arguments for Python use: ``lr`` and every ``optimizer_args`` entry,
    parsed and type-checked against the preset's class (``preset_class``)."""
    return _read(name)[1]


def preset_class(name: str) -> type:
    """The optimizer class a preset names (by dotted path)."""
    return _read(name)[0]


def create_from_preset(name: str, params: Iterable, **overrides: Any):
    """Build the preset's optimizer over ``params``; ``overrides`` replace preset arguments."""
    cls, kwargs = _read(name)
    return cls(params, **{**kwargs, **validate_kwargs(cls, overrides)})


def _read(name: str) -> tuple[type, dict[str, Any]]:
    """The preset's class and its checked arguments, from one read of its file."""
    values = read_config(preset_text(name))
    optimizer_type = values.get("optimizer_type", "")
    spec = registry.resolve(optimizer_type)
    if spec is None:  # pragma: no cover - the shipped presets are tested
        raise ValueError(f"preset {name!r}: optimizer_type {optimizer_type!r} is not a hina_kohya optimizer")
    kwargs = validate_kwargs(spec.cls, split_items(values.get("optimizer_args", [])))
    return spec.cls, {"lr": float(values["learning_rate"]), **kwargs}
