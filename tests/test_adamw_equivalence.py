"""HinaAdamW with every technique off is AdamW: parameter for parameter against torch.optim.AdamW."""

import pytest
import torch

from helpers import TinyLoRANet, params_of, plain_hina, train


def _pair(dtype, named, scheduler, foreach=True):
    ref_model, hina_model = TinyLoRANet(0, dtype), TinyLoRANet(0, dtype)
    ref = torch.optim.AdamW(ref_model.groups(named=False), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    hina = plain_hina(hina_model.groups(named=named), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, foreach=foreach)
    scheds = [None, None]
    if scheduler:
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.05 * s)) for o in (ref, hina)]
    return ref_model, ref, scheds[0], hina_model, hina, scheds[1]


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("scheduler", [False, True])
@pytest.mark.parametrize("foreach", [True, False])
def test_matches_torch_adamw_float64(named, scheduler, foreach):
    rm, ro, rs, hm, ho, hs = _pair(torch.float64, named, scheduler, foreach)
    train(rm, ro, 50, scheduler=rs)
    train(hm, ho, 50, scheduler=hs)
    for a, b in zip(params_of(rm), params_of(hm)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    # the groups really had different lr and weight decay, and the scheduler really moved lr
    assert ho.param_groups[0]["weight_decay"] != ho.param_groups[1]["weight_decay"]
    if scheduler:
        assert ho.param_groups[0]["lr"] < 1e-2


def test_matches_torch_adamw_float32():
    rm, ro, rs, hm, ho, hs = _pair(torch.float32, True, True)
    train(rm, ro, 50, scheduler=rs)
    train(hm, ho, 50, scheduler=hs)
    for a, b in zip(params_of(rm), params_of(hm)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_training_actually_moves_and_lowers_loss():
    model = TinyLoRANet(0)
    before = params_of(model)
    opt = plain_hina(model.groups(), lr=1e-2)
    losses = train(model, opt, 60)
    assert losses[-1] < 0.7 * losses[0]
    assert all(not torch.equal(a, b) for a, b in zip(before, params_of(model)))


def test_foreach_equals_single_tensor_path():
    a, b = TinyLoRANet(1, torch.float64), TinyLoRANet(1, torch.float64)
    oa = plain_hina(a.groups(), foreach=True)
    ob = plain_hina(b.groups(), foreach=False)
    train(a, oa, 20)
    train(b, ob, 20)
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for p, q in zip(a.parameters(), b.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[p][key], ob.state[q][key], rtol=1e-12, atol=1e-16)
