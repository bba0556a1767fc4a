"""Parameter precision: math in fp32, then a careful write-back to low-precision parameters.

bf16 has 8 significant bits: an update smaller than about 2**-9 of a weight is lost entirely by
round-to-nearest, which is how bf16 training silently stalls. Two remedies:

* stochastic rounding (default): round up with probability equal to the discarded fraction, so
  the expected stored value equals the fp32 result (Gupta et al. 2015, "Deep Learning with
  Limited Numerical Precision", arXiv 1502.02551). Seeded per step and parameter, so runs and
  data-parallel ranks are reproducible;
* Kahan-compensated summation: keep the rounding error of each write in a bf16 buffer and add it
  back next step (Zamirai et al. 2020, arXiv 2010.06192).

fp16 parameters have a narrow exponent range as well as few bits; without an fp32 master copy
updates underflow. They are refused unless ``master_weights=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUNDINGS = ("stochastic", "kahan", "nearest")


def stochastic_round_bf16(x: Tensor, generator: torch.Generator) -> Tensor:
    """Round fp32 ``x`` to bf16 stochastically (unbiased); same shape as ``x``.

    A bf16 value is the top 16 bits of an fp32 value. Adding a uniform random integer in
    [0, 2**16) to the bit pattern and truncating the low 16 bits rounds the magnitude up with
    probability equal to the truncated fraction (the bit pattern is sign-magnitude, so this is
    symmetric for negative values; inf stays inf).
    """
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # -65536 == 0xFFFF0000 as int32
    return rounded.view(torch.float32).to(torch.bfloat16)


def kahan_write(param: Tensor, new_value: Tensor, compensation: Tensor) -> None:
    """Write fp32 ``new_value`` (already including the old compensation) into a bf16 ``param``
    and keep what rounding lost in ``compensation`` (bf16, same shape)."""
    param.copy_(new_value)
    compensation.copy_(new_value - param.float())


def check_param_dtype(p: Tensor, master_weights: bool) -> None:
    """Refuse parameters this optimizer cannot update faithfully."""
    if p.dtype == torch.float16 and not master_weights:
        raise TypeError(
            "hina_kohya: a parameter is float16 and master_weights=False. fp16 weights lose most "
            "optimizer updates without an fp32 master copy. Train in fp32 or bf16 (sd-scripts: drop "
            "--full_fp16, or use --mixed_precision fp16 which keeps fp32 weights), or pass "
            "master_weights=True in --optimizer_args (4 extra bytes per element)."
        )
    if not (p.is_floating_point()):
        raise TypeError(f"hina_kohya: parameters must be floating point, got {p.dtype}")
