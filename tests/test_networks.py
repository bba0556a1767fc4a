"""The wrapper network modules (INTEGRATION.md §3.3-3.4) with the real lycoris-lora from PyPI,
and with a stand-in of an sd-scripts network module written here."""

import sys
import textwrap

import pytest
import torch

import hina_kohya as hk
from standins import LYCORIS_ALGOS, lycoris_network

pytest.importorskip("lycoris")
from hina_kohya.networks import lycoris as wrapper  # noqa: E402
from hina_kohya.networks.groups import pop_options  # noqa: E402

# leaves that never decay (INTEGRATION.md §3.4), written out independently of roles.decays
NO_DECAY_LEAVES = {"dora_scale", "w_norm", "b_norm", "scalar", "rescale", "lambda_layer", "bias"}


def expected_decay(name, shape):
    leaf = name.split(".", 1)[1]
    if len(shape) <= 1 or leaf.split(".")[-1] in NO_DECAY_LEAVES:
        return False
    return leaf != "weight"  # LyCORIS algo=full (the whole weight) and IA3 vectors


# BOFT needs power-of-two widths: built on 64-wide stand-ins
ALGOS = {**LYCORIS_ALGOS, "boft": dict(algo="boft", rescaled="True")}


def _groups(algo_args, **options):
    width = 64 if algo_args.get("algo") == "boft" else 48
    net, _, _ = lycoris_network({**algo_args, **options}, module=wrapper, te_width=width)
    return net, *net.prepare_optimizer_params(1e-5, 1e-4, 1e-4)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_groups_cover_every_parameter_once_with_aligned_names(algo):
    net, groups, descs = _groups(ALGOS[algo])
    trainable = {id(p): n for n, p in net.named_parameters() if p.requires_grad}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    assert len(descs) == len(groups)
    for g, d in zip(groups, descs):
        assert isinstance(g["params"], list) and len(g["param_names"]) == len(g["params"])
        assert [trainable[id(p)] for p in g["params"]] == g["param_names"]
        no_decay = d.endswith(" no_decay")
        assert ("weight_decay" in g) == no_decay and g.get("weight_decay", 0.0) == 0.0
        for name, p in zip(g["param_names"], g["params"]):
            assert expected_decay(name, tuple(p.shape)) is not no_decay, (d, name, tuple(p.shape))
        assert g["lr"] == (1e-5 if d.startswith("textencoder") else 1e-4)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_two_builds_give_the_same_groups(algo):
    first = _groups(ALGOS[algo])
    second = _groups(ALGOS[algo])
    assert first[2] == second[2]
    assert [g["param_names"] for g in first[1]] == [g["param_names"] for g in second[1]]
    assert [[tuple(p.shape) for p in g["params"]] for g in first[1]] == \
        [[tuple(p.shape) for p in g["params"]] for g in second[1]]


def test_the_optimizer_receives_the_names_and_pairs():
    _, groups, descs = _groups(LYCORIS_ALGOS["lokr_norm_dora"])
    opt = hk.HinaAdamW(groups, lr=1e-4, weight_decay=0.01)
    info = opt.get_optimization_info()
    assert info["names_provided"] and info["lokr_stats"]["lokr_pairs"] == info["lokr_stats"]["lokr_groups"] > 0
    assert info["lokr_stats"]["norm_pairs"] > 0
    # decay groups inherit the optimizer's weight decay, no-decay groups keep 0
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0 if d.endswith("no_decay") else 0.01 for d in descs]
    _, lora_groups, _ = _groups(LYCORIS_ALGOS["lora"])
    pairing = hk.HinaAdamW(lora_groups, lr=1e-4).diagnose_lora_pairing()["groups"]
    assert sum(g["pairs_count"] for g in pairing.values()) == sum(g["lora_b_count"] for g in pairing.values()) > 0
    assert not any(g["unpaired_a"] or g["unpaired_b"] for g in pairing.values())


def test_loraplus_groups_are_split_independently():
    _, groups, descs = _groups(LYCORIS_ALGOS["lora_norm_dora"], loraplus_lr_ratio="4")
    assert descs == ["textencoder", "textencoder no_decay", "textencoder plus", "unet", "unet no_decay", "unet plus"]
    plus = groups[descs.index("unet plus")]
    assert all(".lora_up." in n for n in plus["param_names"]) and plus["lr"] == pytest.approx(4e-4)


def test_plugin_options():
    _, groups, descs = _groups(LYCORIS_ALGOS["lora_norm_dora"], hina_wd_split="false", hina_named_key="yes")
    assert descs == ["textencoder", "unet"]
    assert all(g["named"] == g["param_names"] for g in groups)
    _, groups, descs = _groups(LYCORIS_ALGOS["lora"], hina_no_decay=r"attn2|\.lora_down\.")
    no_decay = {n for g, d in zip(groups, descs) if d.endswith("no_decay") for n in g["param_names"]}
    assert no_decay and all("attn2" in n or ".lora_down." in n for n in no_decay)
    _, groups, descs = _groups(LYCORIS_ALGOS["full"], hina_decay_full="true")
    decayed = {n for g, d in zip(groups, descs) if not d.endswith("no_decay") for n in g["param_names"]}
    assert any(n.endswith(".weight") for n in decayed) and not any(n.endswith(".bias") for n in decayed)


@pytest.mark.parametrize("options,match", [
    ({"hina_wd_spilt": "true"}, "Did you mean 'hina_wd_split'"),
    ({"hina_wd_split": "maybe"}, "hina_wd_split='maybe': give true or false"),
    ({"hina_no_decay": "attn("}, "not a valid regular expression"),
])
def test_bad_plugin_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        pop_options(dict(options))


def test_network_args_other_than_ours_pass_through_untouched():
    kwargs = {"algo": "lokr", "factor": "8", "hina_wd_split": "false", "dropout": None}
    options = pop_options(kwargs)
    assert kwargs == {"algo": "lokr", "factor": "8", "dropout": None} and not options.wd_split


def test_saved_adapter_keys_and_weights_are_the_wrapped_modules(tmp_path):
    from safetensors import safe_open

    from lycoris import kohya

    plain, _, _ = lycoris_network(LYCORIS_ALGOS["lokr"], module=kohya)
    ours, _, _ = lycoris_network(LYCORIS_ALGOS["lokr"], module=wrapper)
    assert type(ours) is type(plain)
    a, b = plain.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    path = tmp_path / "adapter.safetensors"
    ours.save_weights(str(path), torch.float32, {"ss_network_module": "hina_kohya.networks.lycoris", "x": "1"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_hina_network_module"] == wrapper.__name__
    assert keys == sorted(a)


def test_create_network_from_weights_is_patched_too(tmp_path):
    net, _, _ = lycoris_network(LYCORIS_ALGOS["lokr"], module=wrapper)
    path = tmp_path / "adapter.safetensors"
    net.save_weights(str(path), torch.float32, {})
    from standins import StandInTextEncoder, StandInUNet

    loaded, weights = wrapper.create_network_from_weights(1.0, str(path), None, StandInTextEncoder(), StandInUNet(),
                                                          hina_wd_split="false")
    assert set(weights) == set(net.state_dict())
    assert getattr(loaded.prepare_optimizer_params, "__hina_kohya_groups__", False)


def test_state_round_trip_through_the_wrapper_groups(tmp_path):
    def run(steps, opt_state=None):
        net, groups, _ = _groups(LYCORIS_ALGOS["lokr_norm_dora"])
        opt = hk.AdaptiveHinaAdamW(groups, lr=1e-3, weight_decay=0.01)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        params = [p for g in groups for p in g["params"]]
        for s in range(steps):
            gen = torch.Generator().manual_seed(s)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
        return params, opt

    _, opt = run(3)
    path = tmp_path / "optimizer.bin"
    torch.save(opt.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["param_groups"][0]["param_names"] == opt.param_groups[0]["param_names"]
    _, resumed = run(0, loaded)
    assert resumed.last_load_report["remapped"] is False
    assert [len(g["params"]) for g in resumed.param_groups] == [len(g["params"]) for g in opt.param_groups]


SD_STANDIN = textwrap.dedent('''
    """A stand-in of an sd-scripts network module (its group method returns a list, as dylora's)."""
    import torch


    class Module(torch.nn.Module):
        def __init__(self, name, rank, width):
            super().__init__()
            self.lora_name = name
            self.lora_A = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(1, width)) for _ in range(rank)])
            self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(width, 1)) for _ in range(rank)])


    class Network(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder_loras = [Module("lora_te_layer_0_q", 2, 8)]
            self.unet_loras = [Module("lora_unet_block_0_to_q", 2, 8)]
            for m in self.text_encoder_loras + self.unet_loras:
                self.add_module(m.lora_name, m)

        def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr=None):
            te = [p for m in self.text_encoder_loras for p in m.parameters()]
            unet = [p for m in self.unet_loras for p in m.parameters()]
            return [{"params": te, "lr": text_encoder_lr}, {"params": unet, "lr": unet_lr}]


    def create_network(multiplier, dim, alpha, vae, text_encoder, unet, **kwargs):
        assert all(isinstance(v, str) or v is None for v in kwargs.values())
        return Network()


    def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, **kwargs):
        return Network(), {}
''')


def test_sd_scripts_module_wrapper_names_list_returning_groups(tmp_path, monkeypatch):
    (tmp_path / "networks").mkdir()
    (tmp_path / "networks" / "__init__.py").write_text("")
    (tmp_path / "networks" / "dylora.py").write_text(SD_STANDIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("networks", "networks.dylora", "hina_kohya.networks.dylora"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    from hina_kohya.networks import dylora

    net = dylora.create_network(1.0, 2, 1.0, None, None, None, dropout=None, hina_named_key="true")
    groups, descs = net.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
    assert descs == ["textencoder", "unet"]  # synthesised from the names: the base gave none
    assert groups[1]["param_names"] == ["lora_unet_block_0_to_q.lora_A.0", "lora_unet_block_0_to_q.lora_A.1",
                                        "lora_unet_block_0_to_q.lora_B.0", "lora_unet_block_0_to_q.lora_B.1"]
    assert groups[1]["named"] == groups[1]["param_names"]
    assert dylora.Network is sys.modules["networks.dylora"].Network  # other attributes forwarded
    opt = hk.HinaAdamW(groups, lr=1e-4)
    assert len(opt.structure.pairs) == 4  # lora_A.i / lora_B.i per rank slice


def test_missing_wrapped_module_says_what_is_needed(monkeypatch):
    for mod in ("networks", "networks.lora_sd3", "hina_kohya.networks.lora_sd3"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p])  # no cwd: no stray networks package
    with pytest.raises(ImportError, match="wraps networks.lora_sd3.*sd-scripts checkout"):
        import hina_kohya.networks.lora_sd3  # noqa: F401


def test_flat_tensor_lists_are_one_group_and_type_errors_never_escape(monkeypatch):
    from hina_kohya import integration
    from hina_kohya.networks import groups as groups_mod

    net, _, _ = lycoris_network(LYCORIS_ALGOS["lora"], module=wrapper)
    params = [p for p in net.parameters()]
    groups, descs = integration.split_param_groups(net, params)
    # the parameters themselves, each once (a tensor taken for a group would come back as its rows)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in params)
    assert descs == ["group0"]  # text-encoder and U-Net parameters together: no single label


    def broken(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr(groups_mod, "parameter_names", broken)
    # sd-scripts retries prepare_optimizer_params with the legacy signature on a TypeError: never ours
    with pytest.raises(RuntimeError, match="naming the optimizer groups failed: boom"):
        integration.split_param_groups(net, params)
    with pytest.raises(RuntimeError, match="naming the optimizer groups failed: boom"):
        net.prepare_optimizer_params(1e-5, 1e-4, 1e-4)
