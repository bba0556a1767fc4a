"""Report builders shared by recipes. Called on request (never inside ``step()``); they may read
values back from the device. Keys follow the originals' documented diagnostics (ALGORITHMS.md
§3.1-3.2) so existing scripts keep working; values are plain Python numbers, lists and dicts."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .roles import Role


def _names(opt) -> list[Optional[str]]:
    out: list[Optional[str]] = []
    for g in opt.param_groups:
        n = len(g["params"])
        names = g.get("param_names") or g.get("named")
        out.extend(list(names) if names is not None and len(names) == n else [None] * n)
    return out


def role_counts(opt) -> dict[str, Any]:
    st = opt.structure
    roles: list[Optional[Role]] = st.roles
    kinds = [r.kind if r is not None else None for r in roles]

    def count(*ks: str) -> int:
        return sum(1 for k in kinds if k in ks)

    lora_pairs = sum(1 for a, b in st.pairs if roles[a] is not None and roles[a].family == "lora")
    lokr_modules = {r.module for r in roles if r is not None and r.family == "lokr"}
    norm_modules_w = {r.module for r in roles if r is not None and r.kind == "norm_w"}
    norm_modules_b = {r.module for r in roles if r is not None and r.kind == "norm_b"}
    return {
        "lora_stats": {"lora_a_params": count("lora_down", "lora_A"), "lora_b_params": count("lora_up", "lora_B"),
                       "lora_pairs": lora_pairs},
        "lokr_stats": {"lokr_w1_params": count("lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                       "lokr_w2_params": count("lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                       "lokr_pairs": len(st.kron), "lokr_groups": len(lokr_modules),
                       "w_norm_params": count("norm_w"), "b_norm_params": count("norm_b"),
                       "norm_pairs": len(norm_modules_w & norm_modules_b)},
        "names_provided": st.named,
    }


def names_note(opt) -> Optional[str]:
    if opt.structure.named:
        return None
    return ("parameter names were not provided: LoRA/LoKr-aware features (LoRA+ ratio, LoKr scale, zero SPD "
            "anchors for adapters) are off. With sd-scripts use a hina_kohya.networks module, or pass param groups "
            "with 'param_names'.")


def lora_pairing(opt) -> dict[str, Any]:
    st = opt.structure
    names = _names(opt)
    partner = st.partner_of()
    out: dict[str, Any] = {"total_groups": len(opt.param_groups), "groups": {}}
    flat = 0
    for gi, g in enumerate(opt.param_groups):
        details, unpaired_a, unpaired_b = [], [], []
        a_count = b_count = pairs = 0
        for p in g["params"]:
            role = st.roles[flat]
            name = names[flat] or f"param_{flat}"
            kind = role.kind if role is not None else "unknown"
            paired = flat in partner
            other = partner.get(flat)
            details.append({"name": name, "type": kind, "shape": list(p.shape), "is_paired": paired,
                            "paired_with": (names[other] or f"param_{other}") if other is not None else None})
            if role is not None and role.factor == "A" and role.family in ("lora", "dylora", "loha", "glora", "lokr"):
                a_count += 1
                pairs += int(paired and st.roles[other].is_b)
                if not paired:
                    unpaired_a.append({"name": name, "shape": list(p.shape)})
            if role is not None and role.is_b:
                b_count += 1
                if not paired:
                    unpaired_b.append({"name": name, "shape": list(p.shape)})
            flat += 1
        out["groups"][f"group_{gi}"] = {"lora_a_count": a_count, "lora_b_count": b_count, "pairs_count": pairs,
                                        "unpaired_a": unpaired_a, "unpaired_b": unpaired_b,
                                        "parameter_details": details}
    return out


def global_step(opt) -> int:
    steps = [st.get("step", 0) for st in opt.state.values()]
    return int(max(steps)) if steps else 0


def importance_analysis(opt) -> dict[str, Any]:
    values = [float(st["importance"]) for st in opt.state.values() if "importance" in st]
    if not values:
        return {"message": "no importance scores yet: they are created at the first step of each parameter"}
    t = torch.tensor(values)
    mean = float(t.mean())
    return {"total_parameters": len(values),
            "importance_statistics": {"mean": mean, "max": float(t.max()), "min": float(t.min()),
                                      "std": float(t.std(unbiased=False))},
            "high_importance_params": int((t > 1.5 * mean).sum()),
            "low_importance_params": int((t < 0.5 * mean).sum())}


def lr_mask_rows(opt) -> list[dict[str, Any]]:
    """Per parameter with a mask: the element rates L (absolute) and their scale L / lr0."""
    rows = []
    for g in opt.param_groups:
        lr0 = float(g.get("initial_lr", g.get("hina_lr0", g["lr"])))
        for p, stored in opt.stored_lr_rates(g):  # per element, or per tensor / group
            rate = stored.float().abs() * g["max_lr"]
            start = min(max(lr0, g["min_lr"]), g["max_lr"])
            rows.append({"p": p, "group": g, "rate": rate, "scale": rate / lr0, "start": start,
                         "step": opt.state[p]["step"]})
    return rows
