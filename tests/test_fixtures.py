"""State dicts saved by released versions keep loading (issue 7, "resume").

``tests/fixtures/state_dicts-<version>.pt`` holds, per registered optimizer, the state dict it
saved mid-warm-up with every technique on (``tests/fixtures/make_state_fixtures.py`` writes one
per release). Each must load with ``weights_only=True`` into today's optimizer, restore every
saved tensor as saved, and train on."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from hina_kohya import registry
from helpers import TinyLoRANet, train

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("state_dicts-*.pt"))
CASES = [(path, name) for path in FIXTURES
         for name in torch.load(path, weights_only=True)["entries"]]


def test_there_is_a_fixture_for_every_registered_optimizer():
    assert FIXTURES, "no committed state-dict fixture"
    newest = torch.load(FIXTURES[-1], weights_only=True)["entries"]
    assert set(newest) == set(registry.list_optimizers())


def _same(saved, now, where: str) -> None:
    if isinstance(saved, torch.Tensor):
        assert isinstance(now, torch.Tensor) and now.dtype == saved.dtype, where
        assert torch.equal(now, saved), where
    elif isinstance(saved, dict):
        assert set(now) == set(saved), f"{where}: keys {sorted(map(str, set(now) ^ set(saved)))}"
        for key in saved:
            _same(saved[key], now[key], f"{where}.{key}")
    elif isinstance(saved, (list, tuple)):
        assert len(now) == len(saved), where
        for i, (a, b) in enumerate(zip(saved, now)):
            _same(a, b, f"{where}[{i}]")
    else:
        assert now == saved, where


@pytest.mark.parametrize("path,name", CASES, ids=[f"{p.stem}-{n}" for p, n in CASES])
def test_a_released_state_dict_loads_as_saved_and_trains_on(path, name):
    entry = torch.load(path, weights_only=True)["entries"][name]
    cls = registry.get_optimizer_class(name)
    model = TinyLoRANet(0)
    model.load_state_dict(entry["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = cls(model.groups(), **entry["kwargs"])
        opt.load_state_dict(entry["optimizer"])
    _same(entry["optimizer"]["state"], opt.state_dict()["state"], f"{name}.state")
    assert opt.last_load_report == {"remapped": False, "added": [], "removed": [], "reshaped": []}
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = train(model, opt, 4, start=entry["steps"])
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert opt.log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0
