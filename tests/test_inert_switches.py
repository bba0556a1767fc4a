"""Arguments that the 0.2 defaults make inert are named at construction, never silently dropped."""

import warnings

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, HinaAdamW
from hina_kohya.presets import create_from_preset, list_presets


def _params():
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.zeros(4, 8))]


def _messages(make) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return [str(w.message) for w in caught if "has no effect" in str(w.message)]


@pytest.mark.parametrize("cls", [HinaAdamW, AdaptiveHinaAdamW])
def test_grams_with_cautious_on_is_named_with_the_fix(cls):
    msgs = _messages(lambda: cls(_params(), lr=1e-3, use_grams=True))
    assert len(msgs) == 1 and "use_grams=True" in msgs[0] and "use_cautious=False" in msgs[0]
    assert _messages(lambda: cls(_params(), lr=1e-3, use_grams=True, use_cautious=False)) == []


def test_a_lora_plus_ratio_without_use_alora_is_named_with_the_fix():
    msgs = _messages(lambda: HinaAdamW(_params(), lr=1e-3, alora_ratio=18.0))
    assert len(msgs) == 1 and "alora_ratio=18.0" in msgs[0] and "use_alora=True" in msgs[0]
    assert _messages(lambda: HinaAdamW(_params(), lr=1e-3, alora_ratio=18.0, use_alora=True)) == []


def test_the_defaults_themselves_warn_nothing():
    assert _messages(lambda: HinaAdamW(_params(), lr=1e-3)) == []
    assert _messages(lambda: AdaptiveHinaAdamW(_params(), lr=1e-3)) == []


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.startswith("automagic")])
def test_no_preset_sets_an_inert_argument(name):
    assert _messages(lambda: create_from_preset(name, _params())) == []
