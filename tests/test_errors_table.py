"""The errors table: every constructor argument of every registered optimizer, given an invalid
value, is refused with a message that names it -- or, for the original classes' inert
bitsandbytes options, accepted with a warning that names it. Unknown arguments suggest the
closest valid one."""

import warnings

import pytest
import torch

from hina_kohya import registry
from hina_kohya.args import OptimizerArgumentError, signature_defaults, validate_kwargs

# the original HinaAdamW's bitsandbytes options: accepted, no effect, one warning naming them
INERT = {"amsgrad", "args", "percentile_clipping", "block_wise", "is_paged"}
# invalid values by argument, where the default's type does not say enough
SPECIAL = {
    "betas": (0.9, 1.5), "eps": -1.0, "regularizers": ("not a strategy",), "config": {"lr": 1.0},
    "lr": float("inf"), "alpha_mix_ratio": 1.5, "optim_bits": 16, "fused": "yes", "foreach": "no",
    "min_lr": -1.0, "max_lr": float("nan"),
}


def invalid_value(name, default):
    if name in SPECIAL:
        return SPECIAL[name]
    if isinstance(default, bool):
        return "False"  # a string would silently count as True
    if isinstance(default, int):
        return -7
    if isinstance(default, float):
        return float("nan")
    if isinstance(default, str):
        return "bogus"
    if isinstance(default, tuple):
        return tuple(float("nan") for _ in default)
    return object()


CASES = [(spec.name, name) for spec in registry._SPECS for name in signature_defaults(spec.cls)]


@pytest.mark.parametrize("optimizer,argument", CASES, ids=[f"{o}-{a}" for o, a in CASES])
def test_an_invalid_value_is_refused_naming_the_argument(optimizer, argument):
    cls = registry.get_optimizer_class(optimizer)
    value = invalid_value(argument, signature_defaults(cls)[argument])
    p = torch.nn.Parameter(torch.zeros(4, 4))
    if argument in INERT:
        with pytest.warns(UserWarning, match=argument):
            cls([p], **{argument: value})
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((OptimizerArgumentError, ValueError, TypeError)) as info:
            cls([p], **{argument: value})
    assert argument in str(info.value), str(info.value)


def test_the_table_covers_every_argument():
    assert len(CASES) > 150
    for spec in registry._SPECS:
        assert {a for o, a in CASES if o == spec.name} == set(signature_defaults(spec.cls))


@pytest.mark.parametrize("optimizer", [s.name for s in registry._SPECS])
def test_an_unknown_argument_suggests_the_closest(optimizer):
    cls = registry.get_optimizer_class(optimizer)
    p = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises((OptimizerArgumentError, TypeError), match="weight_decay"):
        cls([p], weight_decy=0.1)
    with pytest.raises(OptimizerArgumentError, match="weight_decay"):
        validate_kwargs(cls, {"weight_decy": 0.1})


@pytest.mark.parametrize("optimizer", [s.name for s in registry._SPECS])
@pytest.mark.parametrize("kind", ["sparse", "complex"])
def test_sparse_and_complex_parameters_are_refused(optimizer, kind):
    cls = registry.get_optimizer_class(optimizer)
    t = torch.zeros(4, 4)
    p = torch.nn.Parameter(t.to_sparse() if kind == "sparse" else t.to(torch.complex64))
    with pytest.raises((ValueError, TypeError), match=kind):
        cls([p])
