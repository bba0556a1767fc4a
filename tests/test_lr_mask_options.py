"""The lr masks' cap (relative to each group's lr by default) and granularity (element / tensor / group)."""

import copy
import math
import warnings

import pytest
import torch

import hina_kohya as hk
from hina_kohya import AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_Improved, OptimizerConfig
from hina_kohya.transforms.lr_mask import pack_bits, unpack_bits

from helpers import TinyLoRANet, assert_resume_exact, roundtrip, train

MASKED = [AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_Improved]


@pytest.mark.parametrize("cls", MASKED)
def test_the_cap_is_ten_times_each_groups_lr_unless_given(cls):
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a relative cap never sits below the lr: no warning
        opt = cls([{"params": [a]}, {"params": [b], "lr": 5e-2}], lr=1e-2)
    assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.5])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": 1e-4})
    assert opt.param_groups[-1]["max_lr"] == pytest.approx(1e-3)
    assert cls([a], lr=1e-2, max_lr_ratio=2.0).param_groups[0]["max_lr"] == pytest.approx(2e-2)
    with pytest.warns(UserWarning, match="is above max_lr"):  # an absolute cap is the user's, as before
        assert cls([a], lr=1e-2, max_lr=1e-3).param_groups[0]["max_lr"] == 1e-3


@pytest.mark.parametrize("cls", MASKED)
def test_a_cap_below_min_lr_is_refused_with_the_fix(cls):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"min_lr=1e-07.*max_lr"):
        cls([p], lr=5e-9)  # the cap, 5e-8, under min_lr
    with pytest.raises((ValueError, TypeError), match="max_lr_ratio"):
        cls([p], lr=1e-3, max_lr_ratio=0.0)


def test_the_config_round_trips_a_relative_cap():
    cfg = OptimizerConfig(lr=1e-4, max_lr_ratio=3.0, lr_mask_granularity="tensor")
    assert cfg.max_lr is None
    back = OptimizerConfig.from_toml(cfg.to_toml())
    assert back == cfg and "max_lr =" not in cfg.to_toml().replace("max_lr_ratio", "")
    with pytest.raises(ValueError, match=r"lr_mask_granularity='pixel'.*'element', 'tensor', 'group'"):
        OptimizerConfig(lr_mask_granularity="pixel")
    with pytest.raises(ValueError, match="lr_mask_granularity"):
        AdaptiveHinaAdamW([torch.nn.Parameter(torch.zeros(2))], lr_mask_granularity="pixel")


def test_bits_round_trip_for_any_length():
    for n in (1, 7, 8, 9, 64, 1001):
        flags = torch.rand(n) > 0.5
        packed = pack_bits(flags)
        assert packed.numel() == math.ceil(n / 8) and int(packed.max()) <= 255
        assert torch.equal(unpack_bits(packed.float(), n), flags)


def _reference_rates(grads: list[list[torch.Tensor]], granularity: str, start: float, bump: float, low: float,
                     warmup: int) -> list[float]:
    """float64: each tensor's (or the group's) rate moved by bump * (2 * agree - 1) from step 2 to the warm-up's end."""
    n = len(grads[0])
    rates, prev = [start] * n, [None] * n
    for t, gs in enumerate(grads, start=1):
        signs = [g.reshape(-1) > 0 for g in gs]
        if 1 < t <= warmup:
            agree = [float((s == p).double().sum()) for s, p in zip(signs, prev)]
            sizes = [s.numel() for s in signs]
            fracs = [sum(agree) / sum(sizes)] * n if granularity == "group" else [a / k for a, k in zip(agree, sizes)]
            rates = [min(max(r + bump * (2 * f - 1), low), 1.0) for r, f in zip(rates, fracs)]
        if t <= warmup:
            prev = signs
    return rates


@pytest.mark.parametrize("granularity", ["tensor", "group"])
@pytest.mark.parametrize("cls", [AdaptiveHinaAdamW, Automagic_CameAMP])
def test_tensor_and_group_rates_follow_the_sign_agreement(cls, granularity):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 9)), torch.nn.Parameter(torch.randn(13))]
    lr, bump, warmup = 1e-3, 2e-4, 6
    opt = cls(params, lr=lr, lr_bump=bump, warmup_steps=warmup, lr_mask_granularity=granularity, fused=False)
    history = []
    for step in range(9):
        gs = [torch.randn_like(p) + 0.3 * (step % 2) for p in params]
        for p, g in zip(params, gs):
            p.grad = g
        history.append(gs)
        opt.step()
    max_lr = 10 * lr
    want = _reference_rates(history, granularity, lr / max_lr, bump / max_lr, 1e-7 / max_lr, warmup)
    got = [float(opt.state[p]["lr_rate"]) for p in params]
    assert got == pytest.approx(want, rel=1e-6)
    if granularity == "group":
        assert got[0] == got[1]
    assert "lr_mask" not in opt.state[params[0]]
    assert opt.state[params[0]]["lr_polarity"].dtype == torch.uint8
    assert opt.state[params[0]]["lr_polarity"].numel() == math.ceil(54 / 8)
    # frozen after the warm-up: the last three steps changed nothing
    assert got != pytest.approx([lr / max_lr] * 2)


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_the_rate_scales_the_step_like_a_learning_rate(granularity):
    """Same gradients, one step after the rates moved: the update is AdamW's times rate * max_lr / lr."""
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(8, 8))
    q = torch.nn.Parameter(p.detach().clone())
    plain = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
                 use_grams=False, use_agr=False, use_tam=False, dynamic_weight_decay=False,
                 use_dynamic_adaptation=False, weight_decay=0.0)
    masked = AdaptiveHinaAdamW([p], lr=1e-3, lr_bump=1e-3, warmup_steps=10, lr_mask_granularity=granularity,
                               fused=False, **plain)
    unmasked = AdaptiveHinaAdamW([q], lr=1e-3, use_lr_mask=False, fused=False, **plain)
    for step in range(3):
        g = torch.randn(8, 8) + 1.0
        before_p, before_q = p.detach().clone(), q.detach().clone()
        p.grad, q.grad = g.clone(), g.clone()
        masked.step()
        unmasked.step()
    rate = float(masked.state[p]["lr_rate"]) * 10  # L / lr
    torch.testing.assert_close(p.detach() - before_p, (q.detach() - before_q) * rate, rtol=1e-3, atol=1e-6)
    assert rate > 1.5  # grown from 1: the gradients keep their signs


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_a_non_finite_gradient_leaves_rate_and_signs_untouched(granularity):
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(5, 5)), torch.nn.Parameter(torch.randn(7))
    opt = Automagic_CameAMP([a, b], lr=1e-3, lr_bump=1e-4, warmup_steps=20, lr_mask_granularity=granularity,
                            fused=False)
    for _ in range(3):
        a.grad, b.grad = torch.randn(5, 5), torch.randn(7)
        opt.step()
    saved = {k: v.clone() for k, v in opt.state[a].items() if isinstance(v, torch.Tensor)}
    bad = torch.randn(5, 5)
    bad[1, 2] = float("nan")
    a.grad, b.grad = bad, torch.randn(7)
    opt.step()
    for k, v in saved.items():
        assert torch.equal(opt.state[a][k], v), k
    assert opt.log_dict()["hina/nonfinite_skipped"] == 1.0


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_tensor_rates_save_memory_and_resume_exactly(granularity):
    def make(groups):
        return AdaptiveHinaAdamW(groups, lr=1e-2, warmup_steps=5, lr_bump=1e-3, lr_mask_granularity=granularity)

    sd = assert_resume_exact(make, seed=3, steps=8, split=4)
    states = [s for s in sd["state"].values() if "lr_polarity" in s]
    assert states and all(s["lr_polarity"].dtype == torch.uint8 for s in states)
    model = TinyLoRANet(3)
    element = AdaptiveHinaAdamW(model.groups(), lr=1e-2, warmup_steps=5)
    train(model, element, 2)
    coarse_model = TinyLoRANet(3)
    coarse = make(coarse_model.groups())
    train(coarse_model, coarse, 2)
    # per element: 2 bytes (fp16); per tensor / group: 1 bit and one float per tensor
    assert coarse.state_bytes_per_element() < element.state_bytes_per_element() - 1.5


def test_a_trainers_float_cast_of_the_bits_is_undone_on_load():
    model = TinyLoRANet(4)
    opt = Automagic_CameAMP(model.groups(), lr=1e-2, lr_mask_granularity="tensor", warmup_steps=4)
    train(model, opt, 3)
    sd = roundtrip(opt.state_dict())
    cast = copy.deepcopy(sd)
    for st in cast["state"].values():  # as accelerate casts every floating-point-able state
        st["lr_polarity"] = st["lr_polarity"].to(torch.float32)
    twin = Automagic_CameAMP(model.groups(), lr=1e-2, lr_mask_granularity="tensor", warmup_steps=4)
    twin.load_state_dict(cast)
    for p in twin.state:
        assert twin.state[p]["lr_polarity"].dtype == torch.uint8
        assert torch.equal(twin.state[p]["lr_polarity"], opt.state[p]["lr_polarity"])


def test_the_registry_names_accept_the_options():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = hk.get_optimizer_class("AdaptiveHinaAdamW8bit")([p], lr=1e-3, lr_mask_granularity="group", max_lr_ratio=3.0)
    assert opt.param_groups[0]["max_lr"] == pytest.approx(3e-3)
