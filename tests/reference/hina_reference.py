"""Straight-from-the-paper reference of the Hina recipes, one tensor at a time, float64.

Written from the formulas (ALGORITHMS.md and the papers cited in hina_kohya/transforms), not from
the package's code, so that the optimizers can be checked against it.
"""

from __future__ import annotations

import math

import torch

TINY = 1e-30


def orthograd(w, g):
    w, gf = w.reshape(-1), g.reshape(-1)
    perp = gf - (w @ gf) / (w @ w + TINY) * w
    return (perp * gf.norm() / (perp.norm() + TINY)).view_as(g)


def agr(g):
    return g * (1 - g.abs() / max(g.abs().sum().item(), TINY))


def cautious(u, g):
    phi = (u * g > 0).double()
    return u * phi * u.numel() / (phi.sum().item() + 1)


def grams(u, g):
    return u.abs() * torch.sign(g)


def dynamic_wd(t, T, factor, floor):
    return 1.0 if t <= T else max(floor, factor ** ((t - T) / T))


def kron_factor(tensors):
    if len(tensors) == 1:
        return tensors[0]
    a, c = tensors[0].reshape(tensors[0].shape[0], -1), tensors[1].reshape(tensors[1].shape[0], -1)
    return a @ c if a.shape[1] == c.shape[0] else a.T @ c


class ReferenceHina:
    """HinaAdamW (adaptive=False) or AdaptiveHinaAdamW (adaptive=True, without importance) over a
    flat list of params with optional roles/pairs. One param group, float64."""

    def __init__(self, params, hp, roles=None, pairs=(), kron=(), adaptive=False):
        self.params = params
        self.hp = hp
        self.roles = roles or [None] * len(params)
        self.b_of_pair = {b for _, b in pairs}
        self.kron = list(kron)
        self.adaptive = adaptive
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.s = [0.0 for _ in params]
        self.anchor = [None if (r is not None and r.adapter) else p.detach().clone() for p, r in zip(params, self.roles)]
        lr0 = hp["lr"]
        start = min(max(lr0, hp.get("min_lr", 0)), hp.get("max_lr", 1)) if adaptive else 0
        self.L = [torch.full_like(p, start) for p in params]
        self.pol = [None for _ in params]

    def lokr_scales(self):
        out = {}
        for w1, w2 in self.kron:
            n1 = kron_factor([self.params[i].detach() for i in w1]).norm().item()
            n2 = kron_factor([self.params[i].detach() for i in w2]).norm().item()
            for i in w1 + w2:
                out[i] = 1.0 / (1.0 + 0.3 * n1 * n2)
        return out

    @torch.no_grad()
    def step(self):
        hp = self.hp
        self.t += 1
        t = self.t
        b1, b2 = hp["betas"]
        lokr = self.lokr_scales() if hp.get("use_alora") else {}
        for i, p in enumerate(self.params):
            g = p.grad.clone()
            if hp["use_orthogonal_grad"] and not (self.roles[i] is not None and self.roles[i].is_b):
                g = orthograd(p, g)  # zero-initialised adapter factors are left alone
            if hp["use_agr"]:
                g = agr(g)
            m_in = g
            if hp["use_tam"]:
                beta = hp["tam_beta"]
                mn = self.m[i].norm().item()
                cos = (self.m[i].reshape(-1) @ g.reshape(-1)).item() / max(mn * g.norm().item(), TINY) if mn > 0 else 1.0
                self.s[i] = beta * self.s[i] + (1 - beta) * cos
                m_in = g * (1 + self.s[i] / (1 - beta ** t)) / 2
            if hp["use_adopt_stability"]:
                # element by element: v starts at the element's first non-zero gradient, with no
                # update (at step 1 that is every element with a gradient: the paper's rule)
                m, v = self.m[i].reshape(-1).clone(), self.v[i].reshape(-1).clone()
                for e, (ge, me) in enumerate(zip(g.reshape(-1).tolist(), m_in.reshape(-1).tolist())):
                    if v[e] == 0:
                        v[e] = ge * ge
                        m[e] = b1 * m[e]
                    else:
                        c = t ** 0.25
                        n = min(max(me / max(math.sqrt(v[e]), hp["eps"]), -c), c)
                        m[e] = b1 * m[e] + (1 - b1) * n
                        v[e] = b2 * v[e] + (1 - b2) * ge * ge
                self.m[i], self.v[i] = m.reshape(g.shape), v.reshape(g.shape)
                u = self.m[i].clone()
            else:
                self.m[i] = b1 * self.m[i] + (1 - b1) * m_in
                self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
                u = (self.m[i] / (1 - b1 ** t)) / ((self.v[i] / (1 - b2 ** t)).sqrt() + hp["eps"])
            if hp["use_cautious"]:
                u = cautious(u, g)
            if hp["use_grams"]:
                u = grams(u, g)
            scale = 1.0
            if hp.get("use_alora"):
                if i in self.b_of_pair:
                    scale *= hp["alora_ratio"]
                scale *= lokr.get(i, 1.0)
            rate = hp["lr"] * scale
            if self.adaptive and hp["use_lr_mask"]:
                positive = g > 0
                if 1 < t <= hp["warmup_steps"]:
                    agree = positive == self.pol[i]
                    bump = hp["lr_bump"]
                    self.L[i] = torch.where(agree, self.L[i] + bump, self.L[i] - bump).clamp(hp["min_lr"], hp["max_lr"])
                if t <= hp["warmup_steps"]:
                    self.pol[i] = positive
                rate = self.L[i] * scale  # group lr == lr0 here (no scheduler)
            wd_mult = 1.0
            role = self.roles[i]
            if hp["dynamic_weight_decay"] and (self.adaptive or role is None or role.adapter):
                wd_mult = dynamic_wd(t, hp["wd_transition_steps"], hp["wd_decay_factor"], hp["wd_min_ratio"])
            theta = p.detach().clone()
            new = theta * (1 - hp["lr"] * scale * hp["weight_decay"] * wd_mult) - rate * u
            if hp["use_spd"]:
                anchor = self.anchor[i] if self.anchor[i] is not None else torch.zeros_like(theta)
                c = -(g * (theta - anchor)).sum().item()
                if c < 0:
                    gamma, prev = (new - anchor).norm().item(), (theta - anchor).norm().item()
                    r = max(0.0, gamma - prev) / max(gamma, TINY)
                    new = new - hp["spd_lambda"] * r * (new - anchor)
            p.copy_(new)


def importance_contributions(params, history, n0, importance, decay, keep=5):
    """AdaptiveHinaAdamW's importance after one refresh, per parameter (ALGORITHMS.md §2.22, with
    every group scored). Uses the raw gradient; updates the caller's history/n0/importance dicts."""
    out = {}
    for p in params:
        key = id(p)
        g, w = p.grad.detach(), p.detach()
        gn = g.norm().item()
        hist = history.setdefault(key, [])
        hist.append(gn)
        recent = hist[-keep:]
        if len(recent) > 1:
            t = torch.tensor(recent, dtype=torch.float64)
            consistency = max(0.1, 1 - (t.std(unbiased=True) / max(t.mean().item(), 1e-30)).item())
        else:
            consistency = 1.0
        pn = w.norm().item()
        if key not in n0:
            n0[key] = pn
        change = abs(pn - n0[key]) / max(n0[key], 1e-30)
        intrinsic = w.var(unbiased=False).item() * (1 - (w.abs() < 1e-6).double().mean().item())
        contribution = max(0.01, 0.4 * gn * consistency + 0.3 * change + 0.3 * intrinsic)
        importance[key] = importance.get(key, 1.0) * decay + (1 - decay) * contribution
        out[key] = importance[key]
    return out
