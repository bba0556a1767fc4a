"""Long runs with every technique on (issue 7): no NaN, the lr masks stay within [min_lr, max_lr],
and nothing grows -- neither the optimizer state, nor the optimizer's Python-side bookkeeping
(histories, windows, caches), nor live tensors; in the long runs, nor the process's memory.
(Python-level allocation tracing was tried and dropped: torch's own small allocations inside
``torch.tensor`` drift by tens of KB over thousands of steps, a signal no threshold separates from
a real leak of ours; a leaked tensor shows in the live-tensor count.)

CI runs 400 steps per recipe (every schedule -- warm-up, decay transition, relationship refresh,
context windows -- has turned over several times by then); ``python -m pytest -m slow
tests/test_long_runs.py`` runs 10,000."""

from __future__ import annotations

import gc
import math
import warnings
from collections import deque

import pytest
import torch

from hina_kohya import (AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        HinaAdamW)
from hina_kohya.args import signature_defaults
from hina_kohya.bench.step import resident_bytes
from helpers import TinyLoRANet, batch, every_technique

RECIPES = [HinaAdamW, AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved]
CASES = [(cls, "fp32") for cls in RECIPES] + [(cls, "8bit") for cls in (HinaAdamW, Automagic_CameAMP_COptim)]
IDS = [f"{cls.__name__}-{p}" for cls, p in CASES]
# schedules short enough to turn over many times in the CI-sized run
SHORT = dict(warmup_steps=40, wd_transition_steps=30, relationship_discovery_interval=25, context_window=20)
MIN_LR, MAX_LR = 1e-5, 5e-3


def _optimizer(cls, model, precision):
    # a large lr bump: the lr masks reach their bounds
    kw = every_technique(cls, if_accepted={**SHORT, "min_lr": MIN_LR, "max_lr": MAX_LR, "lr_bump": 1e-4})
    return cls(model.groups(lrs=(2e-3, 1e-3)), state_precision=precision, min_8bit_size=1, **kw)


def _footprint(obj, seen=None, depth=0) -> int:
    """Elements held by ``obj``: container lengths, tensor sizes, recursively (cycles once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 12:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return len(obj) + sum(_footprint(k, seen, depth + 1) + _footprint(v, seen, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset, deque)):
        return len(obj) + sum(_footprint(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.startswith("hina_kohya"):
        return _footprint(vars(obj), seen, depth + 1)
    return 1


def _bookkeeping(opt) -> dict[str, int]:
    """The optimizer's own attributes (the recipe's transforms, context, caches), not its state:
    elements held per attribute."""
    skip = {"state", "param_groups", "defaults"}
    return {k: _footprint(v) for k, v in vars(opt).items() if k not in skip and not k.startswith("_optimizer_")}


def _state_layout(opt) -> list:
    return sorted((idx, key, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (idx, key, type(v).__name__)
                  for idx, st in opt.state_dict()["state"].items() for key, v in st.items())


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_bytes() -> int:
    """The process's resident memory now (Linux), or its peak elsewhere."""
    try:
        return resident_bytes()
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_healthy(opt, model, step):
    for p in model.parameters():
        assert torch.isfinite(p).all(), f"step {step}: non-finite parameter"
    masks = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert torch.isfinite(value).all(), f"step {step}: non-finite state {key}"
            if "lr_mask" in opt.state[p]:
                rates = opt.state[p]["lr_mask"].float().abs() * group["max_lr"]
                tol = 2.0 ** -10  # fp16 storage of L / max_lr
                assert rates.min() >= group["min_lr"] * (1 - tol) and rates.max() <= group["max_lr"] * (1 + tol), step
                masks += 1
    return masks


def _long_run(cls, precision, steps, watch_memory):
    torch.manual_seed(0)
    model = TinyLoRANet(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = _optimizer(cls, model, precision)
    settle = steps // 4  # every schedule has turned over; from here nothing may grow
    losses, at_settle = [], None
    for step in range(steps):
        x, y = batch(step % 97, model.dims)  # a finite data set, revisited
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if hasattr(opt, "set_loss") and step % 2:
            opt.set_loss(loss)  # loss and gradient-norm signals alternate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        losses.append(float(loss))
        if step + 1 == settle:
            opt.log_dict()
            at_settle = (_state_layout(opt), _bookkeeping(opt), _live_tensors())
        if watch_memory and step + 1 == steps // 2:
            gc.collect()
            rss_at_half = _rss_bytes()
        if (step + 1) % max(steps // 10, 1) == 0:
            masks = _check_healthy(opt, model, step + 1)
    opt.log_dict()
    at_end = (_state_layout(opt), _bookkeeping(opt), _live_tensors())  # collects garbage first
    rss_growth = _rss_bytes() - rss_at_half if watch_memory else None
    return losses, opt, masks, at_settle, at_end, rss_growth


def _assert_long_run(cls, precision, steps, watch_memory=False):
    losses, opt, masks, before, after, rss_growth = _long_run(cls, precision, steps, watch_memory)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20]), "did not learn"
    assert opt.log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0
    if "max_lr" in signature_defaults(cls):
        assert masks > 0, "no lr mask was checked"
    assert after[0] == before[0], "the state's layout changed after the schedules settled"
    grown = {k: (before[1].get(k), n) for k, n in after[1].items() if before[1].get(k) != n}
    assert not grown, f"the optimizer's bookkeeping changed (attribute: elements before, after): {grown}"
    assert after[2] == before[2], f"live tensors grew: {before[2]} -> {after[2]}"
    if watch_memory:  # a leak of 1 KB a step is 5 MB over the second half
        assert rss_growth < 4 * 2 ** 20, f"the process grew by {rss_growth / 2 ** 20:.1f} MiB over the second half"


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_400_steps_every_technique_on_nothing_grows(cls, precision):
    _assert_long_run(cls, precision, 400)


@pytest.mark.slow
@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_10000_steps_every_technique_on_nothing_grows(cls, precision):
    _assert_long_run(cls, precision, 10_000, watch_memory=True)
