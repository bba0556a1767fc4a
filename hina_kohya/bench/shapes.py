"""Deterministic toy images for the demo's denoiser: coloured shapes on a plain background.

Every image is a function of one ``torch.Generator`` seed, so the pretraining set, the demo's
adaptation set and its held-out set are reproduced exactly anywhere (no download). Each image
has a *concept* (the shape) and a *colour* from a fixed palette; the denoiser is conditioned on
both (``denoiser.conditioning``).

The base denoiser is pretrained on ``BASE_CONCEPTS``. ``NEW_CONCEPT`` (a hollow ring) is never
shown to it: the demo's adapter has to learn it. A ring is the disc's outline -- related to what
the base knows (round, coloured, centred anywhere), but a different pixel pattern, which is what
an adapter for a new subject or style does in practice.

Shapes are drawn with soft (sigmoid) edges so that images are smooth functions of their
parameters. Output: ``[n, 3, size, size]`` float32 in ``[-1, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

BASE_CONCEPTS = ("disc", "square", "plus", "bars", "triangle")
NEW_CONCEPT = "ring"
CONCEPTS = BASE_CONCEPTS + (NEW_CONCEPT,)

#: RGB in [0, 1]
PALETTE = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.25),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "magenta": (0.85, 0.20, 0.80),
    "cyan": (0.10, 0.85, 0.90),
}
COLORS = tuple(PALETTE)


def _soft(x: Tensor, sharpness: float) -> Tensor:
    return torch.sigmoid(x * sharpness)


def _masks(concept: str, dx: Tensor, dy: Tensor, r: Tensor, phase: Tensor, sharp: float) -> Tensor:
    """Coverage in [0, 1] of one concept; ``dx, dy``: [n, s, s] offsets from each centre in
    pixels, ``r``: [n, 1, 1] radius, ``phase``: [n, 1, 1] in [0, 1)."""
    d = torch.sqrt(dx * dx + dy * dy)
    if concept == "disc":
        return _soft(r - d, sharp)
    if concept == "ring":
        width = torch.clamp(r * 0.3, min=1.2)
        return _soft(r - d, sharp) * _soft(d - (r - width), sharp)
    if concept == "square":
        return _soft(r * 0.85 - torch.maximum(dx.abs(), dy.abs()), sharp)
    if concept == "plus":
        arm = torch.clamp(r * 0.3, min=1.0)
        horizontal = _soft(arm - dy.abs(), sharp) * _soft(r - dx.abs(), sharp)
        vertical = _soft(arm - dx.abs(), sharp) * _soft(r - dy.abs(), sharp)
        return torch.maximum(horizontal, vertical)
    if concept == "bars":
        box = _soft(r - torch.maximum(dx.abs(), dy.abs()), sharp)
        stripes = _soft(torch.sin(2 * torch.pi * (dy / 4.0 + phase)), 4.0)
        return box * stripes
    if concept == "triangle":  # apex up at dy = -r, base at dy = 0.7 r
        return _soft(r * 0.7 - dy, sharp) * _soft((dy + r) * 0.6 - dx.abs(), sharp)
    raise ValueError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")


def render(concepts: list[str], colors: list[str], size: int, generator: torch.Generator) -> Tensor:
    """Images of the given concepts and colours (one each), at random positions, sizes and
    backgrounds drawn from ``generator``. Returns ``[n, 3, size, size]`` in [-1, 1]."""
    if len(concepts) != len(colors):
        raise ValueError(f"render: {len(concepts)} concepts but {len(colors)} colours; give one colour per image")
    n = len(concepts)
    u = torch.rand(n, 6, generator=generator)
    r = (0.22 + 0.16 * u[:, 0]) * size
    cx = r + (size - 2 * r) * u[:, 1]
    cy = r + (size - 2 * r) * u[:, 2]
    phase = u[:, 3]
    background = 0.1 + 0.25 * u[:, 4]  # a dark grey, never the shape's colour
    jitter = 0.9 + 0.2 * u[:, 5]  # brightness
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords.view(1, size, 1) - cy.view(n, 1, 1)
    dx = coords.view(1, 1, size) - cx.view(n, 1, 1)
    out = torch.empty(n, 3, size, size)
    for i, (concept, color) in enumerate(zip(concepts, colors)):
        if color not in PALETTE:
            raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")
        mask = _masks(concept, dx[i:i + 1], dy[i:i + 1], r[i].view(1, 1, 1), phase[i].view(1, 1, 1), 3.0)[0]
        rgb = torch.tensor(PALETTE[color]).view(3, 1, 1) * jitter[i]
        out[i] = background[i] * (1 - mask) + rgb.clamp(max=1.0) * mask
    return out * 2 - 1


def sample(concepts: tuple[str, ...], n: int, size: int, seed: int) -> tuple[Tensor, list[str], list[str]]:
    """``n`` images of concepts drawn uniformly from ``concepts`` and colours from the palette,
    all from ``seed``. Returns ``(images [n, 3, size, size], concept per image, colour per image)``."""
    g = torch.Generator().manual_seed(seed)
    ci = torch.randint(len(concepts), (n,), generator=g).tolist()
    ki = torch.randint(len(COLORS), (n,), generator=g).tolist()
    names = [concepts[i] for i in ci]
    colors = [COLORS[i] for i in ki]
    return render(names, colors, size, g), names, colors
