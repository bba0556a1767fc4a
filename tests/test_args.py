"""optimizer_args parsing (sd-scripts rules, INTEGRATION.md §1.2) and validation."""

import pytest

from hina_kohya import HinaAdamW, OptimizerArgumentError, UnknownOptimizerArgument, parse_optimizer_args
from hina_kohya.args import split_items

# item -> python value, exactly as sd-scripts' literal_eval gives it
PARSED = [
    ("betas=0.9,0.99", ("betas", (0.9, 0.99))),
    ("betas=(0.9,0.99)", ("betas", (0.9, 0.99))),
    ("betas=[0.9,0.99]", ("betas", [0.9, 0.99])),
    ("weight_decay=0.01", ("weight_decay", 0.01)),
    ("eps=1e-8", ("eps", 1e-8)),
    ("weight_decay=0", ("weight_decay", 0)),
    ("steps=1_000", ("steps", 1000)),
    ("flag=True", ("flag", True)),
    ("flag=False", ("flag", False)),
    ("x=None", ("x", None)),
    ("mode='fast'", ("mode", "fast")),
    ("cfg={'a':1}", ("cfg", {"a": 1})),
    ("x=1e999", ("x", float("inf"))),
]


@pytest.mark.parametrize("item,expected", PARSED)
def test_values_parse_like_sd_scripts(item, expected):
    key, value = expected
    out = split_items([item])
    assert out == {key: value} and type(out[key]) is type(value)


BAD_SYNTAX = [
    ("flag=true", "write flag=True"),
    ("mode=fast", "quote strings as mode='fast'"),
    ("x=inf", "1e999"),
    ("a=b=c", "exactly one 'key=value'"),
    ("novalue", "exactly one 'key=value'"),
]


@pytest.mark.parametrize("item,fix", BAD_SYNTAX)
def test_bad_syntax_names_the_fix(item, fix):
    with pytest.raises(OptimizerArgumentError) as err:
        split_items([item])
    assert fix in str(err.value)


def test_duplicate_key_is_refused():
    with pytest.raises(OptimizerArgumentError, match="given twice"):
        split_items(["lr=1", "lr=2"])


# item -> coerced value for HinaAdamW
COERCED = [
    ("weight_decay=0", "weight_decay", 0.0, float),
    ("lr=1", "lr", 1.0, float),
    ("betas=[0.9,0.99]", "betas", (0.9, 0.99), tuple),
    ("betas=0.9,0.99", "betas", (0.9, 0.99), tuple),
    ("wd_transition_steps=500.0", "wd_transition_steps", 500, int),
    ("use_spd=0", "use_spd", False, bool),
    ("use_spd=False", "use_spd", False, bool),
    ("state_precision='8bit'", "state_precision", "8bit", str),
]


@pytest.mark.parametrize("item,key,value,typ", COERCED)
def test_values_are_coerced_by_the_constructor_signature(item, key, value, typ):
    out = parse_optimizer_args([item], HinaAdamW)
    assert out[key] == value and type(out[key]) is typ


WRONG_TYPES = [
    ("lr='fast'", "lr"), ("betas=0.9", "betas"), ("betas=(0.9,0.99,0.999)", "betas"), ("use_spd=2", "use_spd"),
    ("wd_transition_steps=10.5", "wd_transition_steps"), ("state_precision=8", "state_precision"),
    ("use_tam='yes'", "use_tam"),
]


@pytest.mark.parametrize("item,key", WRONG_TYPES)
def test_wrong_types_name_the_argument(item, key):
    with pytest.raises(OptimizerArgumentError) as err:
        parse_optimizer_args([item], HinaAdamW)
    assert key in str(err.value) and "expected" in str(err.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UnknownOptimizerArgument, match="Did you mean 'weight_decay'"):
        parse_optimizer_args(["weight_decy=0.1"], HinaAdamW)
    with pytest.raises(TypeError):  # also a TypeError, as Python raises for unknown kwargs
        parse_optimizer_args(["spd_lamda=0.1"], HinaAdamW)


def test_key_with_spaces_explains_sd_scripts_keeps_keys_verbatim():
    with pytest.raises(UnknownOptimizerArgument, match="no spaces around '='"):
        parse_optimizer_args(["weight_decay =0.1"], HinaAdamW)


OUT_OF_RANGE = [
    (dict(lr=-1e-4), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(eps=0.0), "eps"), (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.01), "weight_decay"),
    (dict(lr=float("nan")), "lr"), (dict(spd_lambda=-1.0), "spd_lambda"), (dict(tam_beta=1.0), "tam_beta"),
    (dict(alora_ratio=0.0), "alora_ratio"), (dict(wd_transition_steps=0), "wd_transition_steps"),
    (dict(wd_decay_factor=1.5), "wd_decay_factor"), (dict(wd_min_ratio=2.0), "wd_min_ratio"),
    (dict(state_precision="fp8"), "state_precision"), (dict(bf16_rounding="up"), "bf16_rounding"),
    (dict(resume_hparams="old"), "resume_hparams"), (dict(min_8bit_size=0), "min_8bit_size"),
    (dict(optim_bits=16), "optim_bits"), (dict(seed=-1), "seed"),
]


@pytest.mark.parametrize("kwargs,key", OUT_OF_RANGE)
def test_out_of_range_values_name_the_argument_and_range(kwargs, key):
    import torch

    from helpers import TECHNIQUES_OFF

    with pytest.raises(ValueError) as err:
        HinaAdamW([torch.nn.Parameter(torch.zeros(2))], **{**TECHNIQUES_OFF, **kwargs})
    msg = str(err.value)
    assert f"{key}=" in msg and "must be" in msg


def test_per_group_values_are_validated_too():
    import torch

    from helpers import TECHNIQUES_OFF

    with pytest.raises(ValueError, match="lr=-1"):
        HinaAdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1}], **TECHNIQUES_OFF)
