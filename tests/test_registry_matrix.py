"""One generic suite over the registry, in the style of torch.optim's generic optimizer tests:
every recipe x ``state_precision`` x parameter dtype x names present / absent trains a small
LoRA-shaped model through its phase changes, and a save -> ``torch.load(weights_only=True)`` ->
load at an arbitrary step continues bit-identically. Property-based: hypothesis picks the save
points."""

import itertools
import math
import warnings

import pytest
import torch

from hina_kohya import (AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        HinaAdamW, registry)
from hina_kohya.args import signature_defaults
from helpers import TinyLoRANet, accepted_by, params_of, roundtrip, train

RECIPES = [HinaAdamW, AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved]
PRECISIONS = ["fp32", "bf16", "8bit"]
DTYPES = [torch.float32, torch.bfloat16]
MATRIX = list(itertools.product(RECIPES, PRECISIONS, DTYPES, [True, False]))
STEPS = 8
# short schedules so that a few steps cross the phase changes (warm-up halves, decay transitions,
# relationship refreshes), where state appears, disappears or changes meaning
SHORT = dict(warmup_steps=4, wd_transition_steps=3, relationship_discovery_interval=3)


def _make(cls, precision, groups):
    kw = accepted_by(cls, SHORT)
    return cls(groups, state_precision=precision, min_8bit_size=1, **kw)


def _model(seed, dtype):
    return TinyLoRANet(seed, dtype=dtype)


def _groups(model, named):
    return model.groups(named=named, lrs=(1e-3, 5e-4))


def _run(cls, precision, dtype, named, split, seed=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # name-agnostic and gradient-norm-signal notes
        full = _model(seed, dtype)
        start = params_of(full)
        opt_full = _make(cls, precision, _groups(full, named))
        losses = train(full, opt_full, STEPS)
        part = _model(seed, dtype)
        opt = _make(cls, precision, _groups(part, named))
        train(part, opt, split)
        sd = roundtrip(opt.state_dict())
        resumed = _make(cls, precision, _groups(part, named))
        resumed.load_state_dict(sd)
        train(part, resumed, STEPS - split, start=split)
    return full, start, opt_full, losses, part


@pytest.mark.parametrize("cls,precision,dtype,named", MATRIX,
                         ids=[f"{c.__name__}-{p}-{str(d)[6:]}-{'named' if n else 'unnamed'}" for c, p, d, n in MATRIX])
def test_every_recipe_trains_and_resumes_exactly(cls, precision, dtype, named):
    split = 1 + MATRIX.index((cls, precision, dtype, named)) % (STEPS - 1)
    full, start, opt, losses, part = _run(cls, precision, dtype, named, split)
    for before, after in zip(start, params_of(full)):
        assert torch.isfinite(after.float()).all() and not torch.equal(before, after)  # every tensor learned
    assert all(math.isfinite(v) for v in losses)
    for a, b in zip(params_of(full), params_of(part)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    logs = opt.log_dict()
    assert logs and all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    dtypes = {v.dtype for v in states}
    if precision == "8bit":
        assert torch.uint8 in dtypes
    elif precision == "bf16":
        assert torch.bfloat16 in dtypes and torch.uint8 not in dtypes
    else:
        assert torch.uint8 not in dtypes and (torch.bfloat16 not in dtypes or dtype == torch.bfloat16)


def test_eight_bit_classes_are_their_recipe_with_8bit_state():
    for spec in registry._SPECS:
        if spec.name.endswith("8bit"):
            assert signature_defaults(spec.cls)["state_precision"] == "8bit"
            assert spec.cls.__mro__[1] in RECIPES


def test_every_registered_optimizer_accepts_every_engine_option():
    """The engine's options (state precision, codec, fusion, ...) are written out in each recipe's
    signature; one left out is silently stuck at its default (HinaAdamW lacked ``quant_backend``)."""
    import inspect

    from hina_kohya.core.optimizer import ENGINE_OPTIONS, HinaOptimizer

    keywords = set(inspect.signature(HinaOptimizer.__init__).parameters) - {"self", "params", "defaults"}
    assert set(ENGINE_OPTIONS) == keywords
    for spec in registry._SPECS:
        missing = set(ENGINE_OPTIONS) - set(signature_defaults(spec.cls))
        assert not missing, (spec.name, missing)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(MATRIX), st.integers(1, STEPS - 1), st.integers(0, 3))
def test_resume_at_any_step_continues_exactly(case, split, seed):
    cls, precision, dtype, named = case
    full, _, _, _, part = _run(cls, precision, dtype, named, split, seed)
    for a, b in zip(params_of(full), params_of(part)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
