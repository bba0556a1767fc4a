"""The regression tasks: an adapter learns a known adapter's change to a frozen network.

A teacher-student task whose optimum is reachable, so the final loss measures how *precisely* an
optimizer converges, not only how fast it starts (the other tasks are judged on held-out data whose
optimum is unknown and far above zero):

* the frozen base (``Base``): a residual MLP, ``BLOCKS`` blocks of Linear(64, 128) - GELU -
  Linear(128, 64) and a linear read-out, initialised from a fixed seed;
* the teacher: the base with a LyCORIS adapter (``NETWORKS``) whose factors are all drawn at random
  (none zero; ``TEACHER_SCALE``), from a fixed seed;
* the student: the base with the same adapter as LyCORIS initialises it (one factor zero, so it
  starts as the base), trained on the teacher's outputs for Gaussian inputs (a fixed training set
  of ``N_TRAIN`` inputs; held-out and validation sets of ``N_EVAL`` others).

The student can represent the teacher exactly, so the loss can go to zero. The loss is the mean
squared error to the teacher's outputs divided by the base's (the student's starting loss): 1.0 at
step 0, the fraction of the adapter's effect still missing after it.

Adapters, made by LyCORIS' own network class over every linear layer of the blocks (names
``lycoris_<block>_<layer>.<leaf>``, as in a LyCORIS file):

* ``lora``: LoRA dim 8, alpha 8 (``lora_down`` random, ``lora_up`` zero);
* ``lokr``: LoKr dim 8, factor 4 in the split layout: ``lokr_w1`` (4 x 4) and ``lokr_w2_a`` /
  ``lokr_w2_b`` (w2 = w2_a @ w2_b, w2_b zero), the layout LyCORIS picks when the rank is small for
  the layer;
* ``lokr-full``: the same with LyCORIS' ``full_matrix``: ``lokr_w1`` and a whole ``lokr_w2`` (zero).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .loop import RunResult, decay_split_groups, fit

WIDTH, BLOCKS, OUTPUTS = 64, 3, 32
N_TRAIN, N_EVAL = 4096, 1024
BASE_SEED, TEACHER_SEED = 1234, 4321
#: the teacher's factors are N(0, TEACHER_SCALE**2 / fan_in): a change to the base of the size a
#: fine-tune makes (at 1.0 the task turns into a hard non-convex fit that no optimizer finishes)
TEACHER_SCALE = 0.5

_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")

#: algo -> LyCORIS arguments (``create_lycoris`` keywords; linear_dim and linear_alpha as dim / alpha)
NETWORKS = {
    "lora": dict(algo="lora", dim=8, alpha=8.0),
    "lokr": dict(algo="lokr", dim=8, alpha=8.0, factor=4),
    "lokr-full": dict(algo="lokr", dim=8, alpha=8.0, factor=4, full_matrix=True),
}


class Block(nn.Module):
    """A residual MLP block; LyCORIS adapts the linear layers of modules of this class."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class Base(nn.Module):
    """The frozen network: ``BLOCKS`` blocks of ``WIDTH``, then a linear read-out to ``OUTPUTS``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(WIDTH) for _ in range(BLOCKS)))
        self.head = nn.Linear(WIDTH, OUTPUTS)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(x))


def load_base() -> Base:
    """The frozen base network, the same in every run (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        base = Base()
    return base.requires_grad_(False).eval()


def make_network(model: nn.Module, algo: str, seed: int):
    """The LyCORIS network of ``algo`` (``NETWORKS``) over ``model``'s blocks, applied, initialised
    from ``seed`` as LyCORIS initialises it."""
    if algo not in NETWORKS:
        raise ValueError(f"unknown adapter {algo!r} for the regression tasks; choose one of {', '.join(NETWORKS)}")
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    args = dict(NETWORKS[algo])
    dim, alpha = args.pop("dim"), args.pop("alpha")
    lycoris_log = logging.getLogger("LyCORIS")
    level = lycoris_log.level
    # create_lycoris sets its preset on LycorisNetwork's class attributes: put them back afterwards
    saved = {key: getattr(LycorisNetwork, key) for key in _PRESET_ATTRS if hasattr(LycorisNetwork, key)}
    lycoris_log.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # every linear layer of the blocks (the read-out stays as it is)
            network = create_lycoris(model.blocks, 1.0, dim, alpha, preset="full", **args)
        network.apply_to()
    finally:
        lycoris_log.setLevel(level)
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    return network


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class RegressionData:
    train: Split
    heldout: Split
    validation: Split
    scale: float          # the base's mean squared error to the teacher: the losses are divided by it


def make_teacher(base: Base, algo: str) -> tuple[Base, object]:
    """The teacher: a copy of ``base`` with ``algo``'s adapter, every factor drawn at random
    (N(0, TEACHER_SCALE**2 / fan_in)). Returns (the teacher model, its LyCORIS network)."""
    teacher = copy.deepcopy(base)
    network = make_network(teacher, algo, TEACHER_SEED)
    g = torch.Generator().manual_seed(TEACHER_SEED)
    with torch.no_grad():
        for _, p in network.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) * (TEACHER_SCALE / math.sqrt(fan_in)))
    return teacher, network


def make_data(base: Base, algo: str) -> RegressionData:
    """Inputs and the teacher's outputs for ``algo``'s adapter (``make_teacher``)."""
    teacher, _ = make_teacher(base, algo)
    g = torch.Generator().manual_seed(TEACHER_SEED + 1)
    xs = torch.randn(N_TRAIN + 2 * N_EVAL, WIDTH, generator=g)
    with torch.no_grad():
        ys, y0 = teacher(xs), base(xs)
    scale = float((ys[N_TRAIN:] - y0[N_TRAIN:]).square().mean())
    parts = (slice(0, N_TRAIN), slice(N_TRAIN, N_TRAIN + N_EVAL), slice(N_TRAIN + N_EVAL, None))
    train, heldout, validation = (Split(xs[s], ys[s]) for s in parts)
    return RegressionData(train, heldout, validation, scale)


def run_once(base: Base, algo: str, seed: int, make_optimizer: Callable, lr: float, data: RegressionData,
             steps: int, batch: int, label: str, eval_every: int, device: torch.device,
             progress: Callable[[int, float], None] = lambda s, l: None,
             validation: bool = False) -> tuple[RunResult, nn.Module]:
    """One run on a copy of ``base``: the ``algo`` adapter from ``seed`` (as LyCORIS initialises
    it), named decay-split groups at ``lr``, ``make_optimizer(groups)``, mini-batches of ``batch``
    training inputs drawn from the run's generator. Returns ``(RunResult, the network)``, as
    ``adapter_task.run_once`` does."""
    from .adapter_task import digest

    model = copy.deepcopy(base).to(device)
    network = make_network(model, algo, seed).to(device)
    named = list(network.named_parameters())
    optimizer = make_optimizer(decay_split_groups(named, lr))
    splits = {"heldout": data.heldout.to(device), "validation": data.validation.to(device)}
    train = data.train.to(device)

    def next_loss(g: torch.Generator) -> Tensor:
        idx = torch.randint(train.x.shape[0], (batch,), generator=g).to(device)
        return (model(train.x[idx]) - train.y[idx]).square().mean() / data.scale

    @torch.no_grad()
    def evaluate(split: str) -> float:
        s = splits[split]
        return float((model(s.x) - s.y).square().mean()) / data.scale

    return fit([p for _, p in named], optimizer, next_loss, evaluate, steps, seed, label, eval_every, device,
               progress, validation, set_mode=network.train, init_digest=digest(network)), network
