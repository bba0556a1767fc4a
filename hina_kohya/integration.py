"""What the diffs in ``patches/`` call (INTEGRATION.md §6): a stable, small surface, so that an
edited sd-scripts or LyCORIS file needs two lines per hook. The wrapper network modules and the
launcher do the same without editing any file.

* ``build_registered_optimizer(args, trainable_params)``: sd-scripts' ``get_optimizer`` triple for
  our optimizer names, None for any other name.
* ``train_eval_fn(optimizer)``: (train, eval) of our optimizers that need them, else None.
* ``split_param_groups(network, groups, descriptions)``: named, decay-split groups and aligned
  descriptions (the wrappers' default options).
"""

from __future__ import annotations

from typing import Any, Optional

from .kohya.hooks import build_registered_optimizer
from .kohya.hooks import train_eval_for as train_eval_fn
from .networks.groups import GroupOptions
from .networks.groups import split_param_groups as _split

__all__ = ["build_registered_optimizer", "split_param_groups", "train_eval_fn"]


def split_param_groups(network: Any, groups: Any, descriptions: Optional[list] = None) -> tuple[list, list]:
    return _split(network, list(groups), None if descriptions is None else list(descriptions), GroupOptions())
