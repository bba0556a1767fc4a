"""The eager paths (``fused=False``, or where compilation is unavailable) hold a bounded part of a
step in memory: the list-wise path steps a bucket in slices, and both eager paths decode 8-bit and bf16
states a slice at a time -- never a whole param group's -- with the results of the whole-bucket step."""

import weakref

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, Automagic_CameAMP, HinaAdamW
from hina_kohya.core import quant
from helpers import TinyLoRANet, params_of, train

ALL_ON = dict(use_spd=True, use_cautious=True, use_orthogonal_grad=True, use_adopt_stability=True, use_agr=True,
              use_tam=True, dynamic_weight_decay=True)
CASES = [
    (HinaAdamW, {}),
    (HinaAdamW, ALL_ON),
    (AdaptiveHinaAdamW, dict(ALL_ON, warmup_steps=4, relationship_discovery_interval=3, max_lr=5e-2)),
    (Automagic_CameAMP, dict(warmup_steps=4, max_lr=5e-2)),  # the per-tensor eager path
]


def _trained(cls, kw, precision, slice_elements, steps=8, nan_at=None):
    model = TinyLoRANet(3)
    opt = cls(model.groups(), fused=False, lr=1e-2, state_precision=precision, min_8bit_size=16, **kw)
    opt.SLICE_ELEMENTS = slice_elements
    for s in range(steps):
        if s == nan_at:
            _nan_step(model, opt, s)
        else:
            train(model, opt, 1, start=s)
    return model, opt


def _nan_step(model, opt, s):
    """A step where one tensor's gradient is NaN: that tensor (only) must be skipped."""
    train(model, _GradHook(opt, model.layers[1].lora_down.weight), 1, start=s)


class _GradHook:
    def __init__(self, opt, p):
        self.opt, self.p = opt, p

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.p.grad[0, 0] = float("nan")
        self.opt.step()


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_eager_slices_equal_the_whole_bucket_bit_for_bit(cls, kw, precision):
    whole_model, whole = _trained(cls, kw, precision, 1 << 30, nan_at=5)
    sliced_model, sliced = _trained(cls, kw, precision, 100, nan_at=5)  # TinyLoRANet's tensors: 64-256 elements
    sizes = [p.numel() for p in sliced_model.parameters()]
    assert len(sliced._slices(sizes)) >= 3 and len(whole._slices(sizes)) == 1
    for a, b in zip(params_of(whole_model), params_of(sliced_model)):
        assert torch.equal(a, b)
    for p, q in zip(whole_model.parameters(), sliced_model.parameters()):
        for key, value in whole.state[p].items():
            other = sliced.state[q][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), key
    logs_a, logs_b = whole.log_dict(), sliced.log_dict()
    assert logs_a == logs_b and logs_a["hina/nonfinite_skipped"] == 1.0


def _spy_decodes(monkeypatch):
    """Record every batch of 8-bit / bf16 states the eager paths decode, and whether an earlier
    batch's decoded tensors were still alive when it was decoded."""
    calls, alive_before = [], []
    original = quant.decode_fresh

    def spy(handles):
        alive_before.append(sum(ref() is not None for batch in calls for ref in batch))
        out = original(handles)
        calls.append([weakref.ref(t) for t in out])
        return out
    monkeypatch.setattr(quant, "decode_fresh", spy)
    whole_state = []
    monkeypatch.setattr(quant.Quantizer, "decode", lambda *a, **k: whole_state.append(1) or pytest.fail(
        "an 8-bit state was decoded outside the slice / tensor being stepped"))
    return calls, alive_before


def _compact(st: dict) -> list[str]:
    """The keys of states stored below fp32 (8-bit codes or bf16)."""
    return [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0
            and v.dtype in (torch.uint8, torch.bfloat16)]


@pytest.mark.parametrize("precision", ["8bit", "bf16"])
@pytest.mark.parametrize("cls,kw,slice_elements", [
    (HinaAdamW, ALL_ON, 100),  # the list-wise path
    (Automagic_CameAMP, dict(warmup_steps=3), 100),  # the per-tensor eager path
])
def test_eager_paths_decode_compact_states_a_slice_at_a_time(monkeypatch, cls, kw, slice_elements,
                                                                         precision):
    model = TinyLoRANet(3)
    opt = cls(model.groups(), fused=False, lr=1e-2, state_precision=precision, min_8bit_size=16, **kw)
    opt.SLICE_ELEMENTS = slice_elements
    train(model, opt, 2)
    compact = [p for p in model.parameters() if _compact(opt.state[p])]
    assert len(compact) >= 4, "the test needs several tensors with 8-bit / bf16 state"
    calls, alive_before = _spy_decodes(monkeypatch)
    before = params_of(model)
    train(model, opt, 2, start=2)
    assert len(calls) >= 2 * 3  # per step, several slices
    assert max(alive_before) == 0  # each batch's decoded states were gone before the next was decoded
    states = sum(len(_compact(opt.state[p])) for p in compact)
    assert sum(len(c) for c in calls) == 2 * states  # each state decoded once per step, by the spied path
    assert max(len(c) for c in calls) < states  # never a whole group's states at once
    assert all(not torch.equal(a, b) for a, b in zip(before, params_of(model)))  # the steps did run


def test_slices_bound_elements_and_keep_order():
    opt = HinaAdamW([torch.nn.Parameter(torch.zeros(4))], lr=1e-3, fused=False)
    opt.SLICE_ELEMENTS = 100
    sizes = [60, 50, 10, 200, 30]
    assert opt._slices(sizes) == [[0], [1, 2], [3], [4]]  # 60+50 > 100; a tensor larger than a slice goes alone
    opt.SLICE_ELEMENTS = 1 << 24
    assert opt._slices(sizes) == [[0, 1, 2, 3, 4]]
    assert opt._slices([]) == [] and opt._slices([1 << 30]) == [[0]]
