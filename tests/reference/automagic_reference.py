"""Float64 single-tensor reference of the Automagic_CameAMP family, written from the formulas in
the transforms' docstrings and ALGORITHMS.md (CAME: Luo et al. 2023; ALLoRA; Automagic lr masks;
TAM; SPD), one plain function per technique, no engine code. Used by tests/test_automagic.py."""

from __future__ import annotations

import math

import torch


def rows_of(p):
    return p.shape[0] if p.dim() >= 2 else 1


def ortho(g, p):
    w, f = p.reshape(-1), g.reshape(-1)
    perp = f - (w @ f) / (w @ w + 1e-30) * w
    return (perp * (f.norm() / (perp.norm() + 1e-30))).reshape(g.shape)


def agr(g):
    return g * (1 - g.abs() / g.abs().sum().clamp_min(1e-30))


def factored(st, key, q, beta, t):
    r = st.setdefault(key + "_r", torch.zeros(q.shape[0], dtype=q.dtype))
    c = st.setdefault(key + "_c", torch.zeros(q.shape[1], dtype=q.dtype))
    r.mul_(beta).add_((1 - beta) * q.mean(1))
    c.mul_(beta).add_((1 - beta) * q.mean(0))
    return torch.outer(r / r.mean(), c) / (1 - beta ** t)


def cap(u, thr):
    return u / max(1.0, float(u.pow(2).mean().sqrt()) / thr)


def awd_factors(grads):
    n = sum(g.numel() for g in grads)
    mean = sum(float(g.abs().sum()) for g in grads) / n
    std = math.sqrt(max(sum(float((g * g).sum()) for g in grads) / n - mean ** 2, 0.0))
    return [2 / (1 + math.exp(-4 * (float(g.abs().mean()) - mean) / max(std, 1e-30))) for g in grads]


def step(p, g, st, hp, t, lr0, recipe="C", rate=1.0, awd_k=1.0, adapter=True, b_factor=False):
    """One step of one tensor in place; ``st`` is this tensor's reference state. ``b_factor``: the
    zero-initialised factor of an adapter product (not projected by the orthogonal gradient)."""
    b1, b2, b3 = hp["betas"]
    e1, e2 = hp["eps"][0], hp["eps"][1]
    half, W = hp["warmup_steps"] / 2, hp["warmup_steps"]
    early = t < half
    if early and not b_factor:
        g = ortho(g, p)
    g = agr(g)
    rows = rows_of(p)
    G = g.reshape(rows, -1)
    if hp["came"]:
        v = factored(st, "v", G * G + e1, b2, t)
        n = cap(G / v.sqrt(), hp["clip_threshold"])
    else:
        n = G.clamp(-t ** 0.25, t ** 0.25)
    m = st.setdefault("m", torch.zeros_like(n))
    inp = n
    if True:  # TAM statistics run always; its damping only in the early warm-up
        mn = m.norm()
        cos = float((m * n).sum() / (mn * n.norm()).clamp_min(1e-30)) if mn > 0 else 1.0
        st["s"] = st.get("s", 0.0) * hp["tam_beta"] + cos * (1 - hp["tam_beta"])
        if early:
            inp = n * (1 + st["s"] / (1 - hp["tam_beta"] ** t)) / 2
    beta = max(b1 * hp["beta1_decay"] ** t, 0.4)
    m.mul_(beta).add_((1 - beta) * inp)
    mom = m
    if recipe == "I" and hp["enable_dual_momentum"]:
        lb, a = hp["long_term_beta"], hp["alpha_mix_ratio"]
        L = st.setdefault("L", torch.zeros_like(n))
        L.mul_(lb).add_((1 - lb) * inp)
        mom = (1 - a) * m + a * L / (1 - lb ** t)
    s = factored(st, "r", (n - mom) ** 2 + e2, b3, t)
    u = cap(mom / s.sqrt(), hp["clip_threshold"])
    upd_scale = 1.0
    if recipe == "I":
        if early:
            u = u.abs() * n.sign()
        else:
            phi = (u * n > 0).double()
            u = u * phi
            upd_scale = u.numel() / (float(phi.sum()) + 1)
    else:
        a = hp["grams_decay"] ** t
        u = a * u.abs() * n.sign() + (1 - a) * u
        if hp["weight_decay"] > 0:
            u = u + hp["weight_decay"] * awd_k * p.reshape(rows, -1)
    if not hp["full_finetune"] and p.dim() >= 2 and adapter:
        rho = 1 / (p.reshape(rows, -1).pow(2).sum(1) + 1 / hp["eta"] ** 2).sqrt()
        u = u * rho[:, None]
    # lr mask: magnitude in units of max_lr, polarity kept separately here
    mag = st.setdefault("mask", torch.full_like(n, min(max(lr0, hp["min_lr"]), hp["max_lr"]) / hp["max_lr"]))
    pol = st.setdefault("pol", torch.ones_like(n, dtype=torch.bool))
    pos = n > 0
    if 1 < t <= W:
        bump = hp["lr_bump"] / hp["max_lr"]
        up = down = bump
        if recipe == "I":
            c = float(-(n * p.reshape(rows, -1)).sum())
            up = bump * (hp["d_coef"] if early and c > 0 else 1.0)
            down = bump * (hp["d_coef"] if early and c < 0 else 1.0)
        mag.copy_(torch.where(pol == pos, mag + up, mag - down).clamp(hp["min_lr"] / hp["max_lr"], 1.0))
    if t <= W:
        pol.copy_(pos)
    lr = hp["lr"] * rate
    step_ = lr * u * upd_scale * mag * (hp["max_lr"] / lr0)
    if recipe == "I":
        new = p.reshape(rows, -1) - step_
        if t < W:
            anchor = torch.zeros_like(new) if adapter else st.setdefault("anchor", p.reshape(rows, -1).clone())
            c = float(-(n * (p.reshape(rows, -1) - anchor)).sum())
            prev = float((p.reshape(rows, -1) - anchor).norm())
            dev = new - anchor
            gamma = float(dev.norm())
            r = max(0.0, gamma - prev) / max(gamma, 1e-30)
            if c < 0:
                new = new - hp["weight_decay"] * r * dev
        p.copy_(new.reshape(p.shape))
    else:
        p.sub_(step_.reshape(p.shape))


class ContextReference:
    """C-Optim's multiplier with Python floats and lists (transforms/context.py's docstring)."""

    def __init__(self, window=50, edge_threshold=0.9, adaptation_rate=0.1):
        self.window, self.edge, self.rate = window, edge_threshold, adaptation_rate
        self.hist, self.ema, self.w = [], [0.0] * 4, [0.0] * 4
        self.stagnant, self.mult, self.count = 0, 1.0, 0

    def update(self, s):
        self.hist = (self.hist + [s])[-self.window:]
        self.count += 1
        mean = sum(self.hist) / len(self.hist)
        std = math.sqrt(sum((h - mean) ** 2 for h in self.hist) / len(self.hist))
        cv = std / max(abs(mean), 1e-30)
        for i, k in enumerate((1, 5, 20, 100)):
            self.ema[i] = self.ema[i] * (1 - 1 / k) + s / k
            self.w[i] = self.w[i] * (1 - 1 / k) + 1 / k
        e5, e20 = self.ema[1] / self.w[1], self.ema[2] / self.w[2]
        trend = (e20 - e5) / max(abs(e20), 1e-30)
        self.stagnant = self.stagnant + 1 if abs(trend) < 1e-4 else 0
        edge = self.count >= 10 and cv > self.edge
        target = (min(max(1 + 4 * trend, 0.8), 2.0) * (1 + 0.3 * min(max((self.stagnant - 15) / 15, 0.0), 1.0))
                  * ((0.6 + 0.4 * math.exp(-cv)) if edge else 1.0))
        target = min(max(target, 0.5), 3.0) if self.count >= 5 else 1.0
        self.mult += self.rate * (target - self.mult)
        return self.mult
