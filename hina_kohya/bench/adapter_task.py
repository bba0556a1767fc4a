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
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from . import denoiser, shapes

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


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (0-d counters included)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def digest(network) -> str:
    """sha256 of the network's state (to show two runs start from the same adapter)."""
    h = hashlib.sha256()
    for k, v in sorted(network.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RunResult:
    label: str
    curve: list[tuple[int, float]] = field(default_factory=list)   # (step, held-out loss)
    train_loss: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)               # whole training step
    opt_step_s: list[float] = field(default_factory=list)           # optimizer.step() alone
    validation: float = float("nan")                                # final loss on the validation set
    diverged_at: Optional[int] = None                               # first step with a non-finite loss
    base_heldout_before: float = float("nan")
    base_heldout_after: float = float("nan")
    state_bytes: int = 0
    params: int = 0
    diagnostics: dict = field(default_factory=dict)
    init_digest: str = ""                                           # sha256 of the adapter before step 1

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    def steps_to(self, target: float) -> Optional[int]:
        """The first evaluated step whose held-out loss is at or below ``target`` (None when the
        target is not finite: the reference diverged)."""
        if not math.isfinite(target):
            return None
        return next((s for s, v in self.curve if v <= target), None)

    def median_ms(self, which: str, skip: int = 2) -> float:
        xs = getattr(self, which)[skip:] or getattr(self, which)
        return 1000 * statistics.median(xs) if xs else float("nan")


def train(unet, network, optimizer, data: TaskData, steps: int, batch: int, seed: int, label: str,
          eval_every: int, device: torch.device, progress: Callable[[int, float], None] = lambda s, l: None,
          validation: bool = False) -> RunResult:
    """Train the adapter ``steps`` optimizer steps; held-out loss at step 0, every ``eval_every``
    steps and at the end (and on the validation set at the end with ``validation``); a non-finite
    training loss stops the run (``diverged_at``; the held-out loss reads inf at it and at every
    later checkpoint, so curves of different runs stay aligned by step). ``optimizer`` may need
    ``train()`` / ``eval()`` (recipes that declare it): called around evaluation as sd-scripts does
    around sampling, and left in eval mode at the end (the weights to save)."""
    sched = denoiser.scheduler()
    res = RunResult(label, params=sum(p.numel() for p in network.parameters()), init_digest=digest(network))
    checkpoints = [s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps]
    heldout, base = data.heldout.to(device), data.base_heldout.to(device)
    train_x, train_cond = data.train_x.to(device), data.train_cond.to(device)
    res.base_heldout_before = heldout_loss(unet, sched, base)
    res.curve.append((0, heldout_loss(unet, sched, heldout)))
    g = torch.Generator().manual_seed(seed + 99)
    swaps = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    for step in range(1, steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        idx = torch.randint(train_x.shape[0], (batch,), generator=g)
        noise = torch.randn((batch, *train_x.shape[1:]), generator=g).to(device)
        t = torch.randint(0, denoiser.TIMESTEPS, (batch,), generator=g).to(device)
        network.train()
        loss = denoiser.noise_loss(unet, sched, train_x[idx], train_cond[idx], noise, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        if hasattr(optimizer, "set_loss"):
            optimizer.set_loss(loss.detach())
        _sync(device)  # backward and clipping are queued on a GPU: count them before the step
        t1 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        res.opt_step_s.append(t2 - t1)
        res.step_s.append(t2 - t0)
        res.train_loss.append(float(loss.detach()))
        if not math.isfinite(res.train_loss[-1]):  # diverged: no point in going on
            res.diverged_at = step
            res.curve += [(c, float("inf")) for c in checkpoints if c >= step]
            progress(step, res.train_loss[-1])
            break
        if step in checkpoints:
            if swaps:
                optimizer.eval()
            res.curve.append((step, heldout_loss(unet, sched, heldout)))
            if swaps:
                optimizer.train()
        progress(step, res.train_loss[-1])
    if swaps:  # leave the optimizer in eval mode: the weights to evaluate and save
        optimizer.eval()
    res.base_heldout_after = heldout_loss(unet, sched, base)
    if validation:
        res.validation = heldout_loss(unet, sched, data.validation.to(device))
    res.state_bytes = optimizer_state_bytes(optimizer)
    if hasattr(optimizer, "log_dict"):
        res.diagnostics = optimizer.log_dict()
    return res


def run_once(base, algo: str, seed: int, make_optimizer: Callable, lr: float, data: TaskData, steps: int, batch: int,
             label: str, eval_every: int, device: torch.device, progress: Callable[[int, float], None] = lambda s, l: None,
             validation: bool = False):
    """One training run on a copy of ``base`` (the adapter hooks into the model it is applied to,
    so every run gets its own): the ``algo`` network from ``seed``, its named groups at ``lr``,
    ``make_optimizer(groups)``, then ``train``. Returns ``(RunResult, network)``."""
    unet = copy.deepcopy(base).to(device)
    network = make_network(unet, algo, seed)
    network.to(device)
    optimizer = make_optimizer(named_groups(network, lr))
    result = train(unet, network, optimizer, data, steps, batch, seed, label, eval_every, device, progress, validation)
    return result, network
