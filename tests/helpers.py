"""Small models and builders shared by the tests."""

from __future__ import annotations

import io
from typing import Optional

import torch
from torch import nn

from hina_kohya import HinaAdamW

TECHNIQUES_OFF = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
                      use_grams=False, use_agr=False, use_tam=False, use_alora=False, dynamic_weight_decay=False)


def plain_hina(params, **kw) -> HinaAdamW:
    return HinaAdamW(params, **{**TECHNIQUES_OFF, **kw})


class LoRALinear(nn.Module):
    """A frozen base weight plus a LoRA delta (up @ down), named like sd-scripts."""

    def __init__(self, d_in: int, d_out: int, rank: int, gen: torch.Generator, dtype=torch.float32):
        super().__init__()
        self.base = torch.randn(d_out, d_in, generator=gen, dtype=dtype) / d_in ** 0.5
        self.lora_down = nn.Linear(d_in, rank, bias=False, dtype=dtype)
        self.lora_up = nn.Linear(rank, d_out, bias=False, dtype=dtype)
        with torch.no_grad():
            self.lora_down.weight.copy_(torch.randn(rank, d_in, generator=gen, dtype=dtype) / d_in ** 0.5)
            # non-zero B so that both factors get gradients from step 1 in short tests
            self.lora_up.weight.copy_(torch.randn(d_out, rank, generator=gen, dtype=dtype) * 0.01)

    def forward(self, x):
        return x @ self.base.T + self.lora_up(self.lora_down(x))


class TinyLoRANet(nn.Module):
    """Three LoRA'd linears and a norm-like vector: LoRA-shaped, with real names."""

    def __init__(self, seed: int = 0, dtype=torch.float32, dims=(16, 32, 24, 8), rank: int = 4):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(LoRALinear(a, b, rank, gen, dtype) for a, b in zip(dims[:-1], dims[1:]))
        self.scale = nn.Parameter(torch.ones(dims[-1], dtype=dtype))
        self.dims = dims
        self.dtype = dtype

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x * self.scale

    def named_trainable(self):
        """sd-scripts style names: '<lora_name>.<leaf>'."""
        out = []
        for i, layer in enumerate(self.layers):
            out.append((f"lora_unet_layer_{i}.lora_down.weight", layer.lora_down.weight))
            out.append((f"lora_unet_layer_{i}.lora_up.weight", layer.lora_up.weight))
        out.append(("lora_unet_out.dora_scale", self.scale))
        return out

    def groups(self, named: bool = True, lrs=(1e-2, 5e-3), wds=(1e-2, 0.0)):
        """Two param groups (down factors / the rest) with their own lr and weight decay."""
        nt = self.named_trainable()
        g0 = [(n, p) for n, p in nt if "lora_down" in n]
        g1 = [(n, p) for n, p in nt if "lora_down" not in n]
        groups = []
        for items, lr, wd in ((g0, lrs[0], wds[0]), (g1, lrs[1], wds[1])):
            g = {"params": [p for _, p in items], "lr": lr, "weight_decay": wd}
            if named:
                g["param_names"] = [n for n, _ in items]
            groups.append(g)
        return groups


def batch(step: int, dims, dtype=torch.float32, n: int = 32):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, dims[0], generator=gen, dtype=dtype)
    y = torch.sin(x[:, : dims[-1]] * 1.5) if dims[0] >= dims[-1] else torch.randn(n, dims[-1], generator=gen, dtype=dtype)
    return x, y


def train(model: TinyLoRANet, opt, steps: int, start: int = 0, scheduler=None) -> list[float]:
    losses = []
    for s in range(start, start + steps):
        x, y = batch(s, model.dims, model.dtype)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def roundtrip(sd: dict) -> dict:
    """torch.save then torch.load(weights_only=True), as accelerate resumes a checkpoint."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_resume_exact(make_opt, seed: int, steps: int, split: int) -> dict:
    """Train ``steps`` steps uninterrupted, and ``split`` + save/load + the rest on a twin model;
    the parameters must be bit-identical. Returns the saved state dict."""
    full = TinyLoRANet(seed)
    train(full, make_opt(full.groups()), steps)
    part = TinyLoRANet(seed)
    opt = make_opt(part.groups())
    train(part, opt, split)
    sd = roundtrip(opt.state_dict())
    resumed = make_opt(part.groups())
    resumed.load_state_dict(sd)
    train(part, resumed, steps - split, start=split)
    for a, b in zip(params_of(full), params_of(part)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    return sd


#: the opt-in heuristics of the Automagic family (ALGORITHMS.md §2.26), on
OPT_IN = dict(edge_suppression=True, background_regularization=True, spatial_awareness=True, frequency_penalty=0.05,
              lora_rank_penalty=True)


def accepted_by(cls: type, settings: dict) -> dict:
    """The entries of ``settings`` that ``cls``'s constructor accepts (schedules such as
    ``warmup_steps`` or ``max_lr`` exist in some recipes only)."""
    from hina_kohya.args import signature_defaults

    accepted = signature_defaults(cls)
    return {k: v for k, v in settings.items() if k in accepted}


def every_technique(cls: type, if_accepted: Optional[dict] = None, **kw) -> dict:
    """Constructor keywords that switch on every technique ``cls`` has: each technique switch
    (``bench.ablate.SWITCHES``) and each opt-in heuristic it accepts; then the entries of
    ``if_accepted`` that it accepts, and ``kw``."""
    from hina_kohya.bench.ablate import SWITCHES

    on = accepted_by(cls, {**{name: True for name in SWITCHES}, **OPT_IN, **(if_accepted or {})})
    return {**on, **kw}
