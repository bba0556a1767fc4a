"""``hina-kohya bench step``: step time, state memory and host syncs of each optimizer.

Method (shared machines are noisy): every candidate and the reference
``torch.optim.AdamW(foreach=True)`` are built over their own copy of the same parameters and
gradients, then timed *interleaved* -- reference step, candidate step, alternating which goes first
-- so slow periods hit both. The reported figure is the median of the per-round ratios
candidate / reference, with the 10th-90th percentile range as the spread.

Memory traffic: an optimizer step must at least read the gradients, read and write the
parameters and read and write its state, so ``min_traffic_bytes`` = 2 x parameter bytes + gradient
bytes + 2 x state bytes, and ``achieved_gbps`` = that / the median step time. Optimizer steps are
memory-bound; ``copy_gbps`` (``copy_bandwidth``: a large tensor copy on the same device, read +
write) is what this device reaches in practice, so achieved / copy says how close a step comes to
the bandwidth limit.

Peak step memory (``step_peak_mib``): what one step allocates above what is held before it -- its
temporaries, snapshots and decoded 8-bit / bf16 states -- the number that decides an out-of-memory error
together with the state. On GPUs the caching allocator's peak (exact); on Linux CPUs the peak of
the resident set (``VmHWM``, reset before the step; free heap memory is returned to the system
first so that reused memory is counted); elsewhere (other platforms, other devices) not
measured (NaN).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from . import baselines
from .paramsets import build
from .syncs import count_host_syncs

PLAIN = dict(use_spd=False, use_cautious=False, use_orthogonal_grad=False, use_adopt_stability=False,
             use_grams=False, use_agr=False, use_tam=False, use_alora=False, dynamic_weight_decay=False)


def _recipe(cls_name: str, precision: str, **kw) -> Callable:
    def make(params, names):
        from .. import optim

        cls = getattr(optim, cls_name)
        return cls([{"params": params, "param_names": names}], lr=1e-4, state_precision=precision, **kw)
    return make


def _coptim_with_loss(params, names):
    """C-Optim as sd-scripts drives it: the integration's hook hands each step's loss to
    ``set_loss`` (a tensor, no host sync), so the gradient-norm fallback signal is not computed."""
    opt = _recipe("Automagic_CameAMP_COptim", "fp32")(params, names)
    loss = torch.ones((), device=params[0].device)
    plain_step = opt.step

    def step(closure=None):
        opt.set_loss(loss)
        return plain_step(closure)

    opt.step = step
    return opt


def _adamw(**kw) -> Callable:
    return lambda params, names: torch.optim.AdamW(params, lr=1e-4, **kw)


def _bnb_adamw8bit(params, names):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-4)


def _came(params, names):
    from came_pytorch import CAME  # pip install came-pytorch (the bench extra)

    return CAME(params, lr=1e-4)


def _prodigy(params, names):
    from prodigyopt import Prodigy  # pip install prodigyopt (the bench extra)

    return Prodigy(params, lr=1.0)


def _outside(factory: Callable, lr: float = 1e-4) -> Callable:
    """An outside baseline of ``bench converge`` (``baselines``: factory(groups, lr)) over the set's named tensors."""
    return lambda params, names: factory([{"params": params, "param_names": names}], lr)


CANDIDATES: dict[str, tuple[str, Callable]] = {
    "adamw_fused": ("torch.optim.AdamW(fused=True)", _adamw(fused=True)),
    "bnb_adamw8bit": ("bitsandbytes AdamW8bit", _bnb_adamw8bit),
    "came": ("CAME (came-pytorch)", _came),
    "prodigy": ("Prodigy (prodigyopt)", _prodigy),
    "adv_adamw": ("adv_optm AdamW_adv", _outside(baselines.adv_adamw)),
    "adv_prodigy": ("adv_optm Prodigy_adv", _outside(baselines.adv_prodigy, 1.0)),
    "lorarite": ("pytorch_optimizer LoRARite (AdamW off the factor pairs)", _outside(baselines.lorarite)),
    "prodigy_plus": ("prodigy-plus-schedule-free", _outside(baselines.prodigy_plus, 1.0)),
    "hina_adamw_plain": ("HinaAdamW, techniques off, fp32 state", _recipe("HinaAdamW", "fp32", **PLAIN)),
    "hina_adamw_plain_bf16": ("HinaAdamW, techniques off, bf16 state", _recipe("HinaAdamW", "bf16", **PLAIN)),
    "hina_adamw_plain_8bit": ("HinaAdamW, techniques off, 8-bit state", _recipe("HinaAdamW", "8bit", **PLAIN)),
    "hina_adamw": ("HinaAdamW, defaults, fp32 state", _recipe("HinaAdamW", "fp32")),
    "hina_adamw_8bit": ("HinaAdamW, defaults, 8-bit state", _recipe("HinaAdamW", "8bit")),
    "adaptive_hina_adamw": ("AdaptiveHinaAdamW, defaults, fp32 state", _recipe("AdaptiveHinaAdamW", "fp32")),
    "adaptive_hina_adamw_8bit": ("AdaptiveHinaAdamW, defaults, 8-bit state",
                                 _recipe("AdaptiveHinaAdamW", "8bit")),
    "automagic_cameamp": ("Automagic_CameAMP, defaults, fp32 state", _recipe("Automagic_CameAMP", "fp32")),
    "automagic_cameamp_8bit": ("Automagic_CameAMP8bit, defaults", _recipe("Automagic_CameAMP", "8bit")),
    "automagic_cameamp_coptim": ("Automagic_CameAMP_COptim, defaults, fp32 state",
                                 _recipe("Automagic_CameAMP_COptim", "fp32")),
    "automagic_cameamp_coptim_loss": ("Automagic_CameAMP_COptim, defaults, fp32 state, loss given (sd-scripts hook)",
                                      _coptim_with_loss),
    "automagic_cameamp_improved": ("Automagic_CameAMP_Improved, defaults, fp32 state",
                                   _recipe("Automagic_CameAMP_Improved", "fp32")),
    # the recipes' steady state: the warm-up-only techniques (orthogonal gradient, TAM, pure Grams,
    # SPD) are compiled out of the kernels once the warm-up is over; warmup_steps=2 gets there at once
    "automagic_cameamp_after_warmup": ("Automagic_CameAMP, defaults, fp32 state, after the warm-up",
                                       _recipe("Automagic_CameAMP", "fp32", warmup_steps=2)),
    "automagic_cameamp_8bit_after_warmup": ("Automagic_CameAMP8bit, defaults, after the warm-up",
                                            _recipe("Automagic_CameAMP", "8bit", warmup_steps=2)),
    "automagic_cameamp_improved_after_warmup": ("Automagic_CameAMP_Improved, defaults, fp32 state, after the warm-up",
                                                _recipe("Automagic_CameAMP_Improved", "fp32", warmup_steps=2)),
    "hina_adamw_eager": ("HinaAdamW, defaults, fp32 state, eager (fused=False)",
                         _recipe("HinaAdamW", "fp32", fused=False)),
    "adaptive_hina_adamw_eager": ("AdaptiveHinaAdamW, defaults, fp32 state, eager (fused=False)",
                                  _recipe("AdaptiveHinaAdamW", "fp32", fused=False)),
}
DEFAULT_CANDIDATES = ("adamw_fused", "bnb_adamw8bit", "came", "prodigy", "adv_adamw", "adv_prodigy", "lorarite",
                      "prodigy_plus", "hina_adamw_plain", "hina_adamw_plain_8bit", "hina_adamw",
                      "hina_adamw_8bit", "adaptive_hina_adamw", "adaptive_hina_adamw_8bit", "automagic_cameamp",
                      "automagic_cameamp_8bit", "automagic_cameamp_coptim", "automagic_cameamp_improved",
                      "hina_adamw_eager", "adaptive_hina_adamw_eager")


@dataclass
class StepResult:
    name: str
    label: str
    paramset: str
    device: str
    ratio_median: float
    ratio_p10: float
    ratio_p90: float
    ms_median: float
    ref_ms_median: float
    state_bytes_per_element: float
    host_syncs_per_step: float
    rounds: int
    error: str = ""
    min_traffic_bytes: float = float("nan")
    achieved_gbps: float = float("nan")
    step_peak_mib: float = float("nan")


def _state_bytes(st: dict) -> int:
    """Bytes of one parameter's state tensors (0-d step counters excluded)."""
    return sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def state_bytes_per_element(opt: torch.optim.Optimizer) -> float:
    total = elems = 0
    for p, st in opt.state.items():
        total += _state_bytes(st)
        elems += p.numel()
    return total / elems if elems else 0.0


def min_traffic_bytes(opt: torch.optim.Optimizer) -> float:
    """Bytes one step must move at least (see the module docstring)."""
    total = 0.0
    for p, st in opt.state.items():
        total += 2 * p.numel() * p.element_size() + (p.grad.numel() * p.grad.element_size() if p.grad is not None else 0)
        total += 2 * _state_bytes(st)
    return total


def copy_bandwidth(device: str = "cpu", mib: int = 256, rounds: int = 5) -> float:
    """GB/s of a ``mib`` MiB tensor copy (read + write), the best of ``rounds``."""
    dev = torch.device(device)
    src = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        best = min(best, _timed_fn(lambda: dst.copy_(src), dev))
    return 2 * src.numel() * 4 / best / 1e9


def _timed_fn(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _timed(opt: torch.optim.Optimizer, device: torch.device) -> float:
    return _timed_fn(opt.step, device)


def resident_bytes() -> int:
    """The process's resident memory now (Linux; OSError elsewhere)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _resident_peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def step_peak_mib(step: Callable[[], object], device: torch.device) -> float:
    """MiB one call of ``step`` allocates above what is allocated before it (see the module docstring)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    if device.type != "cpu":  # another accelerator: its memory is not the process's resident set
        return float("nan")
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: hand cached free memory back, so reuse shows
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = resident_bytes()
    except OSError:  # not Linux / glibc: not measured
        return float("nan")
    step()
    return max(0, _resident_peak_bytes() - before) / 2 ** 20


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_one(name: str, paramset: str, device: str = "cpu", rounds: int = 30, warmup: int = 3) -> StepResult:
    label, make = CANDIDATES[name]
    dev = torch.device(device)
    ref_params, names = build(paramset, device)
    cand_params, _ = build(paramset, device)
    try:
        ref = torch.optim.AdamW(ref_params, lr=1e-4, foreach=True)
        cand = make(cand_params, names)
        for _ in range(warmup):
            ref.step()
            cand.step()
        with count_host_syncs() as syncs:
            cand.step()
        peak = step_peak_mib(cand.step, dev)
        ratios, ms, ref_ms = [], [], []
        for r in range(rounds):
            if r % 2 == 0:
                a = _timed(ref, dev)
                b = _timed(cand, dev)
            else:
                b = _timed(cand, dev)
                a = _timed(ref, dev)
            ratios.append(b / a)
            ms.append(b * 1e3)
            ref_ms.append(a * 1e3)
    except Exception as exc:  # an optional baseline that cannot run here is reported, not fatal
        return StepResult(name, label, paramset, device, float("nan"), float("nan"), float("nan"), float("nan"),
                          float("nan"), float("nan"), float("nan"), 0, f"{type(exc).__name__}: {exc}")
    traffic = min_traffic_bytes(cand)
    return StepResult(name, label, paramset, device, statistics.median(ratios), _percentile(ratios, 0.1),
                      _percentile(ratios, 0.9), statistics.median(ms), statistics.median(ref_ms),
                      state_bytes_per_element(cand), float(syncs.count), rounds, "", traffic,
                      traffic / (statistics.median(ms) / 1e3) / 1e9, peak)


def describe_set(paramset: str) -> str:
    params, _ = build(paramset)
    return f"{paramset}: {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.2f} M elements"


def markdown(results: list[StepResult], copy_gbps: Optional[float] = None) -> str:
    of_copy = f" (of copy, {copy_gbps:.1f} GB/s)" if copy_gbps else ""
    lines = ["| optimizer | set | step ratio vs AdamW foreach (median [p10, p90]) | ms/step | AdamW ms/step "
             f"| state B/elem | step peak MiB | host syncs/step | achieved GB/s{of_copy} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.label} | {r.paramset} | not run: {r.error} | | | | | | |")
            continue
        frac = f" ({r.achieved_gbps / copy_gbps:.0%})" if copy_gbps else ""
        lines.append(f"| {r.label} | {r.paramset} | {r.ratio_median:.3f} [{r.ratio_p10:.3f}, {r.ratio_p90:.3f}] | "
                     f"{r.ms_median:.2f} | {r.ref_ms_median:.2f} | {r.state_bytes_per_element:.3f} | "
                     f"{r.step_peak_mib:.0f} | {r.host_syncs_per_step:.0f} | {r.achieved_gbps:.1f}{frac} |")
    return "\n".join(lines)


def main(sets: list[str], names: list[str], device: str, rounds: int, json_path: Optional[str],
         progress: bool = True) -> list[StepResult]:
    results = []
    copy_gbps = copy_bandwidth(device, 256 if device.startswith("cuda") else 64)
    if progress:
        print(f"{device}: tensor copy {copy_gbps:.1f} GB/s", flush=True)
    for paramset in sets:
        if progress:
            print(describe_set(paramset), flush=True)
        for name in names:
            if name not in CANDIDATES:
                raise SystemExit(f"unknown benchmark candidate {name!r}; choose from {', '.join(CANDIDATES)}")
            res = run_one(name, paramset, device, rounds)
            if progress:
                status = res.error or f"ratio {res.ratio_median:.3f} [{res.ratio_p10:.3f}, {res.ratio_p90:.3f}]"
                print(f"  {name:26s} {status}", flush=True)
            results.append(res)
    print()
    print(markdown(results, copy_gbps))
    if json_path:
        with open(json_path, "w") as f:
            json.dump([{**asdict(r), "copy_gbps": copy_gbps} for r in results], f, indent=2)
    return results
