"""The fused path (chain math compiled per tensor) equals the eager paths, and falls back cleanly."""

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, Automagic_CameAMP_COptim, HinaAdamW
from hina_kohya.bench.syncs import count_host_syncs
from hina_kohya.core import fused as fused_mod
from helpers import TinyLoRANet, batch, params_of, train

ALL_ON = dict(use_orthogonal_grad=True, use_grams=True)  # with the defaults: every technique


def _pair(cls, precision, **kw):
    a, b = TinyLoRANet(2), TinyLoRANet(2)
    common = dict(lr=1e-2, state_precision=precision, min_8bit_size=16, **kw)
    return a, cls(a.groups(), fused=False, **common), b, cls(b.groups(), fused=True, **common)


@pytest.mark.parametrize("cls,kw", [
    (HinaAdamW, {}),
    (HinaAdamW, dict(ALL_ON, use_cautious=False)),  # Grams runs when Cautious is off
    (AdaptiveHinaAdamW, dict(warmup_steps=8, relationship_discovery_interval=4, max_lr=5e-2)),
])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_fused_equals_eager(cls, kw, precision):
    a, oa, b, ob = _pair(cls, precision, **kw)
    train(a, oa, 15)
    train(b, ob, 15)
    assert ob.fused and not oa.fused  # really compiled, no silent fallback
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
    p = a.layers[1].lora_up.weight
    q = b.layers[1].lora_up.weight
    torch.testing.assert_close(ob.state[q]["exp_avg"].float(), oa.state[p]["exp_avg"].float(), rtol=1e-3, atol=1e-6)


def test_fused_equals_eager_for_c_optims_data_dependent_rate():
    """C-Optim's multiplier is a device tensor: the fused path folds it into the rate column of
    the kernels' numbers; it must move the parameters exactly as the eager path's rate does."""
    a, oa, b, ob = _pair(Automagic_CameAMP_COptim, "fp32", warmup_steps=6)
    for model, opt in ((a, oa), (b, ob)):
        for s in range(12):
            x, y = batch(s, model.dims, model.dtype)
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.set_loss(loss.detach() * (1 + s % 3))  # an unsteady loss moves the multiplier
            opt.step()
    assert ob.fused and not oa.fused
    assert float(ob.context.multiplier) != 1.0  # the rate really was data-dependent
    torch.testing.assert_close(ob.context.multiplier, oa.context.multiplier)
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_fused_step_makes_no_host_syncs_and_logs():
    m = TinyLoRANet(0)
    opt = AdaptiveHinaAdamW(m.groups(), fused=True)
    train(m, opt, 2)  # compile outside the count
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    with count_host_syncs() as syncs:
        opt.step()
    assert syncs.count == 0, syncs.by_method
    assert 0 < opt.log_dict()["hina/cautious_kept/group0"] <= 1


def test_kept_call_plan_follows_repointed_parameters_and_replaced_grads():
    """The fused path keeps its per-chunk aliases between steps; a trainer that re-points
    ``p.data`` (a cast, a move) or hands in non-contiguous gradients must still get the eager
    path's result, not updates written into a stale storage."""
    a, oa, b, ob = _pair(HinaAdamW, "fp32")
    for step in range(6):
        for model, opt in ((a, oa), (b, ob)):
            for p in model.parameters():
                gen = torch.Generator().manual_seed(step * 1000 + p.numel())
                g = torch.randn(p.shape[::-1], generator=gen).t() if p.dim() == 2 else torch.randn(p.shape, generator=gen)
                p.grad = g  # a transposed (non-contiguous) gradient for the matrices
            opt.step()
            if step == 2:
                for p in model.parameters():
                    p.data = p.data.clone()  # new storage under the same Parameter objects
    assert ob.fused
    for x, y, init in zip(params_of(a), params_of(b), params_of(TinyLoRANet(2))):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)
        assert not torch.equal(y, init)  # the updates landed in the parameters' current storage


def test_optimizers_with_the_same_recipe_share_one_kernel():
    m = TinyLoRANet(0)
    o1, o2 = HinaAdamW(m.groups(), fused=True), HinaAdamW(m.groups(), fused=True)
    train(m, o1, 1)
    train(m, o2, 1)
    shared = [k for k in o1._kernels[0][0] if isinstance(k, tuple)]  # (chunk size, extra keys) -> kernel
    assert shared and all(o1._kernels[0][0][k] is o2._kernels[0][0][k] for k in shared)


@pytest.mark.parametrize("cls,precision", [("HinaAdamW", "fp32"), ("HinaAdamW", "8bit"),
                                             ("Automagic_CameAMP", "8bit")])  # list-wise / per-tensor eager
def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch, cls, precision):
    import hina_kohya

    def broken(*args, **kwargs):
        def kernel(*a, **k):
            raise RuntimeError("no C++ compiler")
        return kernel
    monkeypatch.setattr(fused_mod, "make_kernel", broken)
    a, b = TinyLoRANet(3), TinyLoRANet(3)
    kw = dict(state_precision=precision, min_8bit_size=16)
    ref = getattr(hina_kohya, cls)(a.groups(), fused=False, **kw)
    opt = getattr(hina_kohya, cls)(b.groups(), fused=True, **kw)
    with pytest.warns(UserWarning, match="fused kernels are unavailable"):
        train(b, opt, 5)
    train(a, ref, 5)
    assert not opt.fused
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        for key, value in ref.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt.state[q][key])), key


def test_default_fuses_every_chain_unless_switched_off(monkeypatch):
    from helpers import plain_hina

    monkeypatch.setenv("HINA_KOHYA_FUSED", "1")
    m = TinyLoRANet(0)
    for opt in (plain_hina(m.groups()), HinaAdamW(m.groups())):
        train(m, opt, 1)
        assert opt.fused and opt._kernels
    monkeypatch.setenv("HINA_KOHYA_FUSED", "0")
    off = HinaAdamW(m.groups())
    train(m, off, 1)
    assert not off.fused and not off._kernels


def test_failure_after_some_tensors_were_updated_is_raised_not_retried(monkeypatch):
    calls = {"n": 0}
    real = fused_mod.make_kernel

    def flaky(*args, **kwargs):
        k = real(*args, **kwargs)

        def kernel(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("a second graph variant failed to compile")
            return k(*a, **kw)
        return kernel
    monkeypatch.setattr(fused_mod, "make_kernel", flaky)
    m = TinyLoRANet(4)
    opt = HinaAdamW(m.groups(), fused=True)
    with pytest.raises(RuntimeError, match="second graph variant"):
        train(m, opt, 1)


def test_fused_8bit_with_the_batched_codec_equals_eager(monkeypatch):
    """LoRA-sized factors (whole 256-value blocks) go through the batched compiled codec, one
    decode and one encode per kernel call; a factor with a partial block goes alone; the result
    is the eager path's (whose states are decoded and encoded one tensor at a time)."""
    from hina_kohya import Automagic_CameAMP
    from hina_kohya.core import quant

    counts = []
    original = quant._compiled
    monkeypatch.setattr(quant, "_compiled", lambda key: counts.append(len(key[2])) or original(key))
    shapes = [(16, 320), (320, 16), (16, 320), (320, 16), (8, 1000), (16, 64)]
    gen = torch.Generator().manual_seed(11)
    targets = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = Automagic_CameAMP(params, lr=1e-2, max_lr=5e-2, warmup_steps=3, state_precision="8bit",
                                min_8bit_size=1024, fused=fused)
        for _ in range(6):
            opt.zero_grad()
            sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
            opt.step()
        assert opt.fused == fused and opt.state[params[0]]["exp_avg"].dtype == torch.uint8
        runs.append(params)
    assert counts and max(counts) >= 2  # several states per compiled codec call
    for x, y in zip(*runs):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_an_8bit_encode_failure_after_a_kernel_call_is_raised_not_retried(monkeypatch):
    """The call's kernel has already written its parameters when the 8-bit states are encoded:
    an error there (out of memory, a backend refusing) must not send the step to the eager path,
    which would update those parameters a second time."""
    from hina_kohya.core.quant import Quantizer

    def refuse(self, *args):
        raise RuntimeError("encode refused")
    monkeypatch.setattr(Quantizer, "encode_many", refuse)
    m = TinyLoRANet(4)
    opt = HinaAdamW(m.groups(), fused=True, state_precision="8bit", min_8bit_size=16)
    with pytest.raises(RuntimeError, match="encode refused"):
        train(m, opt, 1)
    assert opt.fused  # not switched to the eager path


@pytest.mark.parametrize("param_dtype,precision", [(torch.bfloat16, "fp32"), (torch.float32, "bf16")])
def test_fused_equals_eager_for_bf16_params_and_bf16_state(param_dtype, precision):
    a, b = TinyLoRANet(5, dtype=param_dtype), TinyLoRANet(5, dtype=param_dtype)
    oa = AdaptiveHinaAdamW(a.groups(), lr=1e-2, state_precision=precision, fused=False, warmup_steps=5)
    ob = AdaptiveHinaAdamW(b.groups(), lr=1e-2, state_precision=precision, fused=True, warmup_steps=5)
    la, lb = train(a, oa, 10), train(b, ob, 10)
    assert ob.fused
    for x, y in zip(params_of(a), params_of(b)):
        # same seeds for stochastic rounding: only fp32 arithmetic order differs
        torch.testing.assert_close(y.float(), x.float(), rtol=2e-2, atol=2e-3)
    assert abs(la[-1] - lb[-1]) < 0.02 * la[-1]


def test_each_kernel_has_its_own_code_object():
    """dynamo caches at most 8 variants per code object and then runs eagerly, silently: kernels
    of different recipes must not share one."""
    m = TinyLoRANet(0)
    a = HinaAdamW(m.groups(), fused=True)
    b = AdaptiveHinaAdamW(m.groups(), fused=True)
    train(m, a, 1)
    train(m, b, 1)
    ka = [v for k, v in a._kernels[0][0].items() if isinstance(k, tuple)]
    kb = [v for k, v in b._kernels[0][0].items() if isinstance(k, tuple)]
    codes = {getattr(k, "_torchdynamo_orig_callable", k).__code__ for k in ka + kb}
    assert len(codes) == len(ka) + len(kb)


def test_chunks_never_mix_shape_classes():
    """Each chunk holds tensors of one shape class (length, rows and columns of the matrix view
    above or below 4096, dims of size 1): mixing them multiplies compiled variants past dynamo's
    limit, after which it silently runs eagerly (found with the factored CAME statistics)."""
    shapes = [(16, 320), (320, 16), (1, 5000), (5000,), (8, 4100), (4100, 2), (3,), (16, 320), (320, 16), (7, 1)]
    ts = [torch.zeros(s) for s in shapes]
    classes = [fused_mod.shape_class(t) for t in ts]
    assert classes[0] != classes[4] and classes[2] == classes[3]  # a row vector is a 1-D tensor here
    assert classes[0][3:] == (False, False) and classes[4][4] and classes[5][3]
    out = fused_mod.chunks(classes, [t.numel() for t in ts], 2)
    assert sorted(i for c in out for i in c) == list(range(len(ts)))
    assert all(len({classes[i] for i in c}) == 1 for c in out)
    # equal classes still share calls: the four 5120-element LoRA factors, the two 5000-long rows
    assert sorted(sorted(c) for c in out if len(c) == 2) == [[0, 1], [2, 3], [7, 8]]


def test_8bit_states_are_decoded_one_kernel_call_at_a_time(monkeypatch):
    """Decoding every 8-bit state of a bucket before the kernels would hold the whole state in
    fp32 during the step (a higher peak than fp32 state). The fused path decodes each call's
    states into reused buffers right before the call and encodes them right after; its results
    are the eager path's, and the call plan is kept between steps as for fp32 state."""
    from hina_kohya import Automagic_CameAMP
    from hina_kohya.core.quant import Quantizer

    a, oa, b, ob = _pair(Automagic_CameAMP, "8bit", warmup_steps=4, max_lr=5e-2)
    train(a, oa, 3)
    train(b, ob, 3)
    events, inside = [], []
    for name in ("decode", "decode_many", "encode_many"):
        original = getattr(Quantizer, name)

        def spy(self, *args, _name=name, _original=original, **kw):
            if not inside:  # a batched call may decode or encode through the per-tensor methods
                if _name == "decode":
                    events.append(("decode", args[0].data_ptr()))
                else:  # (codes, absmax, signed, out) / (xs, signed, codes, absmax)
                    codes = args[0] if _name == "decode_many" else args[2]
                    events.extend((_name, c.data_ptr()) for c in codes)
            inside.append(_name)
            try:
                return _original(self, *args, **kw)
            finally:
                inside.pop()
        monkeypatch.setattr(Quantizer, name, spy)

    def spied(kernel):
        def call(*args):
            events.append(("kernel", None))
            return kernel(*args)
        return call
    for kernels, _, _ in ob._kernels.values():  # the compiled calls, made in the steps above
        for key in [k for k in kernels if isinstance(k, tuple)]:
            kernels[key] = spied(kernels[key])
    plan = dict(ob._plans)
    train(b, ob, 2, start=3)
    assert plan and all(ob._plans[k] is v for k, v in plan.items())  # kept between steps
    buffers = [buf for entry in ob._plans.values() for buf in entry[4]]
    assert buffers and all(buf.untyped_storage().nbytes() == 0 for buf in buffers)  # no memory between steps
    assert [e for e, _ in events if e == "decode"] == []  # no whole-state decode
    quantized = {id(st["exp_avg"]) for st in ob.state.values() if "exp_avg.absmax" in st}
    assert quantized, "the test needs 8-bit states"
    # per step and call: the call's decodes, the kernel, the same states' encodes
    kinds = [e for e, _ in events]
    assert kinds.count("kernel") > 0 and kinds.count("decode_many") == kinds.count("encode_many")
    i = 0
    while i < len(events):
        decoded = []
        while events[i][0] == "decode_many":
            decoded.append(events[i][1])
            i += 1
        assert events[i][0] == "kernel"
        i += 1
        encoded = []
        while i < len(events) and events[i][0] == "encode_many":
            encoded.append(events[i][1])
            i += 1
        assert encoded == decoded
    train(a, oa, 2, start=3)
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_bf16_states_are_widened_one_kernel_call_at_a_time():
    """bf16 state goes through the same per-call buffers as 8-bit state (widened before the call,
    rounded stochastically back after it): widening a whole group up front held it in fp32 as
    well as in bf16, a higher peak than fp32 state."""
    # Grams, not the default Cautious: a bf16 state that rounds differently on one element can flip
    # that element's Cautious mask (its update is near 0 there), and the path comparison below is
    # about the buffers, not about the shaping
    a, oa, b, ob = _pair(HinaAdamW, "bf16", use_cautious=False, use_grams=True)
    train(a, oa, 4)
    train(b, ob, 4)
    assert ob.fused
    buffers = [buf for entry in ob._plans.values() for buf in entry[4]]
    assert buffers and all(buf.untyped_storage().nbytes() == 0 for buf in buffers)  # no memory between steps
    for p, q in zip(a.parameters(), b.parameters()):
        for key, value in oa.state[p].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert ob.state[q][key].dtype == value.dtype == torch.bfloat16
                torch.testing.assert_close(ob.state[q][key].float(), value.float(), rtol=2e-2, atol=1e-6)
    for x, y in zip(params_of(a), params_of(b)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)
