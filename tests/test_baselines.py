"""The outside optimizers of the benchmarks: LoRARite's pairs, the composite, missing packages named."""

import importlib.util

import pytest
import torch

from hina_kohya.bench import baselines, converge


def _groups(named):
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


def test_lora_pairs_put_the_rank_first_factor_first_and_leave_the_rest():
    down = torch.nn.Parameter(torch.randn(4, 32))        # (rank, in)
    up = torch.nn.Parameter(torch.zeros(64, 4))          # (out, rank)
    w1 = torch.nn.Parameter(torch.randn(4, 4))
    w2a = torch.nn.Parameter(torch.randn(16, 4))         # (out, rank)
    w2b = torch.nn.Parameter(torch.zeros(4, 8))          # (rank, in)
    head = torch.nn.Parameter(torch.randn(3, 64))
    named = [("lora_unet_a.lora_down.weight", down), ("lora_unet_a.lora_up.weight", up),
             ("lora_unet_b.lokr_w1", w1), ("lora_unet_b.lokr_w2_a", w2a), ("lora_unet_b.lokr_w2_b", w2b),
             ("head.weight", head)]
    pairs, rest = baselines.lora_pairs(_groups(named))
    assert [(a is down, b is up) for a, b in pairs][0] == (True, True)
    assert any(a is w2b and b is w2a for a, b in pairs)  # the LoKr split pair, rank-first first
    assert {id(p) for p in rest} == {id(w1), id(head)}


def test_the_composite_steps_every_part_and_reports_all_state():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = baselines.Composite([torch.optim.SGD([a], lr=0.5), torch.optim.AdamW([b], lr=0.1)])
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert torch.allclose(a, torch.full((3,), 0.5)) and bool((b < 1).all())
    assert set(map(id, opt.state)) == {id(b)}  # SGD without momentum keeps no state
    opt.zero_grad()
    assert a.grad is None and b.grad is None
    assert len(opt.param_groups) == 2


def test_missing_packages_are_named_with_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "adv_optm" else real(name, *a))
    assert baselines.missing(["adv-optm", "bitsandbytes"]) == ["adv-optm"]
    assert "adv-optm" in converge.missing_packages(["adv_adamw", "adv_prodigy", "adamw"])


@pytest.mark.parametrize("name", ["adv_adamw", "adv_prodigy", "lorarite", "prodigy_plus"])
def test_each_outside_baseline_trains_a_lora(name):
    label, make, own, package = converge.candidate(name)
    pytest.importorskip(baselines.PACKAGES[package])
    torch.manual_seed(0)
    down = torch.nn.Parameter(torch.randn(4, 16) * 0.3)
    up = torch.nn.Parameter(torch.zeros(16, 4))
    bias = torch.nn.Parameter(torch.zeros(16))
    target = torch.randn(16, 4) @ torch.randn(4, 16) * 0.3
    opt = make(_groups([("lora_unet_x.lora_down.weight", down), ("lora_unet_x.lora_up.weight", up),
                        ("lora_unet_x.bias", bias)]), 1.0 if own else 1e-2)  # own grid: Prodigy's multiplier
    x = torch.randn(256, 16)

    def loss():
        return ((x @ (up @ down).T + bias - x @ target.T) ** 2).mean()

    start = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < start
