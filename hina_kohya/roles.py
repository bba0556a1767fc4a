"""Parameter roles: the only code in hina_kohya that reads parameter names.

A name such as ``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`` is split into
the *module key* (``lora_unet_..._proj_in``, what sd-scripts and LyCORIS call ``lora_name``) and
the *leaf* (``lora_down.weight``). The leaf decides the role; parameters of one module are then
paired. Transforms receive ``Role`` objects and pair indices, never strings.

Factor letters follow LoRA+ (Hayou et al. 2024, arXiv 2402.12354): "B" is the zero-initialised
factor of a product (it steps ``alora_ratio`` times its partner), "A" its randomly initialised
partner. Which factor LyCORIS zero-initialises was checked against lycoris-lora 4.1.3 (tests
build real networks and assert it): ``lora_up``, ``lokr_w2`` / ``lokr_w2_b``, ``hada_w2_a``,
GLoRA ``a2`` / ``b2``, DyLoRA ``up_list.i`` / ``lora_B.i``. (With LyCORIS ``use_scalar=True`` the
zero sits in ``scalar`` instead and ``lora_up`` starts random; ``lora_up`` stays B, because LoRA+'s
ratio is about the output-side factor, its analysis being by layer widths.)

``adapter`` is True for adapter factors and deltas (their SPD anchor is 0, no copy is stored) and
False for whole weights (LyCORIS ``algo=full``, plain fine-tuning, unknown names).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    kind: str        # e.g. "lora_down", "lokr_w2_b", "hada_w2_a", "dora_scale", "full_weight"
    family: str      # lora, lokr, loha, glora, dylora, tlora, oft, ia3, full, norm, dora, scalar, other
    module: str      # module key (LyCORIS / sd-scripts lora_name); "" when unknown
    slot: str = ""   # sub-index: split_qkv / DyLoRA rank block ("0", "1", ...)
    factor: str = "" # "A", "B" or "" (see module docstring)
    adapter: bool = False

    @property
    def is_b(self) -> bool:
        return self.factor == "B"


# (leaf regex, kind, family, factor, adapter). First match wins. The regex must match the whole
# leaf; group "slot" captures an index when present.
_LEAVES: list[tuple[str, str, str, str, bool]] = [
    (r"lora_down(?:\.(?P<slot>\d+))?\.weight", "lora_down", "lora", "A", True),
    (r"lora_up(?:\.(?P<slot>\d+))?\.weight", "lora_up", "lora", "B", True),
    (r"lora_mid\.weight", "lora_mid", "lora", "", True),
    (r"lora_A(?:\.(?P<slot>[\w]+))?(?:\.weight)?", "lora_A", "lora", "A", True),
    (r"lora_B(?:\.(?P<slot>[\w]+))?(?:\.weight)?", "lora_B", "lora", "B", True),
    (r"down_list\.(?P<slot>\d+)", "down_list", "dylora", "A", True),
    (r"up_list\.(?P<slot>\d+)", "up_list", "dylora", "B", True),
    (r"hada_w1_a", "hada_w1_a", "loha", "", True),
    (r"hada_w1_b", "hada_w1_b", "loha", "", True),
    (r"hada_w2_a", "hada_w2_a", "loha", "B", True),
    (r"hada_w2_b", "hada_w2_b", "loha", "A", True),
    (r"hada_t(?P<slot>[12])", "hada_t", "loha", "", True),
    (r"lokr_w1", "lokr_w1", "lokr", "A", True),
    (r"lokr_w1_a", "lokr_w1_a", "lokr", "A", True),
    (r"lokr_w1_b", "lokr_w1_b", "lokr", "A", True),
    (r"lokr_w2", "lokr_w2", "lokr", "B", True),
    (r"lokr_w2_a", "lokr_w2_a", "lokr", "A", True),
    (r"lokr_w2_b", "lokr_w2_b", "lokr", "B", True),
    (r"lokr_t(?P<slot>[12])", "lokr_t", "lokr", "", True),
    (r"a1\.weight", "glora_a1", "glora", "A", True),
    (r"a2\.weight", "glora_a2", "glora", "B", True),
    (r"b1\.weight", "glora_b1", "glora", "A", True),
    (r"b2\.weight", "glora_b2", "glora", "B", True),
    (r"q_layer\.weight", "tlora_q", "tlora", "", True),
    (r"p_layer\.weight", "tlora_p", "tlora", "", True),
    (r"lambda_layer", "tlora_lambda", "tlora", "", True),
    (r"oft_blocks", "oft_blocks", "oft", "", True),
    (r"rescale", "oft_rescale", "oft", "", True),
    (r"dora_scale", "dora_scale", "dora", "", True),
    (r"w_norm", "norm_w", "norm", "", True),
    (r"b_norm", "norm_b", "norm", "", True),
    (r"scalar", "scalar", "scalar", "", True),
]
_LEAF_RES = [(re.compile(rf"(?:^|\.)(?:{pat})$"), kind, fam, fac, ad) for pat, kind, fam, fac, ad in _LEAVES]
# Module keys of LyCORIS / sd-scripts adapters start like this; a bare "weight" / "bias" leaf under
# such a key is LyCORIS algo=full (whole weight) or IA3 (a vector delta).
_ADAPTER_PREFIX = re.compile(r"^(?:lora|lycoris|oft|glora)_\w+$")


def classify(name: str, shape: Optional[Sequence[int]] = None) -> Role:
    """The role of one parameter from its full name (and its shape, to tell IA3 from full)."""
    for rx, kind, fam, fac, ad in _LEAF_RES:
        m = rx.search(name)
        if m is not None:
            module = name[: m.start()]
            slot = m.groupdict().get("slot") or ""
            return Role(kind, fam, module, slot, fac, ad)
    module, _, leaf = name.rpartition(".")
    if module and _ADAPTER_PREFIX.match(module) and leaf in ("weight", "bias"):
        dims = [d for d in (shape or ()) if d != 1]
        if leaf == "weight" and shape is not None and len(dims) <= 1:
            return Role("ia3", "ia3", module, "", "", True)
        return Role("full_" + leaf, "full", module, "", "", False)
    return Role("other", "other", module, "", "", False)


@dataclass
class Structure:
    """Roles of the flat parameter list of an optimizer and how the parameters pair up.

    roles:   aligned with the flat parameter list; None where a parameter has no name.
    pairs:   (A index, B index) LoRA-style factor pairs; B is the zero-initialised factor.
    kron:    LoKr modules as (w1-side indices, w2-side indices) for the Kronecker scale.
    modules: module key -> flat indices of its parameters.
    named:   False when no parameter had a name (the optimizer runs name-agnostic).
    """

    roles: list[Optional[Role]]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    kron: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    modules: dict[str, list[int]] = field(default_factory=dict)
    named: bool = False
    warnings: list[str] = field(default_factory=list)

    def partner_of(self) -> dict[int, int]:
        """B index -> A index and A index -> B index."""
        out: dict[int, int] = {}
        for a, b in self.pairs:
            out[a] = b
            out[b] = a
        return out

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.roles:
            key = r.kind if r is not None else "unnamed"
            c[key] = c.get(key, 0) + 1
        return c


# Pair rules inside one module: (A kind, B kind). Slots must match.
_PAIR_RULES = [
    ("lora_down", "lora_up"),
    ("lora_A", "lora_B"),
    ("down_list", "up_list"),
    ("hada_w2_b", "hada_w2_a"),
    ("lokr_w2_a", "lokr_w2_b"),
    ("glora_a1", "glora_a2"),
    ("glora_b1", "glora_b2"),
]


def _shares_rank(a: Sequence[int], b: Sequence[int]) -> bool:
    """Two factors of a product share their inner (rank) dimension."""
    return bool(set(a[:2]) & set(b[:2]))


def build_structure(names: Sequence[Optional[str]], shapes: Sequence[Sequence[int]]) -> Structure:
    """Classify and pair a flat list of parameters. O(n) in the number of parameters."""
    roles = [classify(n, s) if n is not None else None for n, s in zip(names, shapes)]
    st = Structure(roles=roles, named=any(r is not None for r in roles))
    by_module: dict[str, dict[tuple[str, str], int]] = {}
    for i, r in enumerate(roles):
        if r is None or not r.module:
            continue
        st.modules.setdefault(r.module, []).append(i)
        if r.kind == "other":  # plain weights and biases of a full fine-tune: nothing to pair
            continue
        slots = by_module.setdefault(r.module, {})
        if (r.kind, r.slot) in slots:
            st.warnings.append(f"duplicate parameter role {r.kind}{'.' + r.slot if r.slot else ''} in {r.module}")
            continue
        slots[(r.kind, r.slot)] = i
    for module, slots in by_module.items():
        for (kind, slot), ia in slots.items():
            for a_kind, b_kind in _PAIR_RULES:
                if kind != a_kind:
                    continue
                ib = slots.get((b_kind, slot))
                if ib is None:
                    continue
                if _shares_rank(shapes[ia], shapes[ib]):
                    st.pairs.append((ia, ib))
                else:
                    st.warnings.append(
                        f"{module}: {a_kind} {tuple(shapes[ia])} and {b_kind} {tuple(shapes[ib])} share no rank "
                        "dimension; not paired")
        w1 = tuple(slots[k] for k in (("lokr_w1", ""), ("lokr_w1_a", ""), ("lokr_w1_b", "")) if k in slots)
        w2 = tuple(slots[k] for k in (("lokr_w2", ""), ("lokr_w2_a", ""), ("lokr_w2_b", "")) if k in slots)
        if w1 and w2:
            st.kron.append((w1, w2))
            if ("lokr_w2", "") in slots:  # a full w2 is B to the w1 side's A (LoRA+ semantics)
                st.pairs.append((w1[0], slots[("lokr_w2", "")]))
    st.pairs.sort()
    for w in st.warnings:
        log.warning("hina_kohya roles: %s", w)
    return st


def group_names(group: dict, n_params: int) -> tuple[Optional[list[str]], Optional[str]]:
    """Names of a param group's params from ``param_names`` (torch-native) or ``named`` (the old
    fork's key). Returns (names or None, a problem description or None)."""
    for key in ("param_names", "named"):
        names = group.get(key)
        if names is None:
            continue
        names = list(names)
        if len(names) != n_params:
            return None, (
                f"param group key {key!r} has {len(names)} names for {n_params} parameters (flattened "
                "parameters, e.g. DeepSpeed ZeRO?)")
        if not all(isinstance(n, str) for n in names):
            return None, f"param group key {key!r} holds non-string entries"
        return names, None
    return None, None


def structure_of(param_groups: Sequence[dict],
                 known_shapes: Optional[Sequence[Sequence[tuple]]] = None) -> tuple[Structure, list[str]]:
    """Build the Structure of an optimizer's param groups; also return problems found.

    ``known_shapes[i]``: the shapes group ``i``'s tensors had when its names were first bound.
    A group whose tensors were swapped for others of different shapes under the same names (the
    one flat fp32 partition per group that DeepSpeed ZeRO 1/2 puts in place of the parameters)
    is reported and treated as unnamed."""
    names: list[Optional[str]] = []
    shapes: list[Sequence[int]] = []
    problems: list[str] = []
    for i, g in enumerate(param_groups):
        params = g["params"]
        group_shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else () for p in params]
        gn, problem = group_names(g, len(params))
        if gn is not None and known_shapes is not None and i < len(known_shapes) \
                and group_shapes != list(known_shapes[i]):
            gn, problem = None, (f"param group key 'param_names' names tensors of other shapes than the group now "
                                 f"holds ({_few_shapes(group_shapes)}; flattened parameters, e.g. DeepSpeed ZeRO?)")
        if problem:
            problems.append(f"group {i}: {problem}")
        names.extend(gn if gn is not None else [None] * len(params))
        shapes.extend(group_shapes)
    return build_structure(names, shapes), problems


def _few_shapes(shapes: Sequence[tuple], k: int = 2) -> str:
    shown = ", ".join(str(list(s)) for s in shapes[:k])
    return f"shapes {shown}{', ...' if len(shapes) > k else ''}"


# Kinds that are never weight-decayed (INTEGRATION.md §3.4): scales, norms, vector deltas and
# biases. Decay pulls towards zero, and for these zero is not "no change".
_NO_DECAY_KINDS = frozenset({"dora_scale", "norm_w", "norm_b", "oft_rescale", "tlora_lambda", "scalar", "ia3",
                             "full_bias"})


def decays(name: Optional[str], shape: Sequence[int], decay_full: bool = False,
           no_decay: Optional["re.Pattern[str]"] = None) -> bool:
    """Whether a parameter belongs in a weight-decay group (the wrappers' decay / no-decay split).

    No decay for: tensors of at most one dimension; the kinds in ``_NO_DECAY_KINDS``; LyCORIS
    ``algo=full`` whole weights (``decay_full=True`` allows it: decoupled decay would otherwise
    pull pretrained weights towards zero); unrecognised vector-shaped tensors (every dimension
    but one of size 1) and ``bias`` leaves; names matching the user's ``no_decay`` pattern
    (searched in the full name). Adapter factors decay, rank-1 factors included."""
    if len(shape) <= 1:
        return False
    if name is None:
        return True
    if no_decay is not None and no_decay.search(name):
        return False
    role = classify(name, shape)
    if role.kind in _NO_DECAY_KINDS:
        return False
    if role.kind == "full_weight":
        return decay_full
    if role.kind == "other":
        leaf = name.rpartition(".")[2]
        return leaf != "bias" and sum(d != 1 for d in shape) > 1
    return True


def component_of(names: Sequence[str]) -> Optional[str]:
    """"textencoder" or "unet" when every name has that sd-scripts / LyCORIS prefix (``lora_te*`` /
    ``lora_unet``), else None: the description sd-scripts would log a group's rate under."""
    if names and all(n.startswith("lora_te") for n in names):
        return "textencoder"
    if names and all(n.startswith("lora_unet") for n in names):
        return "unet"
    return None
