"""The training loop every benchmark task shares, and what one run reports.

A task supplies two functions: ``next_loss(generator)`` (draws one mini-batch from the run's
generator and returns its training loss, graph attached) and ``evaluate(split)`` (a fixed-problem
loss on ``"heldout"``, ``"validation"`` or ``"base"``; no gradient). ``fit`` does the rest the same
way for every task and optimizer: gradient clipping to norm 1 (as sd-scripts' default
``--max_grad_norm 1.0``), ``set_loss`` for recipes that take the loss, timing with device
synchronisation, ``train()`` / ``eval()`` around evaluations for optimizers that declare them,
divergence handling, final statistics and diagnostics.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


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
    init_digest: str = ""                                           # sha256 of the trained weights before step 1

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


def decay_split_groups(named, lr: float) -> list[dict]:
    """Named optimizer groups from ``(name, parameter)`` pairs, split as the project's network
    wrappers split them (``roles.decays``, whole weights included): weights and adapter factors
    in a group with the optimizer's weight decay, biases and norms in one with none."""
    from ..roles import decays

    split: dict[bool, list] = {True: [], False: []}
    for name, p in named:
        split[decays(name, tuple(p.shape), decay_full=True)].append((name, p))
    groups = []
    for decay, items in split.items():
        if items:
            g = {"params": [p for _, p in items], "param_names": [n for n, _ in items], "lr": lr}
            if not decay:
                g["weight_decay"] = 0.0
            groups.append(g)
    return groups


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (0-d counters included)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(trained: list[torch.Tensor], optimizer, next_loss: Callable[[torch.Generator], torch.Tensor],
        evaluate: Callable[[str], float], steps: int, seed: int, label: str, eval_every: int, device: torch.device,
        progress: Callable[[int, float], None] = lambda s, l: None, validation: bool = False, base: bool = False,
        set_mode: Callable[[bool], None] = lambda training: None, init_digest: str = "") -> RunResult:
    """Train ``steps`` optimizer steps; held-out loss at step 0, every ``eval_every`` steps and at
    the end (the validation loss at the end with ``validation``; the ``"base"`` split before and
    after with ``base``). A non-finite training loss stops the run (``diverged_at``; the held-out
    loss reads inf at it and at every later checkpoint, so curves of different runs stay aligned by
    step). ``set_mode(True/False)`` switches the model between training and evaluation (dropout).
    An optimizer with ``train()`` / ``eval()`` is switched around evaluations, as sd-scripts does
    around sampling, and left in eval mode at the end (the weights to evaluate and save)."""
    res = RunResult(label, params=sum(p.numel() for p in trained), init_digest=init_digest)
    checkpoints = [s for s in range(1, steps + 1) if s % eval_every == 0 or s == steps]
    if base:
        res.base_heldout_before = evaluate("base")
    res.curve.append((0, evaluate("heldout")))
    g = torch.Generator().manual_seed(seed + 99)
    swaps = callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))
    for step in range(1, steps + 1):
        sync(device)
        t0 = time.perf_counter()
        set_mode(True)
        loss = next_loss(g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        if hasattr(optimizer, "set_loss"):
            optimizer.set_loss(loss.detach())
        sync(device)  # backward and clipping are queued on a GPU: count them before the step
        t1 = time.perf_counter()
        optimizer.step()
        sync(device)
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
            set_mode(False)
            if swaps:
                optimizer.eval()
            res.curve.append((step, evaluate("heldout")))
            if swaps:
                optimizer.train()
        progress(step, res.train_loss[-1])
    if swaps:
        optimizer.eval()
    set_mode(False)
    if base:
        res.base_heldout_after = evaluate("base")
    if validation:
        res.validation = evaluate("validation")
    res.state_bytes = optimizer_state_bytes(optimizer)
    if hasattr(optimizer, "log_dict"):
        res.diagnostics = optimizer.log_dict()
    return res
