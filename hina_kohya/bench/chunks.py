"""``hina-kohya bench chunks``: the fused kernels with different tensors-per-call, interleaved.

One optimizer is stepped alternately with each chunk size (read per call from
``HINA_KOHYA_FUSED_CHUNK``) and a ``torch.optim.AdamW(foreach=True)`` reference, in one process,
so machine noise hits every variant alike. Prints medians and the ratio to AdamW.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from .. import optim
from ..core.fused import CHUNK_ENV
from .paramsets import build


def main(recipes: list[str], paramset: str, sizes: list[int], rounds: int) -> dict:
    results = {}
    saved = os.environ.get(CHUNK_ENV)
    try:
        for name in recipes:
            params, names = build(paramset)
            opt = getattr(optim, name)([{"params": params, "param_names": names}], lr=1e-4, fused=True)
            ref_params, _ = build(paramset)
            ref = torch.optim.AdamW(ref_params, lr=1e-4, foreach=True)
            for k in sizes:  # compile every variant before timing
                os.environ[CHUNK_ENV] = str(k)
                opt.step()
                opt.step()
            times: dict[str, list[float]] = {str(k): [] for k in sizes}
            times["adamw"] = []
            for r in range(rounds):
                for k in (sizes if r % 2 == 0 else sizes[::-1]):
                    os.environ[CHUNK_ENV] = str(k)
                    t0 = time.perf_counter()
                    opt.step()
                    times[str(k)].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ref.step()
                times["adamw"].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            results[name] = med
            cells = ", ".join(f"chunk {k}: {med[str(k)]:.1f} ms = {med[str(k)] / med['adamw']:.2f}x" for k in sizes)
            print(f"{name} on {paramset}: {cells} (AdamW foreach {med['adamw']:.1f} ms)", flush=True)
    finally:
        if saved is None:
            os.environ.pop(CHUNK_ENV, None)
        else:
            os.environ[CHUNK_ENV] = saved
    return results
