"""Parameter names and weight-decay groups for the optimizer (INTEGRATION.md §3.3-3.4).

sd-scripts and LyCORIS build optimizer groups as ``{"params": dict_values, "lr": ...}`` without
names, and decay every parameter alike. ``split_param_groups`` takes what a network's
``prepare_optimizer_params`` returned and gives each group a torch-native ``param_names`` list,
splits it into a decay group and a ``weight_decay = 0`` group (``roles.decays``), and keeps the
descriptions sd-scripts logs ``lr/<description>`` with aligned to the groups.

Plugin options come in ``--network_args`` (strings), prefixed ``hina_``:

* ``hina_wd_split`` (default true): split decay / no-decay groups;
* ``hina_no_decay``: a regular expression (``|`` for several) searched in full names: matches
  get no decay, in addition to the built-in rules;
* ``hina_decay_full`` (default false): decay LyCORIS ``algo=full`` whole weights too;
* ``hina_named_key`` (default false): also write the old fork's ``named`` key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import roles

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class GroupOptions:
    wd_split: bool = True
    no_decay: Optional["re.Pattern[str]"] = None
    decay_full: bool = False
    named_key: bool = False


_OPTION_KEYS = ("hina_wd_split", "hina_no_decay", "hina_decay_full", "hina_named_key")


def _flag(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"network_args {key}={value!r}: give true or false (also accepted: 1/0, yes/no).")


def pop_options(kwargs: dict) -> GroupOptions:
    """Remove the ``hina_*`` keys from a network module's keyword arguments and parse them;
    other keys are left for the wrapped module, untouched."""
    mine = {k: kwargs.pop(k) for k in list(kwargs) if isinstance(k, str) and k.startswith("hina_")}
    for key in mine:
        if key not in _OPTION_KEYS:
            close = difflib.get_close_matches(key, _OPTION_KEYS, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"network_args: unknown hina_kohya option {key!r}.{hint} "
                             f"Known: {', '.join(_OPTION_KEYS)}.")
    pattern = None
    raw = mine.get("hina_no_decay")
    if raw not in (None, ""):
        try:
            pattern = re.compile(str(raw))
        except re.error as exc:
            raise ValueError(f"network_args hina_no_decay={raw!r} is not a valid regular expression ({exc}); "
                             "escape dots as \\. and separate alternatives with |.") from None
    return GroupOptions(
        wd_split=_flag("hina_wd_split", mine["hina_wd_split"]) if "hina_wd_split" in mine else True,
        no_decay=pattern,
        decay_full=_flag("hina_decay_full", mine["hina_decay_full"]) if "hina_decay_full" in mine else False,
        named_key=_flag("hina_named_key", mine["hina_named_key"]) if "hina_named_key" in mine else False)


def parameter_names(network: Any) -> dict[int, str]:
    """id(parameter) -> full name ``<lora_name>.<parameter path>``, from the network's adapter
    modules (sd-scripts and LyCORIS keep them in ``text_encoder_loras`` / ``unet_loras``, OFT in
    ``unet_ofts``), over the network's own ``named_parameters()`` (equal after ``apply_to``)."""
    names = {id(p): n for n, p in network.named_parameters()}
    for attr in ("text_encoder_loras", "unet_loras", "unet_ofts"):
        for module in getattr(network, attr, None) or []:
            key = getattr(module, "lora_name", None) or getattr(module, "oft_name", None)
            if key:
                for n, p in module.named_parameters():
                    names[id(p)] = f"{key}.{n}"
    return names


def _label(names: list[str], index: int) -> str:
    return roles.component_of(names) or f"group{index}"


def split_param_groups(network: Any, groups: list, descriptions: Optional[list] = None,
                       options: GroupOptions = GroupOptions()) -> tuple[list[dict], list[str]]:
    """``_split`` for callers inside sd-scripts' ``prepare_optimizer_params``: never a TypeError,
    which sd-scripts would take for the legacy signature and retry the call with two arguments."""
    try:
        return _split(network, groups, descriptions, options)
    except TypeError as exc:
        raise RuntimeError(f"hina_kohya: naming the optimizer groups failed: {exc}") from exc


def _split(network: Any, groups: list, descriptions: Optional[list],
           options: GroupOptions) -> tuple[list[dict], list[str]]:
    """Named, decay-split groups and descriptions aligned with them (always a 2-tuple; same
    input, same output). A group's decay part keeps its description and inherits the optimizer's
    ``weight_decay``; its no-decay part follows it, described ``<description> no_decay``, with
    ``weight_decay = 0.0``. Empty parts are dropped."""
    names_by_id = parameter_names(network)
    if groups and all(isinstance(g, torch.Tensor) for g in groups):  # torch's flat form: one group
        groups = [{"params": list(groups)}]
    out_groups: list[dict] = []
    out_desc: list[str] = []
    for gi, group in enumerate(groups):
        group = group if isinstance(group, dict) else {"params": [group] if isinstance(group, torch.Tensor) else group}
        params = list(group["params"])
        names = [names_by_id.get(id(p), f"unnamed_group{gi}.param{j}") for j, p in enumerate(params)]
        desc = descriptions[gi] if descriptions is not None and gi < len(descriptions) else None
        desc = desc if desc is not None else _label(names, gi)
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names", "named")}
        if options.wd_split:
            keep = [roles.decays(n, tuple(p.shape), options.decay_full, options.no_decay) for n, p in zip(names, params)]
        else:
            keep = [True] * len(params)
        for part, suffix, extra in ((True, "", {}), (False, " no_decay", {"weight_decay": 0.0})):
            idx = [j for j, k in enumerate(keep) if k is part]
            if not idx:
                continue
            new = {**rest, **extra, "params": [params[j] for j in idx], "param_names": [names[j] for j in idx]}
            if options.named_key:
                new["named"] = list(new["param_names"])
            out_groups.append(new)
            out_desc.append(desc + suffix)
    return out_groups, out_desc
