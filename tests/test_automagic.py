"""The Automagic_CameAMP family: float64 references, training, resume, config API, defects."""

import math
import warnings

import pytest
import torch

import hina_kohya as hk
from hina_kohya import (Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim,
                        Automagic_CameAMP_COptim8bit, Automagic_CameAMP_Improved, OptimizerConfig,
                        RegularizationStrategy, create_full_finetune_optimizer, create_lora_optimizer)
from hina_kohya.transforms.came import factored_ema
from hina_kohya.transforms.phase import phase_index
from hina_kohya.transforms.spatial import EdgeSuppression, FrequencyPenalty, LowRankPenalty
from helpers import OPT_IN, TinyLoRANet, assert_resume_exact, batch, params_of, train
from reference import automagic_reference as ref
from standins import lycoris_network

FAMILY = [Automagic_CameAMP, Automagic_CameAMP8bit, Automagic_CameAMP_COptim, Automagic_CameAMP_COptim8bit,
          Automagic_CameAMP_Improved]
ALL_ON = OPT_IN  # every opt-in heuristic


# -- float64 references -------------------------------------------------------------------------
def _run_against_reference(cls, steps=14, fused=False, losses=False, **kw):
    model = TinyLoRANet(3, dtype=torch.float64)
    hp_kw = dict(lr=1e-2, warmup_steps=8, max_lr=5e-2, lr_bump=2e-3, **kw)
    opt = cls(model.groups(), fused=fused, **hp_kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    shadow = [p.detach().clone() for p in params]
    states = [{} for _ in params]
    roles = opt.structure.roles
    context = ref.ContextReference(opt.defaults["context_window"], opt.defaults["edge_threshold"],
                                   opt.defaults["adaptation_rate"]) if hasattr(opt, "context") else None
    recipe = "I" if cls is Automagic_CameAMP_Improved else "C"
    for t in range(1, steps + 1):
        gen = torch.Generator().manual_seed(t)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        loss = 1.0 / t + 0.01 * (t % 3)
        rate = 1.0
        if context is not None:
            if losses:
                opt.set_loss(torch.tensor(loss, dtype=torch.float64))
                rate = context.update(loss)
            else:
                rate = context.update(math.sqrt(sum(float((g * g).sum()) for g in grads)))
        opt.step()
        j = 0
        for group in opt.param_groups:
            hp = dict(group)
            n = len(group["params"])
            gs = grads[j:j + n]
            ks = ref.awd_factors(gs)
            for i in range(n):
                ref.step(shadow[j + i], gs[i], states[j + i], hp, t, group["hina_lr0"], recipe, rate, ks[i],
                         adapter=roles[j + i].adapter, b_factor=roles[j + i].is_b)
            j += n
    for p, s in zip(params, shadow):
        torch.testing.assert_close(p.detach(), s, rtol=1e-9, atol=1e-12)
    return opt


# compiling a float64 kernel takes about a minute on 2 cores: one fused case per recipe
@pytest.mark.parametrize("fused,came", [(False, True), (False, False), (True, True)])
def test_automagic_cameamp_matches_the_float64_reference(fused, came):
    opt = _run_against_reference(Automagic_CameAMP, fused=fused, came=came)
    assert opt.fused == fused


@pytest.mark.parametrize("fused,dual", [(False, True), (False, False), (True, True)])
def test_improved_matches_the_float64_reference(fused, dual):
    """Dual momentum, TAM/Grams before half the warm-up, Cautious after, d_coef, SPD in warm-up."""
    _run_against_reference(Automagic_CameAMP_Improved, steps=16, fused=fused, enable_dual_momentum=dual)


@pytest.mark.parametrize("losses", [True, False])
def test_c_optim_matches_the_reference_with_a_loss_and_with_the_gradient_norm(losses):
    opt = _run_against_reference(Automagic_CameAMP_COptim, steps=16, losses=losses, context_window=6,
                                 edge_threshold=0.2)
    info = opt.log_dict()
    assert info["hina/coptim/signal_is_loss"] == float(losses)
    assert info["hina/coptim/multiplier"] != pytest.approx(1.2)  # the original's constant without a closure


def test_factoring_is_exact_for_rank_one_statistics_and_for_vectors():
    """(R / mean R) outer C reproduces the unfactored EMA exactly when every q is rank one with
    a fixed row profile, and for 1-D tensors (rows = 1) it is the unfactored EMA."""
    a = torch.rand(5, dtype=torch.float64) + 0.5
    row, col = torch.zeros(5, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    full = torch.zeros(5, 7, dtype=torch.float64)
    vec_row, vec_col = torch.zeros(1, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    vec_full = torch.zeros(1, 7, dtype=torch.float64)
    for t in range(1, 6):
        b = torch.rand(7, dtype=torch.float64) + 0.1
        q = torch.outer(a, b)
        full = 0.9 * full + 0.1 * q
        got = factored_ema(row, col, q, torch.tensor(0.9, dtype=torch.float64), torch.tensor(float(t)))
        torch.testing.assert_close(got, full / (1 - 0.9 ** t), rtol=1e-12, atol=0)
        qv = b[None] ** 2
        vec_full = 0.9 * vec_full + 0.1 * qv
        gv = factored_ema(vec_row, vec_col, qv, torch.tensor(0.9, dtype=torch.float64), torch.tensor(float(t)))
        torch.testing.assert_close(gv, vec_full / (1 - 0.9 ** t), rtol=1e-12, atol=0)


def _phase_run(gate_on_host: bool, monkeypatch, steps: int = 10):
    from hina_kohya.transforms.phase import Phase

    with monkeypatch.context() as m:
        if not gate_on_host:
            m.setattr(Phase, "static_key", lambda self, step, hp: None)
        model = TinyLoRANet(3, dtype=torch.float64)
        opt = Automagic_CameAMP_Improved(model.groups(), fused=False, lr=1e-2, warmup_steps=6, weight_decay=0.1)
        params = [p for g in opt.param_groups for p in g["params"]]
        tam = []
        for t in range(1, steps + 1):
            gen = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1
            opt.step()
            tam.append(float(opt.state[params[0]]["tam_s"]))
    return params, opt, tam


def test_phase_gate_decided_on_the_host_matches_the_tensor_gate(monkeypatch):
    """The engine decides Phase gates from the Python step counter (no sync, kernels specialised
    per phase); the torch.where gate is the fallback. Both give the same training run across the
    early / late warm-up and stable boundaries, except that a transform outside its phase no
    longer updates its own statistic (TAM's)."""
    host_params, host_opt, host_tam = _phase_run(True, monkeypatch)
    where_params, where_opt, where_tam = _phase_run(False, monkeypatch)
    for a, b in zip(host_params, where_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for key, value in host_opt.state[a].items():
            if key != "tam_s" and isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, where_opt.state[b][key], rtol=1e-12, atol=1e-14)
    # TAM runs in the early warm-up (t < 3) only: frozen afterwards on the host-decided path
    assert host_tam[2:] == [host_tam[1]] * (len(host_tam) - 2)
    assert len(set(where_tam[2:])) > 1


def test_phase_schedule():
    assert [phase_index(t, 10) for t in (1, 4, 5, 9, 10, 19, 20, 100)] == [0, 0, 1, 1, 2, 2, 3, 3]


# -- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", FAMILY)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("config", ["defaults", "all_on"])
def test_loss_decreases_on_lora(cls, precision, config):
    m = TinyLoRANet(0)
    kw = dict(lr=1e-2, max_lr=5e-2, warmup_steps=30, min_8bit_size=16)
    if not cls.__name__.endswith("8bit"):
        kw["state_precision"] = precision
    elif precision != "8bit":
        pytest.skip("the *8bit classes are the 8-bit state")
    if config == "all_on":
        kw.update(ALL_ON)
    losses = train(m, cls(m.groups(), **kw), 80)
    assert losses[-1] < 0.6 * losses[0], losses[-1]


@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_loss_decreases_on_real_lycoris_lokr(cls, precision):
    net, _, _ = lycoris_network(dict(algo="lokr", factor="4"), dim=4, seed=0)
    named = list(net.named_parameters())
    gen = torch.Generator().manual_seed(3)
    targets = {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in named}
    opt = cls([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=1e-2, max_lr=5e-2,
              warmup_steps=20, state_precision=precision, min_8bit_size=16)
    first = None
    for _ in range(60):
        loss = sum(((p - targets[n]) ** 2).mean() for n, p in named)
        first = first if first is not None else float(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved])
@pytest.mark.parametrize("lr", [1e-5, 1e-4, 1e-3, 1e-2])
def test_lr_sweep_stays_finite_where_adamw_does(cls, lr):
    """The original 8-bit recipe was NaN at every lr; the Improved one froze at half warm-up."""
    base = TinyLoRANet(0)
    assert all(math.isfinite(x) for x in train(base, torch.optim.AdamW(base.groups(named=False), lr=lr), 60))
    for config, precision in (({}, "fp32"), (ALL_ON, "8bit")):
        m = TinyLoRANet(0)
        opt = cls(m.groups(lrs=(lr, lr)), lr=lr, max_lr=max(10 * lr, 1e-3), min_lr=lr / 100, warmup_steps=20,
                  state_precision=precision, min_8bit_size=16, **config)
        before = params_of(m)
        losses = train(m, opt, 60)
        assert all(math.isfinite(x) for x in losses)
        assert all(torch.isfinite(p).all() for p in m.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, params_of(m)))


# -- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved])
@pytest.mark.parametrize("precision", ["fp32", "8bit"])
def test_resume_continues_exactly(cls, precision):
    """Every adaptive quantity (masks, polarity, factored statistics, momenta, TAM, C-Optim
    context) survives save -> torch.load(weights_only=True) -> load; the original 8-bit recipe
    raised KeyError on the first step after a resume (defect 40)."""
    kw = dict(lr=1e-2, max_lr=5e-2, warmup_steps=12, state_precision=precision, min_8bit_size=16)
    sd = assert_resume_exact(lambda groups: cls(groups, **kw), seed=1, steps=24, split=9)
    if cls is Automagic_CameAMP_COptim:
        assert float(sd["hina_context"]["count"]) == 9


# -- config API -----------------------------------------------------------------------------------
def test_config_validates_and_round_trips():
    cfg = OptimizerConfig(lr=2e-4, warmup_steps=300, edge_suppression=True)
    assert OptimizerConfig.from_dict(cfg.to_dict()) == cfg
    assert OptimizerConfig.from_toml(cfg.to_toml()) == cfg
    assert isinstance(OptimizerConfig().context_window, int)  # defect 39: not a 1-tuple
    with pytest.raises(ValueError, match="min_lr"):
        OptimizerConfig(min_lr=1e-2, max_lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps=0"):
        OptimizerConfig(warmup_steps=0)
    with pytest.raises(TypeError, match="did you mean warmup_steps"):
        Automagic_CameAMP([torch.nn.Parameter(torch.ones(2))], warmup_step=10)
    m = TinyLoRANet(0)
    opt = Automagic_CameAMP(m.parameters(), config=cfg, lr=3e-4)  # kwargs override the config
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["warmup_steps"] == 300


def test_factories_use_the_presets_and_accept_overrides():  # defect 64
    m = TinyLoRANet(0)
    lora = create_lora_optimizer(m.parameters(), lr=1e-4, warmup_steps=500, edge_suppression=False)
    assert lora.defaults["lora_rank_penalty"] and not lora.defaults["edge_suppression"]
    assert not lora.defaults["full_finetune"]
    full = create_full_finetune_optimizer(m.parameters(), lr=5e-5, full_finetune=True)
    assert full.defaults["full_finetune"] and full.defaults["lr"] == 5e-5
    train(m, lora, 3)


def test_registry_resolves_every_name_case_insensitively():
    for name in ("Automagic_CameAMP", "automagic_cameamp8bit", "Automagic_CameAMP_COptim",
                 "automagic_cameamp_coptim8bit", "Automagic_CameAMP_Improved"):
        assert hk.get_optimizer_class(name).__name__.lower() == name.lower()
    opt = hk.create_optimizer("Automagic_CameAMP8bit", [torch.nn.Parameter(torch.ones(8))], lr=1e-4)
    assert opt.state_precision == "8bit"


# -- defects of the originals ------------------------------------------------------------------------
def test_first_step_updates_and_no_device_sync_on_cpu():  # defects 30, 32
    m = TinyLoRANet(0)
    before = params_of(m)
    train(m, Automagic_CameAMP(m.groups(), lr=1e-2), 1)
    assert all(not torch.equal(a, b) for a, b in zip(before, params_of(m)))


def test_first_update_is_not_blown_up_by_a_missing_bias_correction():  # defect 33
    p = torch.nn.Parameter(torch.zeros(4, 6))
    opt = Automagic_CameAMP([p], lr=1e-3, max_lr=1e-3, weight_decay=0.0, full_finetune=True)
    p.grad = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    opt.step()
    # RMS-capped update times the rate: at most lr per element on average
    assert float(p.detach().pow(2).mean().sqrt()) <= 1e-3 * 1.0001


def test_weight_decay_continues_after_half_warmup():  # defect 37
    p = torch.nn.Parameter(torch.ones(8, 8))
    opt = Automagic_CameAMP([p], lr=1e-2, max_lr=1e-2, warmup_steps=4, weight_decay=0.5, full_finetune=True,
                            lr_bump=0.0)
    for _ in range(10):
        p.grad = torch.zeros_like(p)  # no gradient: only decay can move the weights
        before = p.detach().clone()
        opt.step()
    assert float(p.detach().mean()) < float(before.mean())


def test_improved_does_not_freeze_at_half_warmup():  # defect 48 / E7
    m = TinyLoRANet(0)
    opt = Automagic_CameAMP_Improved(m.groups(), lr=1e-2, max_lr=5e-2, warmup_steps=20, **ALL_ON)
    train(m, opt, 10)
    mid = params_of(m)
    train(m, opt, 30, start=10)
    moved = sum(float((a - b).abs().sum()) for a, b in zip(mid, params_of(m)))
    assert moved > 1e-3
    assert all(abs(float(st["tam_s"])) <= 1.0 for st in opt.state.values())


def test_mask_follows_a_decaying_scheduler_without_compounding():  # defects 36, 40, 54
    p = torch.nn.Parameter(torch.ones(16, 16))
    opt = Automagic_CameAMP([p], lr=1e-3, max_lr=1e-2, warmup_steps=3, weight_decay=0.0, full_finetune=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 if s >= 5 else 1.0)
    for _ in range(8):
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    frozen = opt.state[p]["lr_mask"].float().abs().clone()
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    torch.testing.assert_close(opt.state[p]["lr_mask"].float().abs(), frozen)  # stored mask frozen
    assert opt.get_group_lr(opt.param_groups[0]) == pytest.approx(float(frozen.mean()) * 1e-2 * 0.5, rel=1e-3)


def test_gradients_are_not_modified_in_place():  # defect 56
    m = TinyLoRANet(0)
    opt = Automagic_CameAMP_Improved(m.groups(), lr=1e-2, **ALL_ON)
    x, y = batch(0, m.dims)
    torch.nn.functional.mse_loss(m(x), y).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, m.parameters()))


def test_runs_are_deterministic():  # defect 44: the stagnation branch drew from Python's random
    out = []
    for _ in range(2):
        m = TinyLoRANet(0)
        opt = Automagic_CameAMP_COptim(m.groups(), lr=1e-2, context_window=5)
        train(m, opt, 25)
        out.append(params_of(m))
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_state_is_factored():  # defect 31: the originals kept full-size v and residual
    p = torch.nn.Parameter(torch.randn(64, 256))
    opt = Automagic_CameAMP([p], lr=1e-4)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert st["came_v_row"].shape == (64,) and st["came_v_col"].shape == (256,)
    assert st["came_r_row"].shape == (64,) and "exp_avg_sq" not in st
    assert opt.state_bytes_per_element() < 6.2


def test_regularisers_fix_sign_and_threshold_and_switch_off_where_meaningless():  # defects 50-52
    g = torch.full((6, 6), 0.3)
    assert torch.equal(FrequencyPenalty(0.05).apply(g, param=g, step=1), g)  # no drift on a flat gradient
    spiky = torch.zeros(6, 6)
    spiky[3, 3] = 1e-4  # a tiny raw gradient still has edges relative to itself
    assert EdgeSuppression(0.6, 0.1).apply(spiky, param=spiky, step=1)[3, 3] < 1e-4
    low = LowRankPenalty(0.01, keep=10)
    assert not low.applies_to(torch.zeros(320, 8), None)  # LoRA rank <= 10: no tail to penalise
    w = torch.randn(16, 12)
    out = low.apply(torch.zeros_like(w), param=w, step=10)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(out, 0.01 * 10 * (u[:, 10:] * s[10:]) @ vh[10:], rtol=1e-4, atol=1e-6)
    p = torch.nn.Parameter(torch.ones(5))
    opt = Automagic_CameAMP_Improved([p], lr=1e-3, edge_suppression=True)
    p.grad = torch.ones(5)
    with pytest.warns(UserWarning, match="edge_suppression: off for 1 tensor"):
        opt.step()


def test_a_custom_regularization_strategy_changes_the_update():
    seen = []

    class Flip(RegularizationStrategy):
        name = "flip"

        def apply(self, grad, **kwargs):
            seen.append((tuple(grad.shape), kwargs["step"]))
            return -grad

    runs = []
    start = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    for regs in ((), (Flip(),)):
        p = torch.nn.Parameter(start.clone())
        opt = Automagic_CameAMP([p], lr=1e-3, regularizers=regs, full_finetune=True, weight_decay=0.0)
        p.grad = grad.clone()
        opt.step()
        runs.append(p.detach() - start)
    assert seen == [((4, 4), 1)]
    assert float((runs[0] * runs[1] < 0).float().mean()) > 0.9  # the flipped gradient moves the other way


def test_log_dict_reports_masks_phase_and_c_optim():
    m = TinyLoRANet(0)
    opt = Automagic_CameAMP_COptim(m.groups(), lr=1e-2, warmup_steps=4)
    for s in range(6):
        x, y = batch(s, m.dims)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.set_loss(loss)
        opt.step()
    d = opt.log_dict()
    assert d["hina/phase"] == 2.0 and d["hina/coptim/signal_is_loss"] == 1.0
    assert 0 < d["hina/lr_mask/min"] <= d["hina/lr_mask/mean"] <= d["hina/lr_mask/max"]
    info = opt.get_optimization_info()
    assert info["phase"] == "stable" and info["config"]["warmup_steps"] == 4


@pytest.mark.parametrize("cls", [Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved])
def test_step_makes_no_host_syncs(cls):  # defect 69: .item() per parameter per step in the originals
    from hina_kohya.bench.syncs import count_host_syncs

    m = TinyLoRANet(0)
    opt = cls(m.groups(), lr=1e-3, warmup_steps=10, **(ALL_ON if cls is Automagic_CameAMP_Improved else {}))
    train(m, opt, 3)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    with count_host_syncs() as syncs:
        opt.step()
    assert syncs.count == 0, syncs.by_method


@pytest.mark.parametrize("fused", [False, True])
def test_log_dict_cautious_fraction_counts_only_tensors_cautious_ran_on(fused):
    # Cautious starts at half the warm-up: before it, log_dict has no fraction (it crashed on the
    # eager path when the per-tensor slots carried no count); after it, a fraction in [0, 1]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(*s)) for s in [(8, 4), (16, 8), (8, 8, 1, 1)]]
    opt = Automagic_CameAMP_Improved([{"params": ps, "param_names": ["a.lokr_w1", "a.lokr_w2", "b.lokr_w2"]}],
                                     lr=1e-3, fused=fused, warmup_steps=4)
    seen = []
    for _ in range(6):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        seen.append(opt.log_dict().get("hina/cautious_kept/group0"))
    assert seen[0] is None
    assert seen[-1] is not None and 0.2 < seen[-1] < 1.0


@pytest.mark.parametrize("cls", [Automagic_CameAMP, hk.AdaptiveHinaAdamW])
def test_an_lr_above_max_lr_is_reported_not_silently_capped(cls):
    """Both families' lr masks live in [min_lr, max_lr]: lr=3e-3 with an absolute max_lr=1e-3 (the
    originals' default) trains like 1e-3 (AdaptiveHinaAdamW's converge sweep gave the same loss at
    every lr of its grid before it warned); the default cap, 10 x lr, never sits below the lr."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.warns(UserWarning, match=r"lr=0\.003 is above max_lr=0\.001.*max_lr=0\.03"):
        cls([p], lr=3e-3, max_lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([p], lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([p], lr=3e-3, max_lr=1e-2)
    if cls is hk.AdaptiveHinaAdamW:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cls([p], lr=3e-3, use_lr_mask=False)  # no mask, no cap


@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_a_non_finite_signal_does_not_poison_c_optim(bad):
    """One NaN loss (an fp16 overflow step) or one NaN gradient (the gradient-norm fallback) used
    to turn the context multiplier into NaN for good: every later step was a no-op."""
    p = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    opt = Automagic_CameAMP_COptim([p], lr=1e-3)
    for s in range(30):
        p.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(s))
        if bad == "gradient" and s == 5:
            p.grad[0, 0] = float("nan")
        if bad == "loss":
            opt.set_loss(torch.tensor(float("nan") if s == 5 else 1.0 / (s + 1)))
        before = p.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gradient-norm fallback's one message
            opt.step()
        if s == 29:
            assert not torch.equal(p.detach(), before)  # still training
    multiplier = opt.log_dict()["hina/coptim/multiplier"]
    assert math.isfinite(multiplier) and 0.5 <= multiplier <= 3.0


@pytest.mark.parametrize("cls", FAMILY)
def test_a_bad_gradient_skips_only_its_own_tensor(cls):
    """Group-wide statistics (adaptive weight decay) must not carry one tensor's NaN into the
    others: only the tensor with the bad gradient skips its step."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(64, 64, generator=gen)) for _ in range(2))
    opt = cls([a, b], lr=1e-3, min_8bit_size=1)
    for s in range(3):
        a.grad, b.grad = (torch.randn(64, 64, generator=gen) for _ in range(2))
        if s == 2:
            a.grad[0, 0] = float("nan")
        before = a.detach().clone(), b.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # C-Optim's gradient-norm fallback message
            opt.step()
    assert torch.equal(a.detach(), before[0]) and not torch.equal(b.detach(), before[1])
    assert torch.isfinite(b).all() and opt.log_dict()["hina/nonfinite_skipped"] == 1
