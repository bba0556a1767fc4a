"""Hooks into kohya sd-scripts (INTEGRATION.md §2): short optimizer names, train/eval wiring,
the loss for C-Optim and diagnostics in the trainer's logs. ``install()`` is what importing a
``hina_kohya.networks`` module and ``python -m hina_kohya.launch`` run."""

from .hooks import SdScriptsArgumentError, build_registered_optimizer, install, train_eval_for

__all__ = ["SdScriptsArgumentError", "build_registered_optimizer", "install", "train_eval_for"]
