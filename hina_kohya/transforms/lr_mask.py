"""lr_mask -- Automagic per-element learning rates (ostris ai-toolkit's Automagic idea).

Each element has its own rate L in [min_lr, max_lr], starting at the group's initial lr. During
warm-up (t <= warmup_steps) it moves by ``lr_bump`` up when the gradient's sign agrees with the
previous step's sign and down when it flips; afterwards it is frozen. The applied rate follows the
scheduler: ``L * group_lr / initial_group_lr`` (the originals compared constants, so the scheduler
never reached the mask, or compounded a decay into it every step -- defects 25, 36, 40, 54).

Storage: 2 bytes per element. The state ``lr_mask`` holds ``L / max_lr`` in fp16 (relative
resolution 2**-11 = 0.05 %, so a bump of 3e-6 on 1e-3 = 0.3 % is kept -- a bf16 mask loses it,
defect 65) and its *sign* holds the last gradient polarity (+ for g > 0), so no separate polarity
tensor is stored.
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform


def initial_lr(hp: dict) -> float:
    return float(hp.get("initial_lr", hp.get("hina_lr0", hp["lr"])))


def initial_lr_t(hp: dict):
    """The same inside the per-tensor math, where numbers arrive as 0-d tensors."""
    return hp["initial_lr"] if "initial_lr" in hp else hp["hina_lr0"] if "hina_lr0" in hp else hp["lr"]


def note_capped_groups(opt) -> None:
    """One message per optimizer for each param group whose lr is above its max_lr: the masks
    live in [min_lr, max_lr], so such a group trains like lr = max_lr, silently otherwise."""
    for i, g in enumerate(opt.param_groups):
        if g["lr"] > g["max_lr"]:
            opt.note_once(f"param group {i}: lr={g['lr']:g} is above max_lr={g['max_lr']:g}; the per-element "
                          f"rates start at and stay within max_lr, so this trains like lr={g['max_lr']:g}. "
                          f"Pass max_lr >= lr (e.g. max_lr={10 * g['lr']:g}) to train at this lr")


class LRMask(Transform):
    """``d_coef`` (Automagic_CameAMP_Improved): during the early warm-up (t < W/2) the bump toward
    larger rates is multiplied by ``hp["d_coef"]`` when -sum(g * theta) > 0 (the gradient points
    toward shrinking the weight) and the bump toward smaller rates when it is < 0. A per-element
    bump scale may come from a transform before it (``x.scratch["bump_scale"]``, spatial awareness).
    Either makes the transform per-tensor only."""

    name = "lr_mask"

    def __init__(self, d_coef: bool = False, bump_scale: bool = False) -> None:
        self.d_coef, self.bump_scale = d_coef, bump_scale
        self.has_foreach = not (d_coef or bump_scale)

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        start = min(max(initial_lr(hp), hp["min_lr"]), hp["max_lr"]) / hp["max_lr"]
        return (StateSpec("lr_mask", init=start, fixed_format="fp16"),)

    def math(self, x: Slot) -> None:
        hp, t = x.hp, x.t
        stored, positive = x.st["lr_mask"], x.g > 0
        mask = stored.to(x.p.dtype)  # the fused kernel gets the fp16 storage itself
        mag = mask.abs()
        bump = hp["lr_bump"] / hp["max_lr"]
        up = down = bump
        if self.bump_scale:
            up = down = bump * x.scratch["bump_scale"]
        if self.d_coef:
            c = -(x.g * x.p).sum()
            early = t < hp["warmup_steps"] / 2
            up = up * torch.where(early & (c > 0), hp["d_coef"], torch.ones_like(c))
            down = down * torch.where(early & (c < 0), hp["d_coef"], torch.ones_like(c))
        moved = torch.where((mask > 0) == positive, mag + up, mag - down)
        moved = moved.clamp_min(hp["min_lr"] / hp["max_lr"]).clamp_max(1.0)
        mag = torch.where((t > 1) & (t <= hp["warmup_steps"]), moved, mag)  # adapt during warm-up
        stored.copy_(torch.where(t <= hp["warmup_steps"], torch.where(positive, mag, -mag), mask))
        x.mask = mag
        x.mask_scale = x.mask_scale * hp["max_lr"] / initial_lr_t(hp)

    def foreach(self, b: Bucket) -> None:
        mags = [self._adapt(b, i) for i in range(len(b))]
        b.lr_mask_scale *= b.hp["max_lr"] / initial_lr(b.hp)
        b.lr_mask = mags if b.lr_mask is None else torch._foreach_mul(b.lr_mask, mags)

    def _adapt(self, b: Bucket, i: int) -> torch.Tensor:
        """Move element rates by the sign agreement; returns |mask| (= L / max_lr)."""
        hp, t = b.hp, b.steps[i]
        mask, g = b.state["lr_mask"][i], b.grads[i]
        mag = mask.abs()
        positive = g > 0
        if 1 < t <= hp["warmup_steps"]:
            bump = hp["lr_bump"] / hp["max_lr"]
            agree = (mask > 0) == positive
            # where() on tensors: Python scalars would be materialised in the default dtype
            mag = torch.where(agree, mag + bump, mag - bump).clamp_(hp["min_lr"] / hp["max_lr"], 1.0)
        if t <= hp["warmup_steps"]:
            mask.copy_(torch.where(positive, mag, -mag))
        return mag
