"""The eager paths (``fused=False``, or where compilation is unavailable: GPUs without Triton, CPUs
without a compiler) run few operations per tensor -- on a GPU each is a kernel launch. The
per-tensor path (the Automagic family) steps same-shaped tensors together, one vmapped call of the
per-tensor math per group, with the results of stepping them one at a time (``foreach=False``, the
reference path) and a fraction of its operations; the list-wise path (the Hina recipes) keeps its
per-tensor operations to the few that have no list-wise form."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hina_kohya import (AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        HinaAdamW)
from helpers import OPT_IN, TinyLoRANet, params_of, train

SAME_SHAPES = (16, 16, 16, 16)  # three [4, 16] down factors and three [16, 4] up factors
CASES = [
    (Automagic_CameAMP, dict(warmup_steps=6)),
    (Automagic_CameAMP_COptim, dict(warmup_steps=6)),
    (Automagic_CameAMP_Improved, dict(warmup_steps=6, **OPT_IN)),  # every opt-in heuristic
]


def _run(cls, kw, batched, precision="fp32", steps=9, nan_at=4, dtype=torch.float64):
    model = TinyLoRANet(2, dtype=dtype, dims=SAME_SHAPES)
    opt = cls(model.groups(), fused=False, foreach=None if batched else False, lr=1e-2, max_lr=5e-2,
              lr_bump=2e-3, state_precision=precision, min_8bit_size=16, **kw)
    for s in range(steps):
        if s == nan_at:  # one tensor of a group gets a NaN gradient: it alone is skipped
            _poisoned_step(model, opt, s)
        else:
            train(model, opt, 1, start=s)
    return model, opt


def _poisoned_step(model, opt, s):
    class Poison:
        def zero_grad(self, set_to_none=True):
            opt.zero_grad(set_to_none=set_to_none)

        def step(self):
            model.layers[1].lora_down.weight.grad[0, 0] = float("nan")
            opt.step()

    train(model, Poison(), 1, start=s)


@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_batched_eager_step_equals_one_tensor_at_a_time(cls, kw, precision):
    ref_model, ref = _run(cls, kw, batched=False, precision=precision)
    model, opt = _run(cls, kw, batched=True, precision=precision)
    assert opt._batched and not ref._batched
    for a, b in zip(params_of(ref_model), params_of(model)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    for pa, pb in zip(ref_model.parameters(), model.parameters()):
        sa, sb = ref.state[pa], opt.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if torch.is_tensor(sa[k]) and sa[k].is_floating_point():
                torch.testing.assert_close(sb[k].double(), sa[k].double(), rtol=1e-9, atol=1e-12, msg=k)
    la, lb = ref.log_dict(), opt.log_dict()
    assert la["hina/nonfinite_skipped"] == lb["hina/nonfinite_skipped"] == 1.0
    assert la.keys() == lb.keys()
    for k in la:
        assert lb[k] == pytest.approx(la[k], rel=1e-9, abs=1e-12), k


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(opt, model, step=3):
    train(model, opt, step)
    x = torch.randn(8, model.dims[0], dtype=model.dtype)
    opt.zero_grad()
    model(x).square().mean().backward()
    with _CountOps() as count:
        opt.step()
    return count.n


def test_batched_eager_step_runs_each_operation_once_per_shape():
    dims = (16,) * 9  # 8 down factors [4, 16] in one group, 8 up factors [16, 4] and a vector in the other
    counts = {}
    for name, kw in (("one at a time", dict(foreach=False)), ("batched", {}),
                     ("groups of one tensor", dict(group_elements=64))):
        model = TinyLoRANet(0, dims=dims)
        opt = Automagic_CameAMP(model.groups(), fused=False, warmup_steps=2, **{k: v for k, v in kw.items()
                                                                                if k == "foreach"})
        if "group_elements" in kw:
            opt.GROUP_ELEMENTS = kw["group_elements"]  # 64 elements: each [4, 16] tensor is its own group
        counts[name] = _ops_per_step(opt, model)
    # 17 tensors in 3 shapes: per-tensor work runs 3 times instead of 17 (stacking and copying back
    # add a few operations per tensor)
    assert counts["batched"] < counts["one at a time"] / 3, counts
    assert counts["groups of one tensor"] >= counts["one at a time"] * 0.95, counts


def test_batched_eager_step_falls_back_to_one_tensor_at_a_time(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no batching rule")

    ref_model, _ = _run(Automagic_CameAMP, dict(warmup_steps=6), batched=False, nan_at=None)
    monkeypatch.setattr(torch.func, "vmap", unavailable)
    with pytest.warns(UserWarning, match="batched eager step is unavailable .*no batching rule.*one tensor at a time"):
        model, opt = _run(Automagic_CameAMP, dict(warmup_steps=6), batched=True, nan_at=None)
    assert not opt._batched
    for a, b in zip(params_of(ref_model), params_of(model)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_batched_eager_step_writes_bf16_parameters_through_their_master_copies():
    runs = []
    for batched in (False, True):
        model = TinyLoRANet(2, dtype=torch.bfloat16, dims=SAME_SHAPES)
        opt = Automagic_CameAMP(model.groups(), fused=False, foreach=None if batched else False, lr=1e-2,
                                max_lr=5e-2, warmup_steps=6, master_weights=True)
        train(model, opt, 5)
        runs.append([opt.state[p]["master_param"] for p in model.parameters()])
    start = TinyLoRANet(2, dtype=torch.bfloat16, dims=SAME_SHAPES).parameters()
    moved = max(float((m - p.float()).abs().max()) for m, p in zip(runs[1], start))
    assert moved > 1e-3  # the steps changed the weights
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls,kw", CASES)
def test_batched_eager_step_makes_no_host_syncs(cls, kw):
    from hina_kohya.bench.syncs import count_host_syncs

    model = TinyLoRANet(0, dims=SAME_SHAPES)
    opt = cls(model.groups(), fused=False, lr=1e-3, **kw)
    train(model, opt, 4)  # into the late warm-up: Cautious and the lr mask's d_coef run
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with count_host_syncs() as syncs:
        opt.step()
    assert opt._batched
    assert syncs.count == 0, syncs.by_method


ALL_HINA = dict(use_spd=True, use_cautious=True, use_orthogonal_grad=True, use_adopt_stability=True, use_agr=True,
                use_tam=True, dynamic_weight_decay=True)


@pytest.mark.parametrize("cls,kw,budget", [(HinaAdamW, {}, 22), (HinaAdamW, ALL_HINA, 28),
                                           (AdaptiveHinaAdamW, dict(warmup_steps=10), 45)])
def test_list_wise_step_runs_few_operations_per_tensor(cls, kw, budget):
    # operations added by 16 more tensors: the per-tensor ones (list-wise ops count once per list).
    # The non-finite snapshot and checks, TAM's and SPD's per-tensor numbers used to take 66 / 70 /
    # 122 per tensor here (the finiteness of each tensor and state alone: ~20); now 20 / 25.5 / 42
    counts = []
    for layers in (4, 12):
        model = TinyLoRANet(0, dims=(16,) * (layers + 1))
        counts.append(_ops_per_step(cls(model.groups(), fused=False, **kw), model))
    per_tensor = (counts[1] - counts[0]) / 16
    assert per_tensor <= budget, counts


def test_compile_failure_falls_back_to_the_batched_eager_step(monkeypatch):
    # what a GPU without Triton (or a CPU without a compiler) runs: the fused kernels fail on the
    # first step, and the Automagic recipe steps same-shaped tensors together from then on
    from hina_kohya.core import fused as fused_mod
    from hina_kohya.core.optimizer import HinaOptimizer

    def broken(*args, **kwargs):
        def kernel(*a, **k):
            raise RuntimeError("Cannot find a working triton installation")
        return kernel

    groups = []
    step_group = HinaOptimizer._step_group

    def spy(self, b, ids, *args, **kwargs):
        groups.append(len(ids))
        return step_group(self, b, ids, *args, **kwargs)

    monkeypatch.setattr(fused_mod, "make_kernel", broken)
    monkeypatch.setattr(HinaOptimizer, "_step_group", spy)
    ref_model, model = TinyLoRANet(2, dims=SAME_SHAPES), TinyLoRANet(2, dims=SAME_SHAPES)
    ref = Automagic_CameAMP(ref_model.groups(), fused=False, lr=1e-2, max_lr=5e-2, warmup_steps=6)
    opt = Automagic_CameAMP(model.groups(), fused=True, lr=1e-2, max_lr=5e-2, warmup_steps=6)
    with pytest.warns(UserWarning, match="fused kernels are unavailable .*triton.*using the eager path"):
        train(model, opt, 5)
    assert not opt.fused and opt._batched
    assert groups and max(groups) == 3  # the three [4, 16] and the three [16, 4] factors
    train(ref_model, ref, 5)
    for a, b in zip(params_of(ref_model), params_of(model)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
