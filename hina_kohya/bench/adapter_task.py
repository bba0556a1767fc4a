"""The adapter task: teach the pretrained demo denoiser a new concept with a LyCORIS adapter.

Data (all from seeds, ``shapes``): ``n_train`` images of ``shapes.NEW_CONCEPT`` in random colours
(a small LoRA-style dataset), a disjoint held-out set of the same concept, and a held-out set of
the base concepts (does the adapter leave what the base knew intact?). Held-out losses use fixed
noise and timesteps spread evenly over the schedule, so every evaluation of every run is on the
same problems.

A run: a LyCORIS network over the frozen denoiser, made by the sd-scripts wrapper module
(``hina_kohya.networks.lycoris``: LyCORIS' kohya network, sd-scripts' key names, optimizer groups
named and split into decay / no-decay groups), mini-batches and noise drawn from the run's seed (two
runs with the same seed see the same batches and start from the same adapter).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import denoiser, shapes
from .loop import RunResult, decay_split_groups, fit, optimizer_state_bytes  # noqa: F401 - re-exported

#: the demo network per algorithm: (network_dim, network_alpha, network_args) as sd-scripts would
#: pass them to LyCORIS; LoKr's are the recommended LoKr preset's (``lokr-sd``)
NETWORKS = {
    "lokr": (16, 8.0, {"algo": "lokr", "factor": "8", "preset": "attn-mlp"}),
    "lora": (8, 4.0, {"algo": "lora", "preset": "attn-mlp"}),
    "loha": (8, 4.0, {"algo": "loha", "preset": "attn-mlp"}),
}


@dataclass
class Problems:
    """Fixed inputs of one loss evaluation: images, conditioning, noise, timesteps."""
    x0: Tensor
    cond: Tensor
    noise: Tensor
    t: Tensor

    def to(self, device: torch.device) -> "Problems":
        return Problems(self.x0.to(device), self.cond.to(device), self.noise.to(device), self.t.to(device))


@dataclass
class TaskData:
    train_x: Tensor
    train_cond: Tensor
    heldout: Problems          # the new concept: the loss the reports show
    base_heldout: Problems     # the base concepts: is what the base knew left intact?
    validation: Problems       # the new concept again, disjoint: for choosing learning rates


def _problems(tables: dict, concepts: tuple, n: int, seed: int) -> Problems:
    x0, names, colors = shapes.sample(concepts, n, denoiser.SIZE, seed)
    g = torch.Generator().manual_seed(seed + 7)
    # evenly spread timesteps (shuffled): every evaluation weighs the schedule alike
    t = ((torch.arange(n) + 0.5) * denoiser.TIMESTEPS / n).long()[torch.randperm(n, generator=g)]
    return Problems(x0, denoiser.conditioning(tables, names, colors), torch.randn(x0.shape, generator=g), t)


def make_data(tables: dict, n_train: int = 64, n_heldout: int = 128, seed: int = 0) -> TaskData:
    """The new concept's training images, its held-out and validation problems and base-concept
    held-out problems. Seeds are offset so the sets never share an image."""
    x, names, colors = shapes.sample((shapes.NEW_CONCEPT,), n_train, denoiser.SIZE, 10_000 + seed)
    return TaskData(x, denoiser.conditioning(tables, names, colors),
                    _problems(tables, (shapes.NEW_CONCEPT,), n_heldout, 20_000 + seed),
                    _problems(tables, shapes.BASE_CONCEPTS, n_heldout, 30_000 + seed),
                    _problems(tables, (shapes.NEW_CONCEPT,), n_heldout, 40_000 + seed))


def make_network(unet, algo: str, seed: int):
    """The LyCORIS network of ``algo`` (``NETWORKS``) over the denoiser, built and applied exactly
    as sd-scripts does with ``--network_module hina_kohya.networks.lycoris`` (keys
    ``lora_unet_...``, named decay-split optimizer groups), initialised from ``seed``."""
    if algo not in NETWORKS:
        raise ValueError(f"unknown adapter algorithm {algo!r}; choose one of {', '.join(NETWORKS)}")
    from ..networks import lycoris as wrapper

    dim, alpha, args = NETWORKS[algo]
    torch.manual_seed(seed)
    lycoris_log = logging.getLogger("LyCORIS")
    level = lycoris_log.level
    lycoris_log.setLevel(logging.ERROR)  # its per-module notes (e.g. LoKr's full-matrix mode on 64-wide layers)
    try:
        network = wrapper.create_network(1.0, dim, alpha, None, [], unet, **args)
        network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    finally:
        lycoris_log.setLevel(level)
    return network


def named_groups(network, lr: float) -> list[dict]:
    """The network's optimizer groups as the sd-scripts wrapper gives them (named, decay-split)."""
    return network.prepare_optimizer_params(None, lr, lr)[0]


@torch.no_grad()
def heldout_loss(unet, sched, problems: Problems, batch: int = 64) -> float:
    total = 0.0
    n = problems.x0.shape[0]
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        loss = denoiser.noise_loss(unet, sched, problems.x0[sl], problems.cond[sl], problems.noise[sl], problems.t[sl])
        total += float(loss) * problems.x0[sl].shape[0]
    return total / n


def digest(network) -> str:
    """sha256 of the network's state (to show two runs start from the same adapter)."""
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(unet, network, optimizer, data: TaskData, steps: int, batch: int, seed: int, label: str,
          eval_every: int, device: torch.device, progress: Callable[[int, float], None] = lambda s, l: None,
          validation: bool = False) -> RunResult:
    """Train the adapter ``steps`` optimizer steps with ``loop.fit``: mini-batches of ``batch``
    training images, noise and timesteps drawn from the run's generator; held-out loss on the new
    concept at the checkpoints, base-concept loss before and after."""
    sched = denoiser.scheduler()
    splits = {"heldout": data.heldout.to(device), "base": data.base_heldout.to(device)}
    if validation:
        splits["validation"] = data.validation.to(device)
    train_x, train_cond = data.train_x.to(device), data.train_cond.to(device)

    def next_loss(g: torch.Generator) -> Tensor:
        idx = torch.randint(train_x.shape[0], (batch,), generator=g)
        noise = torch.randn((batch, *train_x.shape[1:]), generator=g).to(device)
        t = torch.randint(0, denoiser.TIMESTEPS, (batch,), generator=g).to(device)
        return denoiser.noise_loss(unet, sched, train_x[idx], train_cond[idx], noise, t)

    return fit(list(network.parameters()), optimizer, next_loss, lambda split: heldout_loss(unet, sched, splits[split]),
               steps, seed, label, eval_every, device, progress, validation, base=True, set_mode=network.train,
               init_digest=digest(network))


#: ``algo`` of a full fine-tune: every weight of the denoiser trains, no adapter
FULL = "full"


def run_once(base, algo: str, seed: int, make_optimizer: Callable, lr: float, data: TaskData, steps: int, batch: int,
             label: str, eval_every: int, device: torch.device, progress: Callable[[int, float], None] = lambda s, l: None,
             validation: bool = False):
    """One training run on a copy of ``base`` (the adapter hooks into the model it is applied to,
    so every run gets its own): the ``algo`` network from ``seed``, its named groups at ``lr``,
    ``make_optimizer(groups)``, then ``train``. With ``algo="full"`` (``FULL``) the copy itself is
    fine-tuned: all its weights, named, in decay / no-decay groups (``loop.decay_split_groups``).
    Returns ``(RunResult, trained module)``."""
    unet = copy.deepcopy(base).to(device)
    if algo == FULL:
        unet.requires_grad_(True)
        optimizer = make_optimizer(decay_split_groups(list(unet.named_parameters()), lr))
        return train(unet, unet, optimizer, data, steps, batch, seed, label, eval_every, device, progress,
                     validation), unet
    network = make_network(unet, algo, seed)
    network.to(device)
    optimizer = make_optimizer(named_groups(network, lr))
    result = train(unet, network, optimizer, data, steps, batch, seed, label, eval_every, device, progress, validation)
    return result, network
