"""8-bit and bf16 state storage."""

import sys
import warnings

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


def _nearest_codes(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference encode: each block scaled by its absmax, then the number of map midpoints
    below each value (a search over the sorted map: the nearest entry's index)."""
    table = dynamic_map(signed)
    mids = (table[1:] + table[:-1]) / 2
    flat = x.reshape(-1).float()
    n, nblocks = flat.numel(), -(-x.numel() // quant.BLOCK)
    blocks = torch.nn.functional.pad(flat, (0, nblocks * quant.BLOCK - n)).view(nblocks, quant.BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(scaled, mids).view(-1)[:n].to(torch.uint8).view(x.shape)
    return codes, absmax


def _hard_values(signed: bool) -> torch.Tensor:
    """Every map entry and midpoint, one float step either side of each midpoint, the edges of
    the encoder's lookup range, zeros; each block opens with 1.0 so that the scaled values are
    these values exactly; plus random blocks, an all-zero block and a partial last block."""
    table = dynamic_map(signed)
    mids = (table[1:] + table[:-1]) / 2
    around = torch.cat([mids, torch.nextafter(mids, torch.tensor(-2.0)), torch.nextafter(mids, torch.tensor(2.0)),
                        table, torch.tensor([0.0, -0.0, 1e-30, 2.0 ** -24, 2.0 ** -23, 3e-7, 1.0])])
    if signed:
        around = torch.cat([around, -around])
    per = quant.BLOCK - 1
    pad = -around.numel() % per
    blocks = torch.cat([around, torch.zeros(pad)]).view(-1, per)
    exact = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).view(-1)
    noise = torch.randn(5 * quant.BLOCK, generator=torch.Generator().manual_seed(3)) * 1e-3
    noise = noise if signed else noise.abs() ** 2
    noise[:quant.BLOCK] = 0.0
    noise[2 * quant.BLOCK + 7] = -0.05 if signed else 0.05  # a block whose largest magnitude is negative
    # the same blocks under a peak that is not a power of two (the scaling division is inexact)
    return torch.cat([exact, exact * 0.7, noise, noise[:37] * 1e6])  # the last block has 37 values


@pytest.mark.parametrize("signed", [True, False])
def test_each_lookup_bucket_holds_at_most_one_map_midpoint(signed):
    """The encoder's premise (its buckets are narrower than the map's tightest spacing); checked
    here rather than when the tables are built, which happens in an optimizer's first 8-bit step,
    where it would be the step's only tensor-to-Python conversions."""
    table = dynamic_map(signed)
    mids = (table[1:] + table[:-1]) / 2
    u = torch.arange(quant._LOOKUP_FIRST, quant._LOOKUP_FIRST + quant._LOOKUP_BUCKETS, dtype=torch.int64)
    low = (u << quant._SHIFT).to(torch.int32).view(torch.float32).clone()
    high = (((u + 1) << quant._SHIFT) - 1).to(torch.int32).view(torch.float32)
    low[0] = 0.0
    counts = [torch.searchsorted(mids, hi) - torch.searchsorted(mids, lo) for lo, hi in ((low, high), (-high, -low))]
    assert all(c.max() <= 1 for c in counts)
    assert counts[0].sum() == (mids > 0).sum()  # the buckets cover every positive midpoint
    base, above = quant.lookup_tables(signed)
    assert base.shape == above.shape == (2 * quant._LOOKUP_BUCKETS,)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("compiled", [True, False])
def test_lookup_encoder_gives_the_nearest_codes_bit_for_bit(signed, compiled):
    x = _hard_values(signed)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(-(-x.numel() // quant.BLOCK))
    q = Quantizer("torch")
    if compiled:
        q.encode_into(x, signed, codes, absmax)
        assert not q._broken
    else:
        quant._encode_many(quant._flat([x]), *quant.lookup_tables(signed), quant._flat([codes]), [absmax])
    want_codes, want_absmax = _nearest_codes(x, signed)
    assert torch.equal(absmax, want_absmax)
    assert torch.equal(codes, want_codes), (codes != want_codes).nonzero()[:5]
    assert torch.equal(q.encode(torch.empty(0), signed)[1], torch.zeros(1))  # an empty state: a zero block maximum
    for shape in [(quant.BLOCK * 3,), (5, 100), (quant.BLOCK,), (7,)]:  # whole blocks, a tail, one block, under one
        y = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
        y = y if signed else y.abs()
        c, a = q.encode(y, signed)
        assert torch.equal(c, _nearest_codes(y, signed)[0]) and torch.equal(a, _nearest_codes(y, signed)[1])


def test_auto_backend_encodes_on_the_cpu_with_the_compiled_lookup(monkeypatch):
    pytest.importorskip("bitsandbytes")
    q = Quantizer("auto")
    assert q.backend_for(torch.device("cpu")) == "bitsandbytes"  # probed (it encodes once) before the spy
    calls = []
    monkeypatch.setattr(q, "_encode_bnb", lambda *a, **k: calls.append("bnb"))
    x = torch.randn(3 * quant.BLOCK + 5)
    codes, absmax = q.encode(x, True)
    assert calls == [] and not q._broken and q.codec_for(torch.device("cpu")) == "torch lookup"
    assert torch.equal(codes, _nearest_codes(x, True)[0])
    forced = Quantizer("bitsandbytes")
    forced.backend_for(torch.device("cpu"))
    monkeypatch.setattr(forced, "_encode_bnb", lambda *a, **k: calls.append("bnb"))
    forced.encode(x, True)
    assert calls == ["bnb"] and forced.codec_for(torch.device("cpu")) == "bitsandbytes"  # an explicit choice stays


@pytest.mark.parametrize("name", ["HinaAdamW", "AdaptiveHinaAdamW", "Automagic_CameAMP8bit"])
def test_every_recipe_takes_the_codec_choice(name):
    """``quant_backend`` reaches the state store of every recipe (it picks the codec the 8-bit
    states are encoded with), and a bad value is refused naming it."""
    import hina_kohya
    cls = getattr(hina_kohya, name)
    p = torch.nn.Parameter(torch.zeros(64, 64))
    opt = cls([p], state_precision="8bit", quant_backend="torch")
    assert opt.store.quantizer.requested == "torch"
    assert opt.store.quantizer.codec_for(torch.device("cpu")) == "torch lookup"
    with pytest.raises(ValueError, match="quant_backend='gpu'"):
        cls([p], quant_backend="gpu")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_codec_that_does_not_compile_falls_back_once_and_writes_the_same_codes(monkeypatch, backend):
    if backend == "auto":
        pytest.importorskip("bitsandbytes")
    q = Quantizer(backend)
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(quant, "_compiled", lambda key: broken)
    x = torch.randn(2 * quant.BLOCK + 9, generator=torch.Generator().manual_seed(5))
    codes, absmax = q.encode(x, True)
    decoded = q.decode(codes, absmax, True)
    q.encode(x, True)
    q.decode(codes, absmax, True)
    assert len(tries) == 2  # the encode and the decode variant, each tried once
    assert q.codec_for(torch.device("cpu")) == ("bitsandbytes" if backend == "auto" else "torch lookup, eager")
    want_codes, want_absmax = _nearest_codes(x, True)
    torch.testing.assert_close(absmax, want_absmax)
    mismatch = (codes.int() - want_codes.int()).abs()
    if backend == "torch":  # the same lookup, eagerly
        assert torch.equal(codes, want_codes)
    else:  # bitsandbytes' kernel: ties may round the other way
        assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 0.01
    expected = dynamic_map(True)[codes.long()] * absmax.repeat_interleave(quant.BLOCK)[:x.numel()]
    assert torch.equal(decoded, expected)


def test_a_codec_variant_failing_after_others_compiled_falls_back_for_itself_only(monkeypatch):
    """A later failure (a recompile for a new pattern of block sizes, say) is safe to rerun
    eagerly -- the codec never writes its inputs -- and disables only that variant."""
    q = Quantizer("torch")
    x = torch.randn(3 * quant.BLOCK, generator=torch.Generator().manual_seed(6))
    q.encode(x, True)  # compiles and runs
    original = quant._compiled

    def broken(*args):
        raise RuntimeError("a recompile failed")

    monkeypatch.setattr(quant, "_compiled", lambda key: broken if key[0] is quant._decode_many else original(key))
    codes, absmax = q.encode(x, True)
    decoded = q.decode(codes, absmax, True)
    assert [k[0] for k in q._broken] == [quant._decode_many]
    assert torch.equal(codes, _nearest_codes(x, True)[0])
    assert torch.equal(decoded, dynamic_map(True)[codes.long()] * absmax.repeat_interleave(quant.BLOCK))


@pytest.mark.parametrize("backend", ["auto", "torch", "bitsandbytes"])
def test_batched_codec_equals_the_per_tensor_one(backend):
    """``decode_all`` / ``encode_all`` (the fused path's, one call per kernel call and map) give
    what decoding and encoding each state alone gives, partial blocks included."""
    if backend != "torch":
        pytest.importorskip("bitsandbytes")
    q = Quantizer(backend)
    gen = torch.Generator().manual_seed(7)
    shapes = [(16, 320), (2 * quant.BLOCK,), (8, 1000), (40, 128), (quant.BLOCK,), (7,)]  # (8, 1000): 31.25 blocks
    handles, bufs, reference = [], [], []
    for signed in (True, False):
        for shape in shapes:
            x = torch.randn(shape, generator=gen)
            x = x if signed else x.abs()
            codes, absmax = q.encode(x, signed)
            handles.append(quant.Encoded(q, codes.clone(), absmax.clone(), signed))
            bufs.append(torch.empty(x.numel()))
            reference.append((x, codes, absmax))
    quant.decode_all(list(zip(handles, bufs)))
    for h, buf, (x, codes, absmax) in zip(handles, bufs, reference):
        assert torch.equal(buf.view(x.shape), q.decode(codes, absmax, h.signed))  # bit for bit, bitsandbytes' too
        buf.copy_((x * 0.5 - 0.1).reshape(-1) if h.signed else (x * 0.5).reshape(-1))
    quant.encode_all(list(zip(handles, bufs)))
    for h, buf, (x, _, _) in zip(handles, bufs, reference):
        codes, absmax = q.encode(buf.view(x.shape), h.signed)
        assert torch.equal(h.codes, codes) and torch.equal(h.absmax, absmax)


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


def test_without_bitsandbytes_the_cpu_trains_alike_and_needs_no_warning(monkeypatch):
    """On the CPU the lookup codec is the default: hiding bitsandbytes changes nothing there (no
    warning), and the run stays within quantization tolerance of one encoded by bitsandbytes'
    own kernels. Where the lookup would have needed bitsandbytes (here: the codec cannot
    compile), the missing package is reported once."""
    pytest.importorskip("bitsandbytes")
    kw = dict(lr=1e-2, state_precision="8bit", min_8bit_size=16)
    ref = TinyLoRANet(2)
    train(ref, plain_hina(ref.groups(), lr=1e-2), 30)
    a = TinyLoRANet(2)
    oa = plain_hina(a.groups(), quant_backend="bitsandbytes", **kw)
    assert oa.store.quantizer.codec_for(torch.device("cpu")) == "bitsandbytes"
    la = train(a, oa, 30)
    _hide_bitsandbytes(monkeypatch)
    b = TinyLoRANet(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ob = plain_hina(b.groups(), **kw)
        lb = train(b, ob, 30)
    assert ob.store.quantizer.codec_for(torch.device("cpu")) == "torch lookup"
    # "within quantization tolerance": the two codecs are no farther apart than 8-bit is from fp32
    backend_gap = max((x - y).abs().max().item() for x, y in zip(params_of(a), params_of(b)))
    quant_gap = max((x - y).abs().max().item() for x, y in zip(params_of(a), params_of(ref)))
    assert backend_gap <= quant_gap, (backend_gap, quant_gap)
    assert abs(la[-1] - lb[-1]) < 0.02 * la[-1]
    p = b.layers[1].lora_up.weight
    assert ob.state[p]["exp_avg"].dtype == torch.uint8

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(quant, "_compiled", lambda key: broken)
    q = Quantizer("auto")
    with pytest.warns(UserWarning, match="bitsandbytes is not installed; using the pure-torch lookup codec"):
        codes, absmax = q.encode(torch.randn(3 * quant.BLOCK), True)
    assert q.codec_for(torch.device("cpu")) == "torch lookup, eager"


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
