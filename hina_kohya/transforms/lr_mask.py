"""lr_mask -- Automagic per-element learning rates (ostris ai-toolkit's Automagic idea).

Each element has its own rate L in [min_lr, max_lr], starting at the group's initial lr; ``max_lr``
is ``max_lr_ratio`` (10) times that lr unless an absolute ``max_lr`` is given. During
warm-up (t <= warmup_steps) it moves by ``lr_bump`` up when the gradient's sign agrees with the
previous step's sign and down when it flips; afterwards it is frozen. The applied rate follows the
scheduler: ``L * group_lr / initial_group_lr`` (the originals compared constants, so the scheduler
never reached the mask, or compounded a decay into it every step -- defects 25, 36, 40, 54).

Storage: 2 bytes per element. The state ``lr_mask`` holds ``L / max_lr`` in fp16 (relative
resolution 2**-11 = 0.05 %, so a bump of 3e-6 on 1e-3 = 0.3 % is kept -- a bf16 mask loses it,
defect 65) and its *sign* holds the last gradient polarity (+ for g > 0), so no separate polarity
tensor is stored.

``lr_mask_granularity``: ``"element"`` (the above), ``"tensor"`` (one rate per tensor, ai-toolkit's
Automagic2 idea) or ``"group"`` (one rate per param group and device, its Automagic3 idea). A
tensor's or group's rate moves by ``lr_bump * (2 * agree - 1)``, ``agree`` the fraction of its
elements whose gradient sign repeats the last step's -- the mean of what the element rates would
move. These keep the last signs as bits (``lr_polarity``, 1 bit per element) and the rate as one
number per tensor (``lr_rate``, L / max_lr); they act as a per-tensor rate factor (``prepare``,
on the raw gradients), not a per-element multiplier.
"""

from __future__ import annotations

import torch

from ..core.chain import Bucket, Slot, StateSpec, Transform

GRANULARITIES = ("element", "tensor", "group")


def initial_lr(hp: dict) -> float:
    return float(hp.get("initial_lr", hp.get("hina_lr0", hp["lr"])))


def initial_lr_t(hp: dict):
    """The same inside the per-tensor math, where numbers arrive as 0-d tensors."""
    return hp["initial_lr"] if "initial_lr" in hp else hp["hina_lr0"] if "hina_lr0" in hp else hp["lr"]


#: the default cap of the rates: ``max_lr = MAX_LR_RATIO * lr`` of each param group
MAX_LR_RATIO = 10.0


def resolve_max_lr(group: dict, owner: str) -> None:
    """A group without an absolute ``max_lr`` (None, the default) gets ``max_lr_ratio`` times its
    initial lr, so the masks can reach the same multiple of whatever lr the group trains at (an
    absolute 1e-3, the originals' default, capped every larger lr at 1e-3: a user's lr of 1e-2
    trained like 1e-3). ValueError when the cap falls below ``min_lr``."""
    if group.get("max_lr") is None:
        ratio = group.get("max_lr_ratio", MAX_LR_RATIO)
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0):
            raise ValueError(f"{owner}: max_lr_ratio={ratio!r}: use a number > 0 (the cap of the per-element rates "
                             "is max_lr_ratio x lr), e.g. 10.0")
        group["max_lr"] = float(ratio) * float(group["hina_lr0"])
    if group.get("use_lr_mask", True) and not group["min_lr"] <= group["max_lr"]:
        raise ValueError(f"{owner}: min_lr={group['min_lr']!r} must not exceed max_lr={group['max_lr']!r} "
                         f"(lr={group['hina_lr0']!r}); lower min_lr or raise max_lr / max_lr_ratio.")


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
    Either makes the element granularity per-tensor only; the tensor and group granularities
    (``granularity``, see the module docstring) take neither: they see no per-element math."""

    name = "lr_mask"

    def __init__(self, d_coef: bool = False, bump_scale: bool = False, granularity: str = "element") -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"lr_mask_granularity={granularity!r}: use one of {', '.join(map(repr, GRANULARITIES))}")
        self.granularity = granularity
        self.d_coef, self.bump_scale = (d_coef, bump_scale) if granularity == "element" else (False, False)
        self.has_foreach = not (self.d_coef or self.bump_scale)

    def state_specs(self, hp: dict) -> tuple[StateSpec, ...]:
        start = min(max(initial_lr(hp), hp["min_lr"]), hp["max_lr"]) / hp["max_lr"]
        if self.granularity == "element":
            return (StateSpec("lr_mask", init=start, fixed_format="fp16"),)
        return (StateSpec("lr_rate", quantizable=False, init=start, shape=lambda p: ()),
                StateSpec("lr_polarity", fixed_format="uint8", shape=lambda p: ((p.numel() + 7) // 8,)))

    # -- per tensor / per group: a rate factor from the bucket's raw gradients -------------------
    def prepare(self, b: Bucket) -> None:
        if self.granularity == "element":
            return
        hp = b.hp
        rates, bits = b.state["lr_rate"], b.state["lr_polarity"]
        positive = [g.reshape(-1) > 0 for g in b.grads]
        finite = [torch.isfinite(g).all() for g in b.grads]  # a skipped step keeps its rate and signs
        agree = [(pos == unpack_bits(pol, pos.numel())).sum() for pos, pol in zip(positive, bits)]
        if self.granularity == "group":
            zero = torch.zeros((), device=b.grads[0].device)
            kept = torch.stack([torch.where(f, a.float(), zero) for f, a in zip(finite, agree)]).sum()
            total = torch.stack([torch.where(f, float(pos.numel()), zero) for f, pos in zip(finite, positive)]).sum()
            agree_frac = [kept / total.clamp_min(1.0)] * len(b)
        else:
            agree_frac = [a.float() / pos.numel() for a, pos in zip(agree, positive)]
        bump, low = hp["lr_bump"] / hp["max_lr"], hp["min_lr"] / hp["max_lr"]
        for rate, pol, pos, ok, frac, t in zip(rates, bits, positive, finite, agree_frac, b.steps):
            if 1 < t <= hp["warmup_steps"]:
                moved = (rate + bump * (2 * frac - 1)).clamp(low, 1.0)
                rate.copy_(torch.where(ok, moved.to(rate.dtype), rate))
            if t <= hp["warmup_steps"]:
                pol.copy_(torch.where(ok, pack_bits(pos).to(pol.dtype), pol))
        factor = hp["max_lr"] / initial_lr(hp)
        scales = [r.to(b.compute_dtype) * factor for r in rates]
        b.lr_scale_t = scales if b.lr_scale_t is None else torch._foreach_mul(b.lr_scale_t, scales)

    # -- per element ---------------------------------------------------------------------------
    def math(self, x: Slot) -> None:
        if self.granularity != "element":
            return
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
        if self.granularity != "element":
            return
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


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Booleans ``[n]`` -> bytes ``[ceil(n / 8)]`` (int32 values 0..255), bit j of byte i = flags[8 i + j]."""
    pad = (-flags.numel()) % 8
    f = torch.nn.functional.pad(flags.to(torch.int32), (0, pad)).reshape(-1, 8)
    return (f << torch.arange(8, device=flags.device, dtype=torch.int32)).sum(dim=1)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``pack_bits``' inverse: the first ``n`` flags of the bytes ``packed`` (any dtype holding 0..255)."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    return ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()
