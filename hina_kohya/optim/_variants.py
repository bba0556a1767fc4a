"""``*8bit`` classes: the same recipe with ``state_precision="8bit"`` as the default.

Use these names in Python or as sd-scripts short names. In a dotted ``--optimizer_type`` path use
the base class plus ``state_precision='8bit'``: sd-scripts sends any type name ending in ``8bit``
to its bitsandbytes branch before it looks at dotted paths.
"""

from __future__ import annotations

import functools
import inspect


def eight_bit_variant(base: type, name: str) -> type:
    sig = inspect.signature(base.__init__)
    params = [p.replace(default="8bit") if p.name == "state_precision" else p for p in sig.parameters.values()]

    @functools.wraps(base.__init__)
    def __init__(self, params, *args, state_precision: str = "8bit", **kwargs):  # noqa: N807
        base.__init__(self, params, *args, state_precision=state_precision, **kwargs)

    __init__.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    doc = f"{base.__name__} with 8-bit blockwise optimizer state by default (state_precision='8bit')."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__})
