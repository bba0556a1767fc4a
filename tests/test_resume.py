"""Checkpoints: weights-only loading, exact continuation, trainer casts, remapping by name."""

import warnings

import pytest
import torch

from helpers import TinyLoRANet, assert_resume_exact, params_of, plain_hina, roundtrip, train


def _cast_like_accelerate(sd, model_params):
    """What torch / accelerate do to loaded state: floating state tensors (but 'step') cast to the
    param dtype -- uint8 codes included."""
    out = {"param_groups": sd["param_groups"], "state": {}}
    flat = list(model_params)
    for idx, st in sd["state"].items():
        dtype = flat[idx].dtype
        out["state"][idx] = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k != "step" else v)
                             for k, v in st.items()}
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_resume_continues_exactly(precision):
    kw = dict(lr=1e-2, state_precision=precision, min_8bit_size=16)  # small threshold: really quantize
    sd = assert_resume_exact(lambda groups: plain_hina(groups, **kw), seed=3, steps=25, split=12)
    if precision == "8bit":
        saved = sd["state"][4]  # lora_unet_layer_1.lora_up.weight: 96 elements, quantized
        assert saved["exp_avg"].dtype == torch.uint8
        assert saved["exp_avg.absmax"].dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_accelerate_round_trip_before_and_during_training(precision):
    kw = dict(lr=1e-2, state_precision=precision, min_8bit_size=16)
    ref = TinyLoRANet(4)
    o_ref = plain_hina(ref.groups(), **kw)
    train(ref, o_ref, 20)

    m = TinyLoRANet(4)
    o = plain_hina(m.groups(), **kw)
    o.load_state_dict(_cast_like_accelerate(o.state_dict(), m.parameters()))  # prepare(): before step 1
    train(m, o, 10)
    sd = _cast_like_accelerate(roundtrip(o.state_dict()), [p for g in o.param_groups for p in g["params"]])
    o2 = plain_hina(m.groups(), **kw)
    o2.load_state_dict(sd)
    train(m, o2, 10, start=10)
    for a, b in zip(params_of(ref), params_of(m)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    p = m.layers[0].lora_down.weight
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}[precision]
    assert o2.state[p]["exp_avg"].dtype == expected


def test_resume_into_another_precision_converts_state():
    m = TinyLoRANet(5)
    o = plain_hina(m.groups(), state_precision="fp32")
    train(m, o, 5)
    o8 = plain_hina(m.groups(), state_precision="8bit", min_8bit_size=16)
    o8.load_state_dict(roundtrip(o.state_dict()))
    p = m.layers[0].lora_down.weight
    assert o8.state[p]["exp_avg"].dtype == torch.uint8
    restored = o8.store.read(o8.state[p], o8.chain_for(0).state_specs(o8.param_groups[0])[0], torch.float32)
    torch.testing.assert_close(restored, o.state[p]["exp_avg"], rtol=0.05, atol=1e-4)


def test_remap_by_name_when_order_changes():
    m = TinyLoRANet(6)
    o = plain_hina(m.groups(), lr=1e-2)
    train(m, o, 5)
    sd = roundtrip(o.state_dict())
    # new run: same parameters, groups listed in the opposite order and reversed inside
    groups = m.groups()[::-1]
    for g in groups:
        g["params"] = g["params"][::-1]
        g["param_names"] = g["param_names"][::-1]
    o2 = plain_hina(groups, lr=1e-2)
    with pytest.warns(UserWarning, match="matched by name"):
        o2.load_state_dict(sd)
    assert o2.last_load_report["remapped"] and not o2.last_load_report["added"]
    for p in m.parameters():
        if p in o.state:
            torch.testing.assert_close(o2.state[p]["exp_avg"], o.state[p]["exp_avg"])
            assert o2.state[p]["step"] == o.state[p]["step"]
    # the group hyperparameters stayed with their group, not with their position
    assert o2.param_groups[0]["weight_decay"] == groups[0]["weight_decay"]


def test_added_and_removed_parameters_are_reported():
    m = TinyLoRANet(7)
    o = plain_hina(m.groups())
    train(m, o, 3)
    sd = roundtrip(o.state_dict())
    groups = m.groups()
    gone = groups[1]["param_names"].pop(0)
    groups[1]["params"].pop(0)
    extra = torch.nn.Parameter(torch.zeros(3, 3))
    groups[1]["params"].append(extra)
    groups[1]["param_names"].append("lora_unet_new.lora_up.weight")
    o2 = plain_hina(groups)
    with pytest.warns(UserWarning, match="1 new parameter"):
        o2.load_state_dict(sd)
    assert o2.last_load_report["added"] == ["lora_unet_new.lora_up.weight"]
    assert o2.last_load_report["removed"] == [gone]
    assert extra not in o2.state or not o2.state[extra]


def test_changed_shape_starts_fresh_and_is_reported():
    m = TinyLoRANet(8)
    o = plain_hina(m.groups())
    train(m, o, 3)
    sd = roundtrip(o.state_dict())
    m2 = TinyLoRANet(8, dims=(16, 32, 24, 10))  # last layer changed shape, same names
    o2 = plain_hina(m2.groups())
    with pytest.warns(UserWarning, match="changed shape"):
        o2.load_state_dict(sd)
    assert "lora_unet_layer_2.lora_up.weight" in o2.last_load_report["reshaped"]
    train(m2, o2, 2)  # and training goes on


def test_unnamed_size_mismatch_is_a_clear_error():
    m = TinyLoRANet(9)
    o = plain_hina(m.groups(named=False))
    train(m, o, 2)
    sd = o.state_dict()
    groups = m.groups(named=False)
    groups[0]["params"] = groups[0]["params"][:-1]
    o2 = plain_hina(groups)
    with pytest.raises(ValueError, match="names were not recorded"):
        o2.load_state_dict(sd)


@pytest.mark.parametrize("rule", ["saved", "new"])
def test_resume_hparams_rule(rule):
    m = TinyLoRANet(10)
    o = plain_hina(m.groups(), betas=(0.9, 0.99))
    train(m, o, 2)
    o2 = plain_hina(m.groups(), betas=(0.8, 0.9), resume_hparams=rule)
    o2.load_state_dict(roundtrip(o.state_dict()))
    assert o2.param_groups[0]["betas"] == ((0.9, 0.99) if rule == "saved" else (0.8, 0.9))


@pytest.mark.parametrize("rule", ["saved", "new"])
def test_changed_hyperparameters_are_named_in_one_warning_with_the_rule(rule):
    m = TinyLoRANet(10)
    o = plain_hina(m.groups(), betas=(0.9, 0.99), eps=1e-8)
    train(m, o, 2)
    sd = roundtrip(o.state_dict())
    sd["param_groups"][0]["lr"] = 3e-4  # where a scheduler left it: not a change to report
    o2 = plain_hina(m.groups(), betas=(0.8, 0.9), eps=1e-6, resume_hparams=rule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o2.load_state_dict(sd)
    notes = [str(w.message) for w in caught if "differ from the checkpoint" in str(w.message)]
    assert len(notes) == 1, notes
    assert "2 hyperparameter(s)" in notes[0] and "lr:" not in notes[0]
    assert "betas: checkpoint (0.9, 0.99), constructor (0.8, 0.9)" in notes[0] and "eps: checkpoint 1e-08" in notes[0]
    assert f"resume_hparams={rule!r}" in notes[0]
    assert ("pass resume_hparams='new'" in notes[0]) == (rule == "saved")
    # unchanged hyperparameters (betas saved as a list by some tool): nothing to say
    o3 = plain_hina(m.groups(), betas=(0.9, 0.99), eps=1e-8)
    listed = roundtrip(o.state_dict())
    listed["param_groups"][0]["betas"] = list(listed["param_groups"][0]["betas"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o3.load_state_dict(listed)


@pytest.mark.parametrize("rule", ["saved", "new"])
def test_the_c_optim_context_follows_the_resume_rule(rule):
    from hina_kohya import Automagic_CameAMP_COptim

    def make(**kw):
        return Automagic_CameAMP_COptim(m.groups(lrs=(1e-3, 1e-3)), lr=1e-3, **kw)

    m = TinyLoRANet(12)
    o = make(context_window=8, edge_threshold=0.7, adaptation_rate=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(m, o, 12)
        sd = roundtrip(o.state_dict())
        # the checkpoint's window, or the constructor's: each is honoured with its whole history
        o2 = make(context_window=12 if rule == "saved" else 8, edge_threshold=0.5, adaptation_rate=0.05,
                  resume_hparams=rule)
        o2.load_state_dict(sd)
    c = o2.context
    assert (c.window, c.edge_threshold, c.adaptation_rate) == ((8, 0.7, 0.2) if rule == "saved" else (8, 0.5, 0.05))
    assert o2.param_groups[0]["edge_threshold"] == c.edge_threshold
    assert torch.equal(c.t["history"], o.context.t["history"])


def test_a_new_c_optim_window_cannot_continue_the_saved_history():
    from hina_kohya import Automagic_CameAMP_COptim

    m = TinyLoRANet(12)
    o = Automagic_CameAMP_COptim(m.groups(lrs=(1e-3, 1e-3)), lr=1e-3, context_window=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(m, o, 3)
        o2 = Automagic_CameAMP_COptim(m.groups(lrs=(1e-3, 1e-3)), lr=1e-3, context_window=12, resume_hparams="new")
        with pytest.raises(ValueError, match="context_window is 8, this optimizer's is 12: pass context_window=8"):
            o2.load_state_dict(roundtrip(o.state_dict()))


def test_state_dict_is_weights_only_safe_with_names():
    m = TinyLoRANet(11)
    o = plain_hina(m.groups(), state_precision="8bit", min_8bit_size=16)
    train(m, o, 2)
    sd = roundtrip(o.state_dict())
    assert sd["param_groups"][0]["param_names"][0].startswith("lora_unet_layer_")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_hina(m.groups(), state_precision="8bit", min_8bit_size=16).load_state_dict(sd)
