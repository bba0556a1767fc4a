"""8-bit and bf16 state storage."""

import sys

import pytest
import torch

from hina_kohya.core import quant
from hina_kohya.core.chain import StateSpec
from hina_kohya.core.quant import Quantizer, StateStore, dynamic_map
from helpers import TinyLoRANet, params_of, plain_hina, train


def test_dynamic_maps_equal_bitsandbytes_maps():
    F = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        ours = dynamic_map(signed)
        theirs = torch.sort(F.create_dynamic_map(signed=signed)).values
        assert ours.shape == (256,)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-7)
    assert dynamic_map(False).min() == 0 and dynamic_map(True).max() == 1
    assert -1 < dynamic_map(True).min() < -0.99


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_roundtrip_error_is_small(backend, signed):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs() ** 2
    q = Quantizer(backend)
    codes, absmax = q.encode(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.shape == (-(-x.numel() // quant.BLOCK),)
    y = q.decode(codes, absmax, signed)
    blockmax = absmax.repeat_interleave(quant.BLOCK)[: x.numel()]
    assert ((y - x).abs() <= 0.04 * blockmax + 1e-12).all()


def test_backends_produce_the_same_codes():
    pytest.importorskip("bitsandbytes")
    x = torch.randn(4 * quant.BLOCK + 17, generator=torch.Generator().manual_seed(1))
    for signed in (True, False):
        v = x if signed else x.abs()
        a = Quantizer("bitsandbytes").encode(v, signed)
        b = Quantizer("torch").encode(v, signed)
        torch.testing.assert_close(a[1], b[1])
        mismatch = (a[0].int() - b[0].int()).abs()
        assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 0.01  # only exact ties may differ


def test_eight_bit_pair_is_at_most_2_1_bytes_per_element():
    p = torch.nn.Parameter(torch.randn(1000, 1000))
    opt = plain_hina([p], state_precision="8bit")
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    nbytes = StateStore.nbytes(opt.state[p])
    assert nbytes / p.numel() <= 2.1
    assert opt.state_bytes_per_element() <= 2.1
    fp32 = plain_hina([torch.nn.Parameter(torch.randn(1000, 1000))])
    fp32.param_groups[0]["params"][0].grad = torch.randn(1000, 1000)
    fp32.step()
    assert fp32.state_bytes_per_element() == 8.0


def test_small_tensors_stay_fp32_under_8bit():
    p = torch.nn.Parameter(torch.randn(10, 10))
    opt = plain_hina([p], state_precision="8bit")  # 100 < 4096
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def _hide_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)


def test_fallback_selected_when_bitsandbytes_hidden_and_same_trajectory(monkeypatch):
    kw = dict(lr=1e-2, state_precision="8bit", min_8bit_size=16)
    ref = TinyLoRANet(2)
    train(ref, plain_hina(ref.groups(), lr=1e-2), 30)
    a = TinyLoRANet(2)
    oa = plain_hina(a.groups(), **kw)
    la = train(a, oa, 30)
    _hide_bitsandbytes(monkeypatch)
    b = TinyLoRANet(2)
    with pytest.warns(UserWarning, match="pure-torch blockwise store"):
        ob = plain_hina(b.groups(), **kw)
        lb = train(b, ob, 30)
    assert ob.store.quantizer.backend_for(torch.device("cpu")) == "torch"
    # "within quantization tolerance": the two 8-bit stores are no farther apart than 8-bit is from fp32
    backend_gap = max((x - y).abs().max().item() for x, y in zip(params_of(a), params_of(b)))
    quant_gap = max((x - y).abs().max().item() for x, y in zip(params_of(a), params_of(ref)))
    assert backend_gap <= quant_gap, (backend_gap, quant_gap)
    assert abs(la[-1] - lb[-1]) < 0.02 * la[-1]
    p = b.layers[1].lora_up.weight
    assert ob.state[p]["exp_avg"].dtype == torch.uint8


def test_eight_bit_trains_close_to_fp32():
    a, b = TinyLoRANet(3), TinyLoRANet(3)
    la = train(a, plain_hina(a.groups(), lr=1e-2), 40)
    lb = train(b, plain_hina(b.groups(), lr=1e-2, state_precision="8bit", min_8bit_size=16), 40)
    assert lb[-1] < 0.7 * lb[0]
    assert abs(la[-1] - lb[-1]) < 0.1 * la[-1]


def test_bf16_state_ema_still_decays():
    """Round-to-nearest bf16 cannot represent v * 0.999 near 1 (it stays 1.0); stochastic
    rounding makes the stored EMA decay in expectation."""
    store = StateStore("bf16", seed=0)
    spec = StateSpec("v", signed=False)
    st = {}
    store.create(st, spec, torch.zeros(4096), torch.float32)
    st["v"].fill_(1.0)
    for t in range(1, 1001):
        v = store.read(st, spec, torch.float32)
        v.mul_(0.999)
        store.write(st, spec, v, t, 0)
    mean = st["v"].float().mean().item()
    assert abs(mean - 0.999 ** 1000) < 0.01, mean
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest = (nearest.float() * 0.999).to(torch.bfloat16)
    assert nearest.float().mean().item() == 1.0  # the failure mode this avoids


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="state_precision"):
        plain_hina([torch.nn.Parameter(torch.zeros(2))], state_precision="int4")
