"""A NaN/inf gradient skips that tensor's step: value and state untouched, counted in log_dict."""

import copy
import warnings

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, Automagic_CameAMP, HinaAdamW
from helpers import TinyLoRANet, train

PATHS = {"foreach": dict(fused=False, foreach=True), "single": dict(fused=False, foreach=False),
         "fused": dict(fused=True)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("cls", [HinaAdamW, AdaptiveHinaAdamW])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_gradient_skips_only_that_tensor(path, cls, bad):
    m = TinyLoRANet(0)
    opt = cls(m.groups(), lr=1e-2, **PATHS[path])
    train(m, opt, 3)
    victim = m.layers[1].lora_up.weight
    other = m.layers[1].lora_down.weight
    before = victim.detach().clone()
    state_before = copy.deepcopy({k: v for k, v in opt.state[victim].items()})
    other_before = other.detach().clone()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 0.1
    victim.grad[0, 0] = bad
    opt.step()
    assert torch.equal(victim.detach(), before)
    for k, v in state_before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(opt.state[victim][k], v), k
    # the step counter is a host integer: it advances (deciding otherwise would need a host sync)
    assert opt.state[victim]["step"] == state_before["step"] + 1
    assert not torch.equal(other.detach(), other_before)  # the rest of the step happened
    assert opt.log_dict()["hina/nonfinite_skipped"] == 1.0
    train(m, opt, 3, start=10)  # and training goes on, finite
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert opt.log_dict()["hina/nonfinite_skipped"] == 1.0


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_bad_gradient_on_bf16_params_and_8bit_state(path):
    m = TinyLoRANet(1, dtype=torch.bfloat16)
    opt = HinaAdamW(m.groups(), lr=1e-2, state_precision="8bit", min_8bit_size=16, **PATHS[path])
    train(m, opt, 2)
    victim = m.layers[0].lora_up.weight
    before = victim.detach().clone()
    codes = opt.state[victim]["exp_avg"].clone()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    victim.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(victim.detach(), before)
    assert torch.equal(opt.state[victim]["exp_avg"], codes)
    assert opt.log_dict()["hina/nonfinite_skipped"] == 1.0


@pytest.mark.parametrize("path", list(PATHS))
def test_bad_gradient_on_an_importance_refresh_step_does_not_poison_the_bucket(path):
    m = TinyLoRANet(0)
    opt = AdaptiveHinaAdamW(m.groups(), lr=1e-2, relationship_discovery_interval=1, **PATHS[path])
    train(m, opt, 2)
    victim = m.layers[1].lora_up.weight
    imp_before = opt.state[victim]["importance"].clone()
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 0.1
    victim.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(opt.state[victim]["importance"], imp_before)
    before = [p.detach().clone() for p in m.parameters()]
    train(m, opt, 3, start=10)
    assert all(torch.isfinite(opt.state[p]["importance"]) for p in m.parameters())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, m.parameters()))  # nothing stalled
    assert opt.log_dict()["hina/nonfinite_skipped"] == 1.0


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_skip_nonfinite_can_be_switched_off(path):
    m = TinyLoRANet(0)
    opt = HinaAdamW(m.groups(), skip_nonfinite=False, **PATHS[path])
    train(m, opt, 1)
    victim = m.layers[0].lora_up.weight
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    victim.grad[0, 0] = float("nan")
    opt.step()
    assert not torch.isfinite(victim).all()  # the user asked for no protection
    assert opt.log_dict()["hina/nonfinite_skipped"] == 0.0


def test_skip_nonfinite_off_keeps_the_fused_kernels_for_came_recipes():
    """The graph without the skip tripped an inductor CPU bug for the CAME recipes (torch 2.13;
    seen on single-tensor calls): ``skip_nonfinite=False`` fell back, with a warning, to the
    eager path (10x slower on sd15)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 8)) for _ in range(3)]  # a call of 2, a call of 1
    opt = Automagic_CameAMP(params, lr=1e-3, skip_nonfinite=False, fused=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fused kernels are unavailable.*")
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            if step == 2:
                params[0].grad[0, 0] = float("nan")
            opt.step()
    assert opt.fused
    assert not torch.isfinite(params[0]).all()  # applied, not skipped
    assert torch.isfinite(params[1]).all()
    assert opt.log_dict()["hina/nonfinite_skipped"] == 0.0
