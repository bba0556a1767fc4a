"""roles.py: classification and pairing on real LyCORIS networks and sd-scripts names."""

import pytest
import torch

from hina_kohya.roles import build_structure, classify, structure_of
from standins import LYCORIS_ALGOS as ALGOS, lycoris_network

pytest.importorskip("lycoris")


# leaf -> (kind, factor, adapter) the real networks must produce
EXPECTED_LEAF = {
    "lora_down.weight": ("lora_down", "A", True), "lora_up.weight": ("lora_up", "B", True),
    "lora_mid.weight": ("lora_mid", "", True),
    "hada_w1_a": ("hada_w1_a", "", True), "hada_w1_b": ("hada_w1_b", "", True),
    "hada_w2_a": ("hada_w2_a", "B", True), "hada_w2_b": ("hada_w2_b", "A", True),
    "lokr_w1": ("lokr_w1", "A", True), "lokr_w1_a": ("lokr_w1_a", "A", True), "lokr_w1_b": ("lokr_w1_b", "A", True),
    "lokr_w2": ("lokr_w2", "B", True), "lokr_w2_a": ("lokr_w2_a", "A", True), "lokr_w2_b": ("lokr_w2_b", "B", True),
    "weight": ("full_weight", "", False), "bias": ("full_bias", "", False),
    "dora_scale": ("dora_scale", "", True), "w_norm": ("norm_w", "", True), "b_norm": ("norm_b", "", True),
    "hada_t1": ("hada_t", "", True), "hada_t2": ("hada_t", "", True), "lokr_t2": ("lokr_t", "", True),
    "up_list": ("up_list", "B", True), "down_list": ("down_list", "A", True),
    "a1.weight": ("glora_a1", "A", True), "a2.weight": ("glora_a2", "B", True),
    "b1.weight": ("glora_b1", "A", True), "b2.weight": ("glora_b2", "B", True),
    "oft_blocks": ("oft_blocks", "", True), "rescale": ("oft_rescale", "", True),
    "q_layer.weight": ("tlora_q", "", True), "p_layer.weight": ("tlora_p", "", True),
    "lambda_layer": ("tlora_lambda", "", True), "scalar": ("scalar", "", True),
}


def _named(net):
    return [(n, p) for n, p in net.named_parameters()]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_lycoris_parameter_gets_the_expected_role(algo):
    net, _, _ = lycoris_network(ALGOS[algo])
    named = _named(net)
    assert named
    st = build_structure([n for n, _ in named], [tuple(p.shape) for _, p in named])
    for (name, p), role in zip(named, st.roles):
        module, leaf = name.split(".", 1)
        assert role.module == module, name
        kind, factor, adapter = EXPECTED_LEAF[leaf.split(".")[0] if "_list." in leaf else leaf]
        if leaf == "weight" and sum(d != 1 for d in p.shape) <= 1:  # IA3: (C,) or (1, C, 1, 1)
            kind, adapter = "ia3", True
        assert (role.kind, role.factor, role.adapter) == (kind, factor, adapter), name
    assert not st.warnings


@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "lora_scalar"])
def test_b_factors_are_exactly_the_zero_initialised_factors(algo):
    """DESIGN: B-like = zero-initialised, as LyCORIS initialises them (checked on the real init)."""
    net, _, _ = lycoris_network(ALGOS[algo])
    named = _named(net)
    st = build_structure([n for n, _ in named], [tuple(p.shape) for _, p in named])
    for (name, p), role in zip(named, st.roles):
        if role.family in ("norm", "oft", "ia3", "scalar"):  # zero-initialised deltas, not factors of a product
            continue
        assert role.is_b == bool((p == 0).all()), name


def test_use_scalar_keeps_lora_up_as_the_b_factor():
    """With LyCORIS use_scalar the zero sits in `scalar` and lora_up is random; LoRA+'s ratio is
    about the output-side factor (its analysis is by layer widths), so lora_up stays B."""
    net, _, _ = lycoris_network(ALGOS["lora_scalar"])
    named = _named(net)
    st = build_structure([n for n, _ in named], [tuple(p.shape) for _, p in named])
    for (name, p), role in zip(named, st.roles):
        if role.kind == "scalar":
            assert bool((p == 0).all()) and not role.is_b
        if role.kind == "lora_up":
            assert role.is_b and not bool((p == 0).all())


@pytest.mark.parametrize("algo", list(ALGOS))
def test_pairs_are_complete_and_consistent(algo):
    net, _, _ = lycoris_network(ALGOS[algo])
    named = _named(net)
    names = [n for n, _ in named]
    st = build_structure(names, [tuple(p.shape) for _, p in named])
    roles = st.roles
    b_indices = [i for i, r in enumerate(roles) if r.is_b]
    paired_b = [b for _, b in st.pairs]
    assert sorted(paired_b) == sorted(b_indices)  # every B has exactly one A partner
    for a, b in st.pairs:
        assert roles[a].module == roles[b].module and roles[a].factor == "A" and roles[b].factor == "B"
    lokr_modules = {r.module for r in roles if r.family == "lokr" and r.kind != "dora_scale"}
    assert len(st.kron) == len(lokr_modules)
    for w1, w2 in st.kron:
        assert all(roles[i].kind.startswith("lokr_w1") for i in w1)
        assert all(roles[i].kind.startswith("lokr_w2") for i in w2)


def test_lokr_layouts_pair_by_module():
    net, _, _ = lycoris_network(ALGOS["lokr_decompose_both"])
    named = _named(net)
    st = build_structure([n for n, _ in named], [tuple(p.shape) for _, p in named])
    kinds = lambda idx: sorted(st.roles[i].kind for i in idx)  # noqa: E731
    layouts = {(tuple(kinds(w1)), tuple(kinds(w2))) for w1, w2 in st.kron}
    assert (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")) in layouts
    assert (("lokr_w1",), ("lokr_w2_a", "lokr_w2_b")) in layouts


def test_sd_scripts_lora_names():
    names = [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_down.weight",
        "lora_unet_down_blocks_0_resnets_0_conv2.lora_up.weight",
        "lora_unet_single_blocks_0_linear1.lora_down.0.weight",  # lora_flux split_qkv
        "lora_unet_single_blocks_0_linear1.lora_up.0.weight",
        "lora_unet_single_blocks_0_linear1.lora_down.1.weight",
        "lora_unet_single_blocks_0_linear1.lora_up.1.weight",
        "lora_unet_mid.lora_A.0", "lora_unet_mid.lora_B.0",  # sd-scripts dylora
        "lora_unet_mid2.up_list.0", "lora_unet_mid2.down_list.0",  # LyCORIS dylora
    ]
    shapes = [(8, 768), (768, 8), (4, 320, 3, 3), (320, 4, 1, 1), (4, 64), (64, 4), (4, 64), (64, 4),
              (1, 32), (32, 1), (32, 2), (2, 32)]
    st = build_structure(names, shapes)
    assert [r.kind for r in st.roles] == ["lora_down", "lora_up"] * 4 + ["lora_A", "lora_B", "up_list", "down_list"]
    assert st.roles[4].slot == "0" and st.roles[6].slot == "1"
    assert st.pairs == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (11, 10)]
    assert st.roles[0].module == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_other_names_and_full_finetune():
    assert classify("model.layers.0.mlp.weight").kind == "other"
    assert not classify("model.layers.0.mlp.weight").adapter
    assert classify("lora_unet_x.weight", (4, 4)).kind == "full_weight"
    assert classify("lora_unet_x.weight", (4,)).kind == "ia3"
    peft = classify("base_model.model.q_proj.lora_B.default.weight")
    assert (peft.kind, peft.factor, peft.module) == ("lora_B", "B", "base_model.model.q_proj")


def test_plain_weights_and_biases_of_one_module_are_not_duplicates():
    st = build_structure(["head.weight", "head.bias", "m.lora_down.weight", "m.lora_down.weight"],
                         [(8, 4), (8,), (2, 4), (2, 4)])
    assert st.warnings == ["duplicate parameter role lora_down in m"]  # a real duplicate still is


def test_incompatible_shapes_are_not_paired_and_warned():
    st = build_structure(["m.lora_down.weight", "m.lora_up.weight"], [(4, 10), (12, 5)])
    assert st.pairs == [] and st.warnings


def test_names_from_param_names_then_named_then_none():
    a, b = torch.zeros(2, 3), torch.zeros(3, 2)
    st, problems = structure_of([{"params": [a, b], "named": ["m.lora_down.weight", "m.lora_up.weight"]}])
    assert st.named and st.pairs == [(0, 1)] and not problems
    st, problems = structure_of([{"params": [a, b], "param_names": ["m.lora_down.weight", "m.lora_up.weight"],
                                  "named": ["x", "y"]}])
    assert st.pairs == [(0, 1)]
    st, problems = structure_of([{"params": [a, b]}])
    assert not st.named and st.roles == [None, None]
    flat = torch.zeros(12)  # ZeRO-style flattening: names no longer line up
    st, problems = structure_of([{"params": [flat], "param_names": ["m.lora_down.weight", "m.lora_up.weight"]}])
    assert not st.named and "flattened" in problems[0]


def test_structure_is_linear_time():
    n = 20_000
    names = [f"lora_unet_m{i // 2}.lora_{'down' if i % 2 == 0 else 'up'}.weight" for i in range(n)]
    shapes = [(4, 8) if i % 2 == 0 else (8, 4) for i in range(n)]
    st = build_structure(names, shapes)
    assert len(st.pairs) == n // 2
