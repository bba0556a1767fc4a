"""Every recipe with every technique on, on the tensors and gradients real runs produce besides
plain contiguous matrices: zero-size tensors, channels-last conv weights, non-contiguous views,
and gradients scaled from 1e-12 to past fp32's range (issue 7, "bad gradients")."""

from __future__ import annotations

import warnings

import pytest
import torch

from hina_kohya import (AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        HinaAdamW)
from helpers import TinyLoRANet, batch, every_technique

RECIPES = [HinaAdamW, AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved]
CASES = [(cls, precision) for cls in RECIPES for precision in ("fp32", "8bit")]
IDS = [f"{cls.__name__}-{precision}" for cls, precision in CASES]
NAMES = ["lora_unet_empty.lora_down.weight", "lora_unet_conv.lora_down.weight", "lora_unet_t.lora_up.weight",
         "lora_unet_conv.lora_up.weight"]


def _make(cls, params, precision, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gradient-norm signal note
        return cls(params, lr=1e-3, state_precision=precision, min_8bit_size=1,
                   **every_technique(cls, if_accepted={"warmup_steps": 4}), **kw)


def _odd_params(odd: bool, dtype=torch.float32) -> list[torch.nn.Parameter]:
    """A zero-size tensor, a conv weight, the transpose of a matrix and a 1x1-conv up factor; with
    ``odd`` in the layouts a model hands over (channels-last, a non-contiguous view)."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 4, 3, 3, generator=gen, dtype=dtype)
    mat = torch.randn(16, 8, generator=gen, dtype=dtype)
    up = torch.randn(6, 8, 1, 1, generator=gen, dtype=dtype) * 0.1
    if odd:
        conv, up = conv.contiguous(memory_format=torch.channels_last), up.contiguous(memory_format=torch.channels_last)
        mat = mat.t()  # strides (1, 8)
    else:
        mat = mat.t().contiguous()
    return [torch.nn.Parameter(torch.zeros(0, 4, dtype=dtype)), torch.nn.Parameter(conv), torch.nn.Parameter(mat),
            torch.nn.Parameter(up)]


def _grads(step: int, params, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=dtype)
        p.grad = torch.empty_strided(p.shape, p.stride(), dtype=dtype).copy_(g)  # the parameter's own layout


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_odd_layouts_update_exactly_like_their_contiguous_copies(cls, precision):
    odd, plain = _odd_params(True), _odd_params(False)
    layouts = [p.stride() for p in odd]
    opts = [_make(cls, [{"params": ps, "param_names": NAMES}], precision) for ps in (odd, plain)]
    for step in range(6):
        for ps, opt in zip((odd, plain), opts):
            _grads(step, ps)
            opt.step()
    assert [p.stride() for p in odd] == layouts  # channels-last stays channels-last, the view a view
    for a, b, name in zip(odd, plain, NAMES):
        torch.testing.assert_close(a.detach().contiguous(), b.detach().contiguous(), rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(odd[1].detach(), _odd_params(True)[1].detach())  # it trained
    assert odd[0] not in opts[0].state  # nothing to update, nothing to store
    assert opts[0].log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_odd_layouts_in_bf16_stay_finite_and_keep_their_layout(cls):
    odd = _odd_params(True, torch.bfloat16)
    start = [p.detach().clone() for p in odd]
    layouts = [p.stride() for p in odd]
    opt = _make(cls, [{"params": odd, "param_names": NAMES}], "bf16")
    for step in range(6):
        _grads(step, odd, torch.bfloat16)
        opt.step()
    assert [p.stride() for p in odd] == layouts
    assert all(torch.isfinite(p).all() for p in odd)
    assert not torch.equal(odd[1].detach(), start[1])


def _delta(cls, precision, scale, steps=8) -> tuple[torch.Tensor, "torch.optim.Optimizer"]:
    """Parameter change after ``steps`` steps of the TinyLoRANet task with gradients x ``scale``."""
    model = TinyLoRANet(0)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if cls is None
           else _make(cls, model.groups(lrs=(1e-3, 1e-3)), precision))
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(steps):
        x, y = batch(step, model.dims)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            p.grad.mul_(scale)
        opt.step()
    return torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]), opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_gradient_scale_from_tiny_to_huge(cls, precision):
    ref, _ = _delta(cls, precision, 1.0)
    # large scales, while g**2 fits fp32: the updates are those of scale 1 (Adam-style invariance)
    for scale in (1e6, 1e12, 1e17):
        d, _ = _delta(cls, precision, scale)
        assert _rel(d, ref) < 1e-4, (scale, _rel(d, ref))
    # small scales: eps takes over, as in AdamW; never more than in torch's AdamW
    adamw_ref, _ = _delta(None, None, 1.0)
    for scale in (1e-6, 1e-12):
        d, opt = _delta(cls, precision, scale)
        adamw, _ = _delta(None, None, scale)
        assert torch.isfinite(d).all() and opt.log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0
        assert _rel(d, ref) <= _rel(adamw, adamw_ref) + 0.01, (scale, _rel(d, ref), _rel(adamw, adamw_ref))


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_gradients_whose_square_overflows_skip_steps_instead_of_poisoning_state(cls, precision):
    d, opt = _delta(cls, precision, 1e30)
    assert torch.isfinite(d).all()
    assert opt.log_dict()["hina/nonfinite_skipped"] > 0
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_zero_gradients_move_nothing_and_poison_nothing(cls, precision):
    # all-zero gradients (a LoRA down factor while its up factor is still zero, a frozen branch)
    model = TinyLoRANet(0)
    groups = model.groups(lrs=(1e-3, 1e-3), wds=(0.0, 0.0))
    opt = _make(cls, groups, precision)
    params = list(model.parameters())
    start = [p.detach().clone() for p in params]
    for step in range(8):
        x, y = batch(step, model.dims)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step < 3:
            for p in params:
                p.grad.zero_()
        elif step < 6:
            params[0].grad.zero_()  # one tensor keeps a zero gradient while the others learn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        if step == 2:  # no gradient yet, no decay: nothing may have moved
            assert all(torch.equal(p.detach(), s) for p, s in zip(params, start))
    assert opt.log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0
    assert all(torch.isfinite(p).all() for p in params)
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), key
    assert not torch.equal(params[1].detach(), start[1])  # and the others learned


@pytest.mark.parametrize("cls,precision", CASES, ids=IDS)
def test_gradients_that_come_and_go_skip_the_tensor_decay_included(cls, precision):
    # module dropout / DyLoRA: some tensors have no gradient on some steps (p.grad is None)
    model = TinyLoRANet(0)
    opt = _make(cls, model.groups(lrs=(1e-3, 1e-3), wds=(0.1, 0.1)), precision)
    params = list(model.parameters())
    for step in range(10):
        x, y = batch(step, model.dims)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        absent = [p for i, p in enumerate(params) if (i + step) % 3 == 0]
        for p in absent:
            p.grad = None
        before = [p.detach().clone() for p in absent]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        for p, b in zip(absent, before):  # untouched: no update and no weight decay
            assert torch.equal(p.detach(), b), step
    assert all(torch.isfinite(p).all() for p in params)
    assert all(opt.state[p] for p in params)  # each got state once its gradient came
    assert opt.log_dict().get("hina/nonfinite_skipped", 0.0) == 0.0
