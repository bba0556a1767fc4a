"""The training loop's side of the integration, through accelerate (sd-scripts is never edited).

sd-scripts' ``NetworkTrainer`` cannot be patched (INTEGRATION.md §2.1), but every training script
drives the step through one ``accelerate.Accelerator``; two of its methods are wrapped, for
optimizers built through our hook only (``track``):

* ``Accelerator.backward(loss)``: the loss reaches ``optimizer.set_loss`` (C-Optim's context
  signal). Micro-batches of one accumulated step average there; with several processes the
  optimizer averages the signal across them at its step (one collective per step, not per
  micro-batch), so every rank sees the same signal and parameters stay identical.

and the ``log`` method of every tracker class in ``accelerate.tracking`` (TensorBoard, W&B, ...:
sd-scripts logs through the trackers directly, ``Accelerator.log`` ends there too): when the
values are sd-scripts' step logs (keys ``lr/...``), ``optimizer.log_dict()`` joins them as
``hina/...``, on the first optimizer step and every ``HINA_KOHYA_LOG_EVERY`` steps after it
(default 10; computing it reads a few statistics back from the device, so not every step).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import weakref
from typing import Any

log = logging.getLogger(__name__)

MARKER = "__hina_kohya_hook__"
LOG_EVERY_ENV = "HINA_KOHYA_LOG_EVERY"

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_cache: dict[str, Any] = {"step": None, "values": {}}  # one computation per optimizer step, for every tracker


def track(optimizer: Any) -> None:
    """Feed losses to and log diagnostics of this optimizer (built by the sd-scripts hook)."""
    _LIVE.add(optimizer)


def log_every() -> int:
    raw = os.environ.get(LOG_EVERY_ENV, "10")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{LOG_EVERY_ENV}={raw!r}: give a whole number of logged steps >= 1, e.g. 10")
    return value


def diagnostics() -> dict[str, float]:
    """``log_dict()`` of the tracked optimizers; with several (blockwise training), keys get the
    optimizer's index: ``hina0/...``."""
    live = [o for o in list(_LIVE) if callable(getattr(o, "log_dict", None))]
    if len(live) == 1:
        return live[0].log_dict()
    out: dict[str, float] = {}
    for i, opt in enumerate(live):
        out.update({k.replace("hina/", f"hina{i}/", 1): v for k, v in opt.log_dict().items()})
    return out


def step_diagnostics() -> dict[str, float]:
    """``diagnostics()`` when the tracked optimizers' step is due (1, 1 + N, 1 + 2N, ...), else
    {}; several trackers logging one step share one computation."""
    steps = [getattr(o, "step_count", 0) for o in list(_LIVE)]
    step = max(steps) if steps else 0
    if step == 0 or (step - 1) % log_every() != 0:
        return {}
    if _cache["step"] != step:
        _cache.update(step=step, values=diagnostics())
    return _cache["values"]


def _wrap_tracker_log(cls: type) -> None:
    log_fn = cls.__dict__.get("log")
    if log_fn is None or getattr(log_fn, MARKER, False):
        return

    @functools.wraps(log_fn)
    def hina_log(self: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
        if _LIVE and isinstance(values, dict) and any(str(k).startswith("lr/") for k in values):
            values = {**values, **step_diagnostics()}
        return log_fn(self, values, *args, **kwargs)

    setattr(hina_log, MARKER, True)
    cls.log = hina_log


def _feed_loss(accelerator: Any, loss: Any) -> None:
    takers = [o for o in list(_LIVE) if callable(getattr(o, "set_loss", None))]
    if not takers or not hasattr(loss, "detach"):
        return
    value = loss.detach().float().mean()
    for opt in takers:
        opt.set_loss(value)


def install() -> bool:
    """Wrap ``accelerate.Accelerator.backward`` and the trackers' ``log`` once. False when
    accelerate is not loaded (it is never imported from here)."""
    acc = sys.modules.get("accelerate")
    cls = getattr(acc, "Accelerator", None) if acc is not None else None
    if cls is None:
        return False
    log_every()  # a bad HINA_KOHYA_LOG_EVERY fails here, at start-up, not at the first log
    backward = getattr(cls, "backward", None)
    if backward is not None and not getattr(backward, MARKER, False):
        @functools.wraps(backward)
        def hina_backward(self: Any, loss: Any, *args: Any, **kwargs: Any) -> Any:
            _feed_loss(self, loss)
            return backward(self, loss, *args, **kwargs)

        setattr(hina_backward, MARKER, True)
        cls.backward = hina_backward
    tracking = sys.modules.get("accelerate.tracking") or getattr(acc, "tracking", None)
    base = getattr(tracking, "GeneralTracker", None)
    if isinstance(base, type):
        for tracker in list(vars(tracking).values()):
            if isinstance(tracker, type) and issubclass(tracker, base) and tracker is not base:
                _wrap_tracker_log(tracker)
    return True
