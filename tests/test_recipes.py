"""HinaAdamW and AdaptiveHinaAdamW: behaviour, defects of the originals not reproduced, resume."""

import math

import pytest
import torch

from hina_kohya import AdaptiveHinaAdamW, HinaAdamW
from helpers import TECHNIQUES_OFF, TinyLoRANet, params_of, roundtrip, train
from standins import lycoris_network

RECIPES = [HinaAdamW, AdaptiveHinaAdamW]
ADAPTIVE_OFF = {k: v for k, v in TECHNIQUES_OFF.items() if k != "use_alora"}
ALL_ON = dict(use_spd=True, use_cautious=True, use_orthogonal_grad=True, use_adopt_stability=True, use_grams=True,
              use_agr=True, use_tam=True, dynamic_weight_decay=True)


def _lokr_net(seed=0):
    net, te, unet = lycoris_network(dict(algo="lokr", factor="4"), dim=4, seed=seed)
    return net


_TEACHER = {}


def _teacher_weights():
    """Weights of a LoKr 'teacher' whose zero-initialised factors were filled: representable targets."""
    if not _TEACHER:
        teacher = _lokr_net(seed=1)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in teacher.named_parameters():
                if (p == 0).all():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            for lora in teacher.unet_loras + teacher.text_encoder_loras:
                _TEACHER[lora.lora_name] = lora.get_weight(lora.shape).detach().clone()
    return _TEACHER


def _lokr_loss(net, step):
    targets = _teacher_weights()
    loss = 0
    for lora in net.unet_loras + net.text_encoder_loras:
        w = lora.get_weight(lora.shape)
        loss = loss + ((w - targets[lora.lora_name]) ** 2).mean()
    return loss


def _lokr_groups(net):
    named = list(net.named_parameters())
    return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]


# -- training works ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", RECIPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("config", ["defaults", "all_on"])
def test_loss_decreases_on_lora(cls, precision, config):
    m = TinyLoRANet(0)
    kw = dict(lr=1e-2, state_precision=precision, min_8bit_size=16)
    if cls is AdaptiveHinaAdamW:
        kw.update(max_lr=5e-2, warmup_steps=30, relationship_discovery_interval=10)
    if config == "all_on":
        kw.update(ALL_ON)
    losses = train(m, cls(m.groups(), **kw), 80)
    assert losses[-1] < 0.6 * losses[0], losses[-1]


@pytest.mark.parametrize("cls", RECIPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_loss_decreases_on_real_lycoris_lokr(cls, precision):
    net = _lokr_net()
    kw = dict(lr=1e-2, state_precision=precision, min_8bit_size=16)
    if cls is AdaptiveHinaAdamW:
        kw.update(max_lr=1e-1, relationship_discovery_interval=5)
    opt = cls(_lokr_groups(net), **kw)
    first = None
    for s in range(60):
        loss = _lokr_loss(net, s)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first
    assert opt.get_optimization_info()["lokr_stats"]["lokr_pairs"] > 0  # names reached roles (E6 fixed)


@pytest.mark.parametrize("cls", RECIPES)
@pytest.mark.parametrize("lr", [1e-5, 1e-4, 1e-3, 1e-2])
def test_lr_sweep_stays_finite_where_adamw_does(cls, lr):
    ref = TinyLoRANet(0)
    ref_losses = train(ref, torch.optim.AdamW(ref.groups(named=False), lr=lr), 60)
    assert all(math.isfinite(x) for x in ref_losses)
    for config in ({}, ALL_ON):
        m = TinyLoRANet(0)
        kw = dict(config, lr=lr)
        if cls is AdaptiveHinaAdamW:
            kw.update(max_lr=max(10 * lr, 1e-3), min_lr=lr / 100)
        groups = m.groups(lrs=(lr, lr))
        losses = train(m, cls(groups, **kw), 60)
        assert all(math.isfinite(x) for x in losses)
        assert all(torch.isfinite(p).all() for p in m.parameters())


# -- defects of the originals are not reproduced ----------------------------------------------------
def _one_pair(ratio=4.0, groups_split=False, b_lr=None):
    a = torch.nn.Parameter(torch.full((2, 6), 0.5))
    b = torch.nn.Parameter(torch.full((6, 2), 0.5))
    names = ["lora_unet_m.lora_down.weight", "lora_unet_m.lora_up.weight"]
    if groups_split:
        groups = [{"params": [a], "param_names": names[:1]},
                  {"params": [b], "param_names": names[1:], "lr": b_lr}]
    else:
        groups = [{"params": [a, b], "param_names": names}]
    opt = HinaAdamW(groups, lr=1e-3, alora_ratio=ratio, weight_decay=0.0, **{**TECHNIQUES_OFF, "use_alora": True})
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    return (0.5 - a.detach()).mean().item(), (0.5 - b.detach()).mean().item(), opt


def test_paired_b_steps_alora_ratio_times_its_a():  # defect 1 / E5
    da, db, _ = _one_pair(ratio=4.0)
    assert db == pytest.approx(4.0 * da, rel=1e-4)  # float32 params near 0.5


def test_lora_plus_not_applied_twice_with_sd_scripts_groups():  # defect 1 (kohya loraplus groups)
    with pytest.warns(UserWarning, match="loraplus_lr_ratio"):
        da, db, _ = _one_pair(ratio=4.0, groups_split=True, b_lr=4e-3)
    assert db == pytest.approx(4.0 * da, rel=1e-4)  # the trainer's 4x only, not 16x


def test_diagnose_lora_pairing_works_with_pairs():  # defect 10 / E5
    _, _, opt = _one_pair()
    report = opt.diagnose_lora_pairing()["groups"]["group_0"]
    assert report["pairs_count"] == 1 and not report["unpaired_a"] and not report["unpaired_b"]
    assert report["parameter_details"][0]["paired_with"] == "lora_unet_m.lora_up.weight"


def test_lycoris_lokr_layouts_pair_and_scale():  # defect 12 / E6
    net = _lokr_net()
    opt = HinaAdamW(_lokr_groups(net))
    info = opt.get_optimization_info()["lokr_stats"]
    assert info["lokr_pairs"] == info["lokr_groups"] > 0


def test_cautious_is_not_a_no_op_next_to_grams():  # defect 2
    torch.manual_seed(0)
    outs = []
    for cautious in (False, True):
        p = torch.nn.Parameter(torch.zeros(50))
        opt = HinaAdamW([p], lr=0.1, **{**TECHNIQUES_OFF, "use_grams": True, "use_cautious": cautious})
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            p.grad = torch.randn(50, generator=gen)
            opt.step()
        outs.append(p.detach().clone())
    assert not torch.allclose(outs[0], outs[1])


def test_grams_has_an_effect_in_adaptive():  # defect 20
    ends = []
    for grams in (False, True):
        m = TinyLoRANet(0)
        train(m, AdaptiveHinaAdamW(m.groups(), use_grams=grams, use_cautious=False), 5)
        ends.append(params_of(m))
    assert any(not torch.allclose(a, b) for a, b in zip(*ends))


def test_agr_attenuates():  # defect 3: the original amplified the gradient
    from hina_kohya.transforms.agr import AGR
    from hina_kohya.core.chain import Bucket

    g = torch.tensor([3.0, -1.0, 0.5, 0.0])
    b = Bucket({}, [torch.zeros(4)], [g], {}, [1], [None], [0], torch.float32)
    AGR().foreach(b)
    assert (b.grads[0].abs() <= g.abs()).all() and b.grads[0][0] < g[0]
    assert torch.equal(g, torch.tensor([3.0, -1.0, 0.5, 0.0]))  # the input gradient is untouched


def test_orthogonal_gradient_restores_the_norm_and_handles_1d():  # defect 7
    from hina_kohya.core.chain import Bucket
    from hina_kohya.transforms.projection import OrthogonalGradient

    w, g = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 2.0])
    b = Bucket({}, [w], [g], {}, [1], [None], [0], torch.float32)
    OrthogonalGradient().foreach(b)
    assert abs(torch.dot(b.grads[0], w)) < 1e-5
    assert b.grads[0].norm() == pytest.approx(g.norm().item(), rel=1e-6)


def test_orthogonal_gradient_leaves_zero_initialised_adapter_factors_alone():
    """B factors (here LoRA up) keep their gradient; A factors and unnamed tensors are projected,
    on the list-wise and on the per-tensor path alike."""
    from hina_kohya import roles
    from hina_kohya.core.chain import Bucket, Slot
    from hina_kohya.transforms.projection import OrthogonalGradient

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    gs = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    rs = [roles.classify("m.lora_up.weight"), roles.classify("m.lora_down.weight"), None]
    assert rs[0].is_b and not rs[1].is_b
    b = Bucket({}, ws, gs, {}, [1, 1, 1], rs, [0, 1, 2], torch.float32)
    t = OrthogonalGradient()
    t.prepare(b)
    t.foreach(b)
    assert torch.equal(b.grads[0], gs[0])
    for i in (1, 2):
        assert abs(torch.dot(b.grads[i].reshape(-1), ws[i].reshape(-1))) < 1e-5
    for i in range(3):  # the per-tensor math, with the extras the fused kernels get, and without
        for extra in ({"orthograd_on": b.extras["orthograd_on"][i]}, {}):
            x = Slot(ws[i], gs[i], {}, torch.tensor(1.0), {}, rs[i], None, None, None)
            x.extra = extra
            t.math(x)
            torch.testing.assert_close(x.g, b.grads[i])


def test_automagic_warmup_grows_a_zero_initialised_lora():
    """The warm-up projects gradients orthogonally to the weights; on a LoRA whose B factor starts
    at zero and must grow along a consistent direction, projecting B would stall it (it did: the
    demo's LoKr task stayed at its start loss for 150 steps)."""
    from hina_kohya import Automagic_CameAMP

    def fit(names: bool) -> float:
        gen = torch.Generator().manual_seed(0)
        target = torch.randn(16, 4, generator=gen) @ torch.randn(4, 16, generator=gen) / 4
        down = torch.nn.Parameter(torch.randn(4, 16, generator=gen) / 4)
        up = torch.nn.Parameter(torch.zeros(16, 4))
        group = {"params": [down, up]}
        if names:
            group["param_names"] = ["m.lora_down.weight", "m.lora_up.weight"]
        opt = Automagic_CameAMP([group], lr=1e-2, max_lr=1e-2, warmup_steps=1000)
        for s in range(100):
            x = torch.randn(32, 16, generator=torch.Generator().manual_seed(s))
            loss = ((x @ (up @ down).T - x @ target.T) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(((up @ down - target).detach() ** 2).mean() / (target ** 2).mean())

    named, unnamed = fit(True), fit(False)
    assert named < 0.5 * unnamed, (named, unnamed)


def test_tam_does_not_halve_the_early_learning_rate():  # defect 5
    p = torch.nn.Parameter(torch.zeros(10))
    q = torch.nn.Parameter(torch.zeros(10))
    with_tam = HinaAdamW([p], lr=0.01, **{**TECHNIQUES_OFF, "use_tam": True})  # tam_beta 0.999
    plain = HinaAdamW([q], lr=0.01, **TECHNIQUES_OFF)
    for _ in range(20):  # a consistent gradient: no turning, so no damping is due
        p.grad = torch.ones(10)
        q.grad = torch.ones(10)
        with_tam.step()
        plain.step()
    assert p.detach().mean().item() == pytest.approx(q.detach().mean().item(), rel=1e-4)


def test_zero_initialised_lora_with_adopt_has_no_nan():
    down = torch.nn.Parameter(torch.randn(4, 16) * 0.1)
    up = torch.nn.Parameter(torch.zeros(16, 4))
    opt = HinaAdamW([{"params": [down, up], "param_names": ["m.lora_down.weight", "m.lora_up.weight"]}], lr=1e-2)
    for s in range(10):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(s))
        loss = ((x @ down.T @ up.T - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(down).all() and torch.isfinite(up).all() and up.abs().sum() > 0


@pytest.mark.parametrize("fused", [False, True])
def test_adopt_starts_each_element_at_its_first_nonzero_gradient(fused):
    # a LoRA A factor's gradient is zero while its partner B is zero: a v started at step 1 would
    # stay 0 there and normalise the next gradients to the clip (sign steps of size t**0.25)
    p = torch.nn.Parameter(torch.ones(2, 3, dtype=torch.float64))
    opt = HinaAdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, fused=fused,
                    **{**TECHNIQUES_OFF, "use_adopt_stability": True})
    a = torch.tensor([[0.5, -2.0, 0.0], [1e-3, 4.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0], [-1e-3, -2.0, 0.0]], dtype=torch.float64)
    for g in (torch.zeros_like(a), a, b):
        p.grad = g.clone()
        opt.step()
        if g is a:  # the first non-zero gradient only starts v: no step anywhere
            torch.testing.assert_close(p.detach(), torch.ones_like(p), rtol=0, atol=0)
    # step 3: n = clip(b / |a|, 3**0.25) where a started v; the elements a left at 0 start v now
    started = a != 0
    n = torch.where(started, (b / a.abs().clamp_min(1e-8)).clamp(-3 ** 0.25, 3 ** 0.25), 0.0)
    torch.testing.assert_close(p.detach(), 1 - 0.1 * 0.1 * n, rtol=1e-12, atol=1e-15)
    v = opt.state[p]["exp_avg_sq"]
    torch.testing.assert_close(v, torch.where(started, 0.99 * a * a + 0.01 * b * b, b * b), rtol=1e-12, atol=0)


def test_dynamic_weight_decay_floor_binds():  # defect 13
    from hina_kohya.transforms.decay import dynamic_multiplier

    assert dynamic_multiplier(1000, 1000, 0.7, 0.1) == 1.0
    assert dynamic_multiplier(2000, 1000, 0.7, 0.1) == pytest.approx(0.7)
    assert dynamic_multiplier(100_000, 1000, 0.7, 0.1) == 0.1  # the originals stopped at 0.49


def test_spd_anchor_for_full_weights_only_and_saved():  # defect 6
    m = TinyLoRANet(0)
    full = torch.nn.Parameter(torch.randn(5, 5))
    groups = m.groups() + [{"params": [full], "param_names": ["model.layer.weight"]}]
    opt = HinaAdamW(groups)
    train(m, opt, 1)
    full.grad = torch.randn(5, 5)
    opt.step()
    assert "spd_anchor" in opt.state[full]
    assert all("spd_anchor" not in opt.state[p] for p in m.parameters() if p in opt.state)  # adapters: anchor 0
    sd = roundtrip(opt.state_dict())
    idx = [i for g in sd["param_groups"] for i, n in zip(g["params"], g["param_names"]) if n == "model.layer.weight"]
    assert "spd_anchor" in sd["state"][idx[0]]


def test_group_without_grads_and_info_after_step():  # defects 21, 22 / E1, E3
    m = TinyLoRANet(0)
    frozen = torch.nn.Parameter(torch.zeros(3))
    opt = AdaptiveHinaAdamW(m.groups() + [{"params": [frozen], "param_names": ["lora_unet_z.lora_up.weight"]}])
    info0 = opt.get_optimization_info()
    assert "training_stats" not in info0 and opt.get_lr_mask_analysis()["global_statistics"]["total_parameters"] == 0
    train(m, opt, 3)
    info = opt.get_optimization_info()
    assert info["training_stats"]["global_step"] == 3
    assert info["training_stats"]["lr_mask_stats"]["total_updates"] >= 0
    assert opt.get_lr_mask_analysis()["global_statistics"]["total_parameters"] == 7  # frozen has no mask: skipped


def test_every_group_gets_importance_scores():  # defect 23 / E4
    m = TinyLoRANet(0)
    opt = AdaptiveHinaAdamW(m.groups(), relationship_discovery_interval=5)
    train(m, opt, 10)
    for g in opt.param_groups:
        for p in g["params"]:
            assert opt.state[p]["importance"].item() != 1.0


def test_importance_has_no_hidden_global_decay():  # defect 24
    m = TinyLoRANet(0)
    opt = AdaptiveHinaAdamW(m.groups(), relationship_discovery_interval=1, use_lr_mask=False)
    train(m, opt, 120)

    imps = torch.stack([opt.state[p]["importance"] for g in opt.param_groups for p in g["params"]])
    factors = (imps / imps.mean()).clamp(0.1, 3.0)
    assert factors.mean().item() == pytest.approx(1.0, abs=0.2)  # relative emphasis, no 10x cut


def test_relationships_are_found_with_and_without_names():  # defect 19 / E2
    m = TinyLoRANet(0)
    named = AdaptiveHinaAdamW(m.groups())
    assert named.get_relationship_summary()["total_relationships"] == 3
    # without names: sd-scripts order (down, up, down, up, ...) in one group
    params = [p for layer in m.layers for p in (layer.lora_down.weight, layer.lora_up.weight)]
    unnamed = AdaptiveHinaAdamW(params)
    summary = unnamed.get_relationship_summary()
    assert summary["total_relationships"] == 3
    assert all(r["interaction_type"] == "matmul_shape" for r in summary["relationships"])


def test_lr_mask_follows_the_scheduler_and_stays_in_bounds():  # defects 25, 36, 54
    p = torch.nn.Parameter(torch.zeros(100))
    opt = AdaptiveHinaAdamW([p], lr=1e-3, warmup_steps=10, **ADAPTIVE_OFF)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= 20 else 1.0)
    gen = torch.Generator().manual_seed(0)
    moves = []
    for s in range(30):
        p.grad = torch.randn(100, generator=gen)
        before = p.detach().clone()
        opt.step()
        sched.step()
        moves.append((p.detach() - before).abs().mean().item())
    rate = opt.state[p]["lr_mask"].float().abs() * 1e-3
    assert rate.min() >= 1e-7 and rate.max() <= 1e-3 * (1 + 1e-3)
    assert moves[25] < 0.75 * moves[15]  # the halved schedule reaches the masked rates


def test_lr_mask_is_two_bytes_per_element_with_fine_resolution():
    p = torch.nn.Parameter(torch.zeros(10_000))
    opt = AdaptiveHinaAdamW([p], lr=1e-4, max_lr=1e-3, use_dynamic_adaptation=False, **ADAPTIVE_OFF)
    p.grad = torch.ones(10_000)
    opt.step()
    p.grad = torch.ones(10_000)
    opt.step()  # every element agrees: one bump of 3e-6 on 1e-4 (3 %)
    mask = opt.state[p]["lr_mask"]
    assert mask.dtype == torch.float16 and mask.element_size() == 2
    rate = mask.float().abs() * 1e-3
    assert rate.mean().item() == pytest.approx(1e-4 + 3e-6, rel=1e-3)


@pytest.mark.parametrize("cls", RECIPES)
def test_name_agnostic_runs_and_says_so(cls):
    m = TinyLoRANet(0)
    opt = cls(m.groups(named=False))
    losses = train(m, opt, 30)
    assert losses[-1] < losses[0]
    info = opt.get_optimization_info()
    assert info["names_provided"] is False and "names were not provided" in info["note"]


# -- every adaptive quantity survives a checkpoint ------------------------------------------------
@pytest.mark.parametrize("cls", RECIPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_resume_with_all_techniques_continues_exactly(cls, precision):
    kw = dict(ALL_ON, lr=1e-2, state_precision=precision, min_8bit_size=16)
    if cls is AdaptiveHinaAdamW:
        kw.update(warmup_steps=20, relationship_discovery_interval=4, max_lr=5e-2)
    full = TinyLoRANet(1)
    full_groups = full.groups() + [{"params": [torch.nn.Parameter(torch.ones(3))], "param_names": ["model.w"]}]
    train(full, cls(full_groups, **kw), 30)

    part = TinyLoRANet(1)
    w = torch.nn.Parameter(torch.ones(3))
    groups = part.groups() + [{"params": [w], "param_names": ["model.w"]}]
    opt = cls(groups, **kw)
    train(part, opt, 13)
    sd = roundtrip(opt.state_dict())
    opt2 = cls(groups, **kw)
    opt2.load_state_dict(sd)
    train(part, opt2, 17, start=13)
    for a, b in zip(params_of(full), params_of(part)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    if cls is AdaptiveHinaAdamW:
        saved = sd["state"][0]  # lora_unet_layer_0.lora_down.weight
        assert saved["step"] == 13
        assert (saved["lr_mask"].float().abs() * kw["max_lr"] != 1e-2).any()  # the mask had moved
        assert saved["importance"].item() != 1.0 and saved["imp_norms"].abs().sum() > 0  # scored 3 times
        assert saved["relation_scale"].item() != 1.0 and saved["tam_s"].item() != 0.0


def test_log_dict_reports_step_size_masks_decay_and_cautious():
    m = TinyLoRANet(0)
    opt = AdaptiveHinaAdamW(m.groups(), lr=1e-3, wd_transition_steps=2, warmup_steps=5)
    train(m, opt, 4)
    logs = opt.log_dict()
    assert all(type(v) is float and math.isfinite(v) for v in logs.values())
    assert 0 < logs["hina/cautious_kept/group0"] <= 1
    assert logs["hina/wd_multiplier/group0"] < 1.0  # past the transition: the schedule acts
    cap = max(g["max_lr"] for g in opt.param_groups)  # 10 x each group's lr
    assert 1e-7 <= logs["hina/lr_mask/min"] <= logs["hina/lr_mask/mean"] <= logs["hina/lr_mask/max"] <= cap * (1 + 1e-6)
    assert logs["hina/step_size/group0"] > 0
    h = HinaAdamW(m.groups(), lr=1e-3, use_alora=True, alora_ratio=4.0)
    train(m, h, 2)
    hl = h.log_dict()
    # group 1 holds three B factors (x4) and the dora scale (x1): mean rate 3.25 x the group lr
    assert hl["hina/step_size/group1"] == pytest.approx(3.25 * h.param_groups[1]["lr"])
    assert hl["hina/step_size/group0"] == pytest.approx(h.param_groups[0]["lr"])


@pytest.mark.parametrize("cls", RECIPES)
def test_diagnostics_work_after_a_resume(cls):
    m = TinyLoRANet(0)
    kw = dict(relationship_discovery_interval=2) if cls is AdaptiveHinaAdamW else {}
    opt = cls(m.groups(), **kw)
    train(m, opt, 5)
    opt2 = cls(m.groups(), **kw)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    info = opt2.get_optimization_info()
    assert info["training_stats"]["global_step"] == 5
    if cls is HinaAdamW:
        assert opt2.diagnose_lora_pairing()["groups"]["group_0"]["lora_a_count"] == 3
    if cls is AdaptiveHinaAdamW:
        assert opt2.get_importance_analysis() == opt.get_importance_analysis()
        assert opt2.get_lr_mask_analysis()["global_statistics"] == opt.get_lr_mask_analysis()["global_statistics"]
        assert opt2.get_relationship_summary()["total_relationships"] == 3


def test_importance_score_matches_the_reference_formula():
    from reference.hina_reference import importance_contributions

    m = TinyLoRANet(0, torch.float64)
    opt = AdaptiveHinaAdamW(m.groups(), relationship_discovery_interval=1, use_lr_mask=False,
                            **{k: False for k in ("use_spd", "use_agr", "use_tam", "use_cautious", "use_grams")})
    history, n0, imp = {}, {}, {}
    for s in range(7):
        params = [p for g in opt.param_groups for p in g["params"]]
        x_y = __import__("helpers").batch(s, m.dims, torch.float64)
        loss = torch.nn.functional.mse_loss(m(x_y[0]), x_y[1])
        opt.zero_grad()
        loss.backward()
        expected = importance_contributions(params, history, n0, imp, decay=0.95)
        opt.step()
        for p in params:
            torch.testing.assert_close(opt.state[p]["importance"], torch.tensor(expected[id(p)], dtype=torch.float64),
                                       rtol=1e-9, atol=1e-12)

