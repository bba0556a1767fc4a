"""What every wrapper network module shares (INTEGRATION.md §3.3).

A wrapper module re-exports ``create_network`` and ``create_network_from_weights`` of the module
it wraps, forwards every other attribute to it, and patches the *returned network instance*:
its ``prepare_optimizer_params[_with_multiple_te_lrs]`` gain names and decay groups
(``groups.split_param_groups``). The network is never proxied, so its ``state_dict`` keys (the
saved adapter file), its type and its feature probes stay exactly the wrapped module's.
Importing a wrapper installs the sd-scripts hooks (``hina_kohya.kohya.install``).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..kohya import install
from .groups import GroupOptions, pop_options, split_param_groups

MARK = "__hina_kohya_groups__"
METHODS = ("prepare_optimizer_params_with_multiple_te_lrs", "prepare_optimizer_params")
SD_SCRIPTS = ("an sd-scripts checkout: run the training script from the sd-scripts folder (its networks/ package "
              "must be importable)")
LYCORIS = "the lycoris-lora package: pip install lycoris-lora"


def _groups_method(network: Any, original: Callable, options: GroupOptions) -> Callable:
    def prepare(*args: Any, **kwargs: Any) -> tuple[list[dict], list[str]]:
        result = original(*args, **kwargs)  # a TypeError here is the caller's, for sd-scripts' retry
        groups, descriptions = result if isinstance(result, tuple) else (result, None)
        return split_param_groups(network, list(groups), None if descriptions is None else list(descriptions), options)

    setattr(prepare, MARK, True)
    return prepare


def _save_method(original: Callable, ours: str, base: str) -> Callable:
    def save_weights(file: Any, dtype: Any, metadata: Any, *args: Any, **kwargs: Any) -> Any:
        # sd-scripts records --network_module; tools that load the file key on the real module
        if isinstance(metadata, dict) and metadata.get("ss_network_module") == ours:
            metadata = {**metadata, "ss_network_module": base, "ss_hina_network_module": ours}
        return original(file, dtype, metadata, *args, **kwargs)

    setattr(save_weights, MARK, True)
    return save_weights


def patch_network(network: Any, options: GroupOptions, ours: str, base: str) -> Any:
    """Give one network instance named, decay-split optimizer groups (once)."""
    for name in METHODS:
        original = getattr(network, name, None)
        if callable(original) and not getattr(original, MARK, False):
            object.__setattr__(network, name, _groups_method(network, original, options))
    save = getattr(network, "save_weights", None)
    if callable(save) and not getattr(save, MARK, False):
        object.__setattr__(network, "save_weights", _save_method(save, ours, base))
    return network


def expose(ours: str, base: str, requirement: str) -> tuple[Callable, Callable, Callable]:
    """``create_network``, ``create_network_from_weights`` and a module ``__getattr__`` for the
    wrapper module ``ours`` around ``base``. Raises ImportError naming what to install when
    ``base`` cannot be imported."""
    try:
        module = importlib.import_module(base)
    except ImportError as exc:
        raise ImportError(f"{ours} wraps {base}, which cannot be imported here ({exc}); it needs {requirement}.") \
            from exc
    install()

    def create_network(*args: Any, **kwargs: Any) -> Any:
        options = pop_options(kwargs)
        network = module.create_network(*args, **kwargs)
        return None if network is None else patch_network(network, options, ours, base)

    def create_network_from_weights(*args: Any, **kwargs: Any) -> Any:
        options = pop_options(kwargs)
        result = module.create_network_from_weights(*args, **kwargs)
        network = result[0] if isinstance(result, tuple) else result
        if network is not None:
            patch_network(network, options, ours, base)
        return result

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(module, name)

    return create_network, create_network_from_weights, __getattr__
