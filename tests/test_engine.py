"""Engine behaviour: lazy state, input handling, no host syncs, registry, honest refusals."""

import pytest
import torch

import hina_kohya as hk
from hina_kohya.bench.syncs import count_host_syncs
from helpers import TECHNIQUES_OFF, TinyLoRANet, plain_hina, train


def test_none_grad_on_step_one_then_grad_on_step_two():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = plain_hina([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert "step" in opt.state[a] and b not in opt.state
    assert torch.equal(b.detach(), torch.ones(3))  # no update and no weight decay without a grad
    b.grad = torch.ones(3)
    opt.step()
    assert opt.state[a]["step"] == 2 and opt.state[b]["step"] == 1
    # b's first step is a first Adam step: bias corrections start at t=1 for b
    c = torch.nn.Parameter(torch.ones(3))
    ref = torch.optim.AdamW([c], lr=0.1, weight_decay=0.1)
    c.grad = torch.ones(3)
    ref.step()
    torch.testing.assert_close(b.detach(), c.detach())


def test_group_without_any_grad_does_not_crash():
    m = TinyLoRANet(0)
    groups = m.groups()
    frozen = torch.nn.Parameter(torch.zeros(4))
    groups.append({"params": [frozen], "param_names": ["lora_unet_frozen.lora_up.weight"]})
    opt = plain_hina(groups)
    train(m, opt, 2)
    assert frozen not in opt.state


@pytest.mark.parametrize("make", [
    lambda: torch.nn.Parameter(torch.zeros(2, 2).to_sparse()),
    lambda: torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64)),
])
def test_sparse_and_complex_params_rejected_at_construction(make):
    with pytest.raises(TypeError, match="does not support"):
        plain_hina([make()])


def test_sparse_grad_rejected_at_step():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    opt = plain_hina([p])
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


def test_accepts_what_sd_scripts_passes():
    m = TinyLoRANet(0)
    params = dict(m.named_trainable())
    groups = [{"params": params.values(), "lr": 1e-3}]  # dict_values, as sd-scripts builds them
    opt = plain_hina(groups, lr=1e-4)
    assert opt.param_groups[0]["lr"] == 1e-3 and len(opt.param_groups[0]["params"]) == len(params)
    flat = plain_hina(p for p in m.parameters())  # a generator, consumed once
    assert len(flat.param_groups[0]["params"]) == len(list(m.parameters()))
    named = plain_hina(m.named_trainable())  # torch >= 2.6 (name, tensor) pairs
    assert named.structure.named and named.structure.pairs
    with pytest.raises(TypeError, match="not a set"):
        plain_hina({torch.nn.Parameter(torch.zeros(2))})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_makes_no_host_syncs(precision, dtype):
    m = TinyLoRANet(0)
    if dtype != torch.float32:
        m = m.to(dtype)
    opt = plain_hina(m.groups(), state_precision=precision, min_8bit_size=16)
    for _ in range(2):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        with count_host_syncs() as syncs:
            opt.step()
        assert syncs.count == 0, syncs.by_method


def test_sync_counter_counts():
    with count_host_syncs() as syncs:
        float(torch.ones(()))
        torch.ones(()).item()
        if torch.ones(()):
            pass
    assert syncs.count == 3


def test_registry_names_are_case_insensitive_with_aliases():
    assert hk.get_optimizer_class("hinaadamw") is hk.HinaAdamW
    assert hk.get_optimizer_class("HinaAdamWOptimizer") is hk.HinaAdamW
    assert hk.get_optimizer_class("hinaadamwoptimizer8bit") is hk.HinaAdamW8bit
    assert "HinaAdamW" in hk.list_optimizers()
    assert hk.get_spec("HinaAdamW").uses_names
    with pytest.raises(KeyError, match="Did you mean HinaAdamW"):
        hk.get_optimizer_class("HinaAdamV")


def test_create_optimizer_checks_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = hk.create_optimizer("HinaAdamW", p, lr=1e-3, **TECHNIQUES_OFF)
    assert isinstance(opt, hk.HinaAdamW)
    with pytest.raises(hk.UnknownOptimizerArgument, match="Did you mean 'use_spd'"):
        hk.create_optimizer("HinaAdamW", p, use_sdp=False)


def test_eight_bit_variant_defaults_to_8bit_state():
    p = torch.nn.Parameter(torch.randn(100, 100))
    opt = hk.HinaAdamW8bit([p], **TECHNIQUES_OFF)
    assert opt.state_precision == "8bit" and isinstance(opt, hk.HinaAdamW)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    assert hk.HinaAdamW8bit([p], state_precision="fp32", **TECHNIQUES_OFF).state_precision == "fp32"


def test_legacy_bitsandbytes_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert plain_hina(p, optim_bits=8).state_precision == "8bit"
    with pytest.warns(UserWarning, match="amsgrad, is_paged have no effect"):
        plain_hina(p, amsgrad=True, is_paged=True)


def test_log_dict_is_plain_floats():
    m = TinyLoRANet(0)
    opt = plain_hina(m.groups())
    assert opt.log_dict()["hina/step"] == 0.0
    train(m, opt, 3)
    logs = opt.log_dict()
    assert all(type(v) is float for v in logs.values())
    assert logs["hina/step"] == 3.0 and logs["hina/state_bytes_per_element"] == 8.0
    assert logs["hina/lr/group0"] == 1e-2
