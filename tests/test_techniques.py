"""Each technique against the float64 reference (tests/reference), alone and all together, on
both paths (foreach and single-tensor), with names (LoRA + LoKr roles) and without."""

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, HinaAdamW
from hina_kohya.roles import build_structure
from reference.hina_reference import ReferenceHina

FLAGS = ["use_orthogonal_grad", "use_agr", "use_tam", "use_adopt_stability", "use_cautious", "use_grams",
         "use_alora", "dynamic_weight_decay", "use_spd"]
OFF = {f: False for f in FLAGS}

# a LoRA pair, a factorised LoKr module (w1, w2_a, w2_b), a full LoKr module (w1, w2), a full weight
NAMES = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight",
         "lora_unet_k.lokr_w1", "lora_unet_k.lokr_w2_a", "lora_unet_k.lokr_w2_b",
         "lora_unet_f.lokr_w1", "lora_unet_f.lokr_w2", "model.proj.weight"]
SHAPES = [(3, 10), (12, 3), (2, 2), (6, 3), (3, 5), (2, 3), (4, 2), (5, 4)]


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64) * 0.3) for s in SHAPES]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        # biased so signs persist for a while (lr masks and cautious masks get exercised)
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.05 * torch.sign(p.detach())
    if step == 0:  # a LoRA A factor's first gradient is zero (its partner B starts at zero)
        params[0].grad.zero_()
    if step < 3:  # and some elements see their first gradient late
        params[7].grad[:2] = 0


PATHS = {"foreach": dict(foreach=True, fused=False), "single": dict(foreach=False, fused=False),
         "fused": dict(fused=True)}


def _compare(cls, hp, named, foreach, steps=25, adaptive=False):
    mine, ref_params = _params(), _params()
    group = {"params": mine}
    if named:
        group["param_names"] = NAMES
    path = PATHS[foreach] if isinstance(foreach, str) else dict(foreach=foreach, fused=False)
    opt = cls([group], **path, **hp)
    if path.get("fused"):
        assert opt.fused
    st = build_structure(NAMES, SHAPES) if named else None
    ref = ReferenceHina(ref_params, dict(hp), roles=st.roles if st else None, pairs=st.pairs if st else (),
                        kron=st.kron if st else (), adaptive=adaptive)
    for s in range(steps):
        _grads(s, mine)
        _grads(s, ref_params)
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(mine, ref_params)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-11, msg=lambda m: f"param {i}: {m}")
    return opt


BASE = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, spd_lambda=0.5, tam_beta=0.9, alora_ratio=4.0,
            wd_transition_steps=8, wd_decay_factor=0.5, wd_min_ratio=0.2)


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("named", [True, False])
def test_hina_technique_alone_matches_reference(flag, named):
    _compare(HinaAdamW, {**BASE, **OFF, flag: True}, named, foreach=True)


@pytest.mark.parametrize("foreach", ["foreach", "single", "fused"])
@pytest.mark.parametrize("named", [True, False])
def test_hina_all_techniques_match_reference_on_every_path(foreach, named):
    _compare(HinaAdamW, {**BASE, **{f: True for f in FLAGS}}, named, foreach=foreach)


ADAPTIVE = dict(BASE, use_dynamic_adaptation=False, use_lr_mask=True, lr_bump=2e-3, min_lr=1e-3, max_lr=0.05,
                warmup_steps=15)


@pytest.mark.parametrize("foreach", ["foreach", "single", "fused"])
@pytest.mark.parametrize("named", [True, False])
def test_adaptive_lr_mask_and_techniques_match_reference(foreach, named):
    hp = {k: v for k, v in {**ADAPTIVE, **{f: True for f in FLAGS}}.items() if k not in ("use_alora", "alora_ratio")}
    opt = _compare(AdaptiveHinaAdamW, hp, named, foreach=foreach, adaptive=True)
    if foreach == "fused":
        assert opt.fused  # no silent fallback
    # the mask really moved, stayed in bounds, and is frozen after warm-up
    rates = [opt.state[p]["lr_mask"].float().abs() * hp["max_lr"] for p in opt.param_groups[0]["params"]]
    allr = torch.cat([r.reshape(-1) for r in rates])
    assert allr.max() > hp["lr"] * 1.05 and allr.min() >= hp["min_lr"] * (1 - 1e-3)
    assert allr.max() <= hp["max_lr"] * (1 + 1e-3)
