"""C-Optim context-aware learning rate (Automagic_CameAMP_COptim, ALGORITHMS.md §2.21): a
heuristic that raises the rate while training improves steadily or stagnates, and lowers it in
unstable stretches. No paper; documented here as what it is.

The signal s_t is the training loss when the optimizer gets one -- ``step(closure)`` or
``optimizer.set_loss(loss)`` (the sd-scripts hook feeds it) -- otherwise the global gradient norm
(one message says so). Everything below is tensor arithmetic on the signal's device: no host sync.

    history      the last ``context_window`` signals (ring buffer)
    cv           std / |mean| of the history; stability = exp(-cv)
    multi-scale  bias-corrected EMAs of s at horizons 1, 5, 20 and 100 steps
    trend a      (EMA_20 - EMA_5) / |EMA_20|      > 0 while the signal falls
    stagnation   consecutive steps with |a| < 1e-4
    edge case    at least 10 signals and cv > edge_threshold
    target       clamp(1 + 4a, 0.8, 2) * (1 + 0.3 * clamp((stagnant - 15) / 15, 0, 1))
                 * (0.6 + 0.4 * stability if edge case else 1),  clamped to [0.5, 3];  1 for < 5 signals
    multiplier  <- multiplier + adaptation_rate * (target - multiplier)

The multiplier scales every tensor's rate. A non-finite signal leaves the whole context as it was.
What changed from the original (defects 42-46): the
loss reaches it without a closure (and a gradient-norm fallback exists), so it is not a constant
1.2; "gradient consistency" (the cosine of consecutive scalar norms, always 1) is gone; the
stagnation boost is deterministic (the original drew from Python's ``random``);
``edge_threshold`` and ``adaptation_rate`` are used; and the multi-scale averages are of the
signal, not four full-size gradient EMAs (+16 B/element) fed with unnormalised gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.chain import Bucket, Transform

SCALES = (1, 5, 20, 100)
_TINY = 1e-30


class Context:
    """The optimizer-wide C-Optim state (saved with the optimizer's state dict)."""

    KEYS = ("history", "count", "ema", "ema_weight", "stagnant", "multiplier", "edge_cases", "last_edge")

    def __init__(self, window: int = 50, edge_threshold: float = 0.9, adaptation_rate: float = 0.1) -> None:
        if int(window) < 2:
            raise ValueError(f"context_window={window!r}: use at least 2 steps of history")
        if not 0 < float(adaptation_rate) <= 1:
            raise ValueError(f"adaptation_rate={adaptation_rate!r}: use a value in (0, 1]")
        self.window, self.edge_threshold, self.adaptation_rate = int(window), float(edge_threshold), float(adaptation_rate)
        self.t: dict[str, Tensor] = {}
        self.signal_is_loss: Optional[bool] = None
        self._consts: Optional[tuple[Tensor, Tensor]] = None  # EMA rates and ring slots, per device

    def _init(self, device: torch.device) -> None:
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.t = {"history": z(self.window), "count": z(), "ema": z(len(SCALES)), "ema_weight": z(len(SCALES)),
                  "stagnant": z(), "multiplier": torch.ones((), dtype=torch.float64, device=device), "edge_cases": z(),
                  "last_edge": z()}

    @property
    def multiplier(self) -> Optional[Tensor]:
        return self.t.get("multiplier")

    def update(self, signal: Tensor, is_loss: bool) -> None:
        s = signal.detach().double().reshape(())  # a few scalars: float64 costs nothing
        if not self.t:
            self._init(s.device)
        c = self.t
        s = s.to(c["history"].device)
        self.signal_is_loss = is_loss
        # a non-finite signal (an fp16 overflow step, a NaN gradient in the fallback norm) would
        # stay in the history and the EMAs and turn the multiplier into NaN for good: it is
        # ignored instead, selected in tensors (no sync)
        finite = torch.isfinite(s)
        before = {k: v.clone() for k, v in c.items()}
        s = torch.where(finite, s, torch.zeros_like(s))
        idx = torch.remainder(c["count"], self.window).long().reshape(1)
        c["history"].index_copy_(0, idx, s.reshape(1))
        c["count"].add_(1)
        rates, slots = self._constants(s.device)
        n = torch.clamp(c["count"], max=float(self.window))
        valid = (slots < n).double()
        mean = (c["history"] * valid).sum() / n
        std = (((c["history"] - mean) * valid).square().sum() / n).sqrt()
        cv = std / mean.abs().clamp_min(_TINY)
        stability = torch.exp(-cv)
        c["ema"].mul_(1 - rates).add_(rates * s)
        c["ema_weight"].mul_(1 - rates).add_(rates)
        ema = c["ema"] / c["ema_weight"].clamp_min(_TINY)
        trend = (ema[2] - ema[1]) / ema[2].abs().clamp_min(_TINY)
        c["stagnant"].copy_(torch.where(trend.abs() < 1e-4, c["stagnant"] + 1, torch.zeros_like(trend)))
        edge = (c["count"] >= 10) & (cv > self.edge_threshold)
        target = (torch.clamp(1 + 4 * trend, 0.8, 2.0)
                  * (1 + 0.3 * torch.clamp((c["stagnant"] - 15) / 15, 0.0, 1.0))
                  * torch.where(edge, 0.6 + 0.4 * stability, torch.ones_like(stability)))
        target = torch.where(c["count"] >= 5, torch.clamp(target, 0.5, 3.0), torch.ones_like(target))
        c["multiplier"].add_(self.adaptation_rate * (target - c["multiplier"]))
        c["edge_cases"].add_(edge.double())
        c["last_edge"].copy_(edge.double())
        for k, v in c.items():
            v.copy_(torch.where(finite, v, before[k]))

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The EMA rates 1/k and the ring buffer's slot numbers, built once per device (not a
        host-to-device copy every step)."""
        if self._consts is None or self._consts[0].device != device:
            self._consts = (torch.tensor([1.0 / k for k in SCALES], dtype=torch.float64, device=device),
                            torch.arange(self.window, device=device))
        return self._consts

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        out: dict = {k: v.clone() for k, v in self.t.items()}
        out["window"] = self.window
        out["signal_is_loss"] = -1 if self.signal_is_loss is None else int(self.signal_is_loss)
        return out

    def load_state_dict(self, sd: dict) -> None:
        if int(sd.get("window", self.window)) != self.window:
            raise ValueError(f"the checkpoint's C-Optim context_window is {sd['window']}, this optimizer's is "
                             f"{self.window}: pass context_window={sd['window']} to resume it")
        self.t = {k: sd[k].detach().double().clone() for k in self.KEYS if k in sd}
        if len(self.t) != len(self.KEYS):
            self.t = {}
        flag = int(sd.get("signal_is_loss", -1))
        self.signal_is_loss = None if flag < 0 else bool(flag)


class ContextRate(Transform):
    """Applies the optimizer's C-Optim multiplier (``opt.context``) to every tensor's rate."""

    name = "c_optim"

    def prepare(self, b: Bucket) -> None:
        m = b.opt.context.multiplier if b.opt is not None else None
        if m is None:
            return
        m = m.to(device=b.params[0].device, dtype=b.compute_dtype)
        scales = [m] * len(b)
        b.lr_scale_t = scales if b.lr_scale_t is None else torch._foreach_mul(b.lr_scale_t, scales)
