"""The Riemannian preconditioner (opt-in ``use_riemannian``): the r x r Gram-matrix scaling of each
factor's gradient, against a float64 transcription of the formula."""

import pytest
import torch

from hina_kohya import HinaAdamW
from hina_kohya.transforms.preconditioner import chain_order, damped_inverse

from helpers import TECHNIQUES_OFF


def _reference(g: torch.Tensor, partner: torch.Tensor, left: bool, reg: float) -> torch.Tensor:
    """float64: G_L mu (R R^T + reg mu I)^-1 for a left factor, mu (L^T L + reg mu I)^-1 G_R for a right one."""
    g, partner = g.double(), partner.double()
    gram = partner @ partner.T if left else partner.T @ partner
    r = gram.shape[0]
    mu = torch.trace(gram) / r
    p = mu * torch.linalg.inv(gram + reg * mu * torch.eye(r, dtype=torch.float64))
    return g @ p if left else p @ g


def test_chain_order_finds_the_product_and_its_rank():
    down, up = torch.zeros(4, 32), torch.zeros(64, 4)
    assert chain_order(down, up) == (1, 0)  # up @ down
    assert chain_order(up, down) == (0, 1)
    w2a, w2b = torch.zeros(16, 4), torch.zeros(4, 8)
    assert chain_order(w2a, w2b) == (0, 1)
    conv_down, conv_up = torch.zeros(4, 8, 3, 3), torch.zeros(16, 4, 1, 1)
    assert chain_order(conv_down, conv_up) == (1, 0)
    assert chain_order(torch.zeros(3, 5), torch.zeros(7, 2)) is None


def test_a_zero_partner_leaves_the_gradient_alone():
    assert torch.equal(damped_inverse(torch.zeros(4, 4), 1e-2), torch.eye(4))


@pytest.mark.parametrize("reg", [1e-2, 1e-4])
def test_the_first_step_is_adam_on_the_preconditioned_gradient(reg):
    torch.manual_seed(0)
    down = torch.nn.Parameter(torch.randn(4, 12, dtype=torch.float64))
    up = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64) * 0.1)
    names = ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"]
    gd, gu = torch.randn(4, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    want_d, want_u = _reference(gd, up.detach(), left=False, reg=reg), _reference(gu, down.detach(), left=True, reg=reg)
    plain = dict(TECHNIQUES_OFF, weight_decay=0.0)
    opt = HinaAdamW([{"params": [down, up], "param_names": names}], lr=1e-3, use_riemannian=True, riemannian_reg=reg,
                    betas=(0.0, 0.0), eps=1e-30, fused=False, **plain)
    before = [down.detach().clone(), up.detach().clone()]
    down.grad, up.grad = gd, gu
    opt.step()
    # with beta1 = beta2 = 0 Adam's step is lr * sign(g): the preconditioned gradient's signs
    for p, b, want in zip((down, up), before, (want_d, want_u)):
        torch.testing.assert_close(b - p.detach(), 1e-3 * torch.sign(want), rtol=0, atol=1e-12)
    # and the preconditioning changed some signs (otherwise this test could not fail)
    assert not torch.equal(torch.sign(want_u), torch.sign(gu)) or not torch.equal(torch.sign(want_d), torch.sign(gd))


def test_the_moments_see_the_preconditioned_gradient_on_every_path():
    torch.manual_seed(1)
    named = [("lora_unet_x.lora_down.weight", torch.randn(4, 12)), ("lora_unet_x.lora_up.weight", torch.randn(10, 4)),
             ("lora_unet_x.alpha_vec", torch.randn(10))]
    grads = [torch.randn_like(t) for _, t in named]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for _, t in named]
        opt = HinaAdamW([{"params": params, "param_names": [n for n, _ in named]}], lr=1e-2, use_riemannian=True,
                        fused=fused)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_names_are_needed_and_unpaired_tensors_are_untouched():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(6, 6))
    twin = torch.nn.Parameter(w.detach().clone())
    g = torch.randn(6, 6)
    a = HinaAdamW([w], lr=1e-2, use_riemannian=True, fused=False)
    b = HinaAdamW([twin], lr=1e-2, use_riemannian=False, fused=False)
    w.grad, twin.grad = g.clone(), g.clone()
    a.step()
    b.step()
    assert torch.equal(w, twin)


def test_the_regularisation_must_be_positive():
    with pytest.raises(ValueError, match="riemannian_reg"):
        HinaAdamW([torch.nn.Parameter(torch.zeros(2))], use_riemannian=True, riemannian_reg=0.0)
