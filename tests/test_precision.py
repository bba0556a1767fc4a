"""bf16 / fp16 parameters: fp32 math, careful write-back."""

import pytest
import torch

from hina_kohya.core.precision import stochastic_round_bf16
from helpers import plain_hina


def test_stochastic_rounding_is_unbiased_and_deterministic():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 neighbours (1.0 and 1.0078125)
    g = torch.Generator().manual_seed(0)
    r = stochastic_round_bf16(x, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(stochastic_round_bf16(x, g2).float(), r)
    neg = stochastic_round_bf16(-x, torch.Generator().manual_seed(1)).float()
    assert abs(neg.mean().item() + x[0].item()) < 2e-5
    assert torch.isinf(stochastic_round_bf16(torch.tensor([float("inf")]), g)).all()


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_bf16_params_learn_small_updates(rounding):
    """An update of ~1e-4 relative to the weight is below bf16's resolution (2**-8): nearest
    rounding loses it, stochastic rounding / Kahan keep it on average."""
    w0 = torch.ones(4096, dtype=torch.bfloat16)
    p = torch.nn.Parameter(w0.clone())
    opt = plain_hina([p], lr=1e-4, weight_decay=0.0, bf16_rounding=rounding)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        opt.step()
    moved = (1.0 - p.float().mean()).item()
    assert abs(moved - 100 * 1e-4) < 2e-3, moved

    q = torch.nn.Parameter(w0.clone())
    near = plain_hina([q], lr=1e-4, weight_decay=0.0, bf16_rounding="nearest")
    for _ in range(100):
        q.grad = torch.ones_like(q)
        near.step()
    assert q.float().mean().item() == 1.0


def test_bf16_weight_decay_has_its_effect():
    p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = plain_hina([p], lr=1e-3, weight_decay=0.1)
    for _ in range(200):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert abs(p.float().mean().item() - (1 - 1e-4) ** 200) < 2e-3


def test_fp16_params_refused_without_master_copy():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="master_weights=True"):
        plain_hina([p])


def test_fp16_cast_after_construction_is_refused_at_step():
    p = torch.nn.Parameter(torch.ones(8))
    opt = plain_hina([p])
    p.data = p.data.half()  # what sd-scripts' --full_fp16 does after building the optimizer
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="master_weights=True"):
        opt.step()


def test_fp16_with_master_weights_tracks_fp32():
    ref = torch.nn.Parameter(torch.ones(64))
    half = torch.nn.Parameter(torch.ones(64, dtype=torch.float16))
    o_ref = plain_hina([ref], lr=1e-4)
    o_half = plain_hina([half], lr=1e-4, master_weights=True)
    for _ in range(50):
        ref.grad = torch.ones_like(ref)
        half.grad = torch.ones_like(half)
        o_ref.step()
        o_half.step()
    assert o_half.state[half]["master_param"].dtype == torch.float32
    torch.testing.assert_close(o_half.state[half]["master_param"], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(half.float(), ref.detach(), rtol=1e-3, atol=1e-3)
