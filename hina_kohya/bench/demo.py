"""``hina-kohya demo``: train the same LyCORIS adapter with a Hina preset and with AdamW, side by side.

The base is the shipped pretrained denoiser (``denoiser``); the task teaches it a concept it never
saw (``adapter_task``). Both runs start from the same adapter initialisation and see the same
batches, noise and timesteps (one seed); they differ only in the optimizer. The report gives the
held-out denoising loss at checkpoints, the steps each needed to reach AdamW's final held-out
loss, step times and optimizer memory, and writes (into ``--output``): ``loss_curve.png``,
``adapter_<run>.safetensors`` (LyCORIS format, loadable with ``create_lycoris_from_weights``),
``diagnostics_hina.json`` (the optimizer's ``log_dict()``), ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from . import adapter_task, denoiser

DEFAULT_PRESET = "lokr-sd"


@dataclass
class DemoOptions:
    preset: Optional[str] = None
    optimizer: Optional[str] = None
    algo: str = "lokr"
    steps: int = 300
    batch: int = 16
    lr: Optional[float] = None
    adamw_lr: Optional[float] = None
    device: str = "cpu"
    output: str = "hina-kohya-demo"
    seed: int = 0
    n_train: int = 64
    n_heldout: int = 128
    progress: bool = True
    force: bool = False
    fused: bool = False


class DemoError(ValueError):
    """A bad demo option; the message names the value and the fix."""


def check_device(text: str) -> torch.device:
    """``--device`` as a torch device, or a DemoError naming it and the fix."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise DemoError(f"--device {text!r} is not a torch device; use cpu or cuda ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DemoError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    return device


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None without matplotlib (the reports still
    hold every number)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _check(opts: DemoOptions) -> tuple[str, type, dict, torch.device]:
    """Validate options; return (label, optimizer class, its arguments, device)."""
    from .. import presets, registry

    if opts.preset and opts.optimizer:
        raise DemoError(f"--preset {opts.preset} and --optimizer {opts.optimizer} both given; choose one "
                        "(a preset names its optimizer and arguments; --optimizer uses that optimizer's defaults)")
    if opts.steps < 1:
        raise DemoError(f"--steps {opts.steps}: must be at least 1")
    if opts.batch < 1:
        raise DemoError(f"--batch {opts.batch}: must be at least 1")
    for name, lr in (("--lr", opts.lr), ("--adamw-lr", opts.adamw_lr)):
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise DemoError(f"{name} {lr}: must be a positive finite number, e.g. 1e-3")
    if opts.algo not in adapter_task.NETWORKS:
        raise DemoError(f"--algo {opts.algo}: choose one of {', '.join(adapter_task.NETWORKS)}")
    device = check_device(opts.device)
    if opts.optimizer:
        try:
            spec = registry.get_spec(opts.optimizer)
        except KeyError as exc:
            raise DemoError(f"--optimizer: {exc.args[0]}") from exc
        kwargs = {"lr": opts.lr if opts.lr is not None else 1e-3}
        return spec.name, spec.cls, kwargs, device
    name = opts.preset or DEFAULT_PRESET
    if name not in presets.list_presets():
        import difflib

        close = difflib.get_close_matches(name, presets.list_presets(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DemoError(f"--preset {name!r} is not a preset.{hint} See: hina-kohya presets list")
    cls, kwargs = presets.preset_class(name), dict(presets.load_preset(name))
    if opts.lr is not None:
        kwargs["lr"] = opts.lr
    return f"{name} ({cls.__name__})", cls, kwargs, device


OUTPUTS = ("report.json", "report.md", "loss_curve.png", "adapter_hina.safetensors", "adapter_adamw.safetensors",
           "diagnostics_hina.json")


def output_dir(path: str, outputs: tuple[str, ...], force: bool, option: str = "--output") -> Path:
    """Check an output folder before any work: a folder (or nothing yet) whose parent is a folder,
    holding none of ``outputs`` unless ``force`` -- a previous run's files are never overwritten
    silently."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DemoError(f"{option} {out}: exists and is not a folder; choose another path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DemoError(f"{option} {out}: {parent} is a file, not a folder; choose another path")
    previous = [name for name in outputs if (out / name).exists()]
    if previous and not force:
        raise DemoError(f"{option} {out}: holds {', '.join(previous)} from a previous run; pass --force to "
                        "overwrite them, or choose another folder")
    return out


def finite_or_none(obj):
    """JSON has no inf / nan: non-finite numbers become null (divergence is reported separately)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def run(opts: DemoOptions) -> dict:
    """Run the demo; return the report (also written to ``opts.output``)."""
    label, cls, kwargs, device = _check(opts)
    out = output_dir(opts.output, OUTPUTS, opts.force)
    base, tables, meta = denoiser.load_pretrained()
    data = adapter_task.make_data(tables, opts.n_train, opts.n_heldout, seed=opts.seed)
    eval_every = max(1, opts.steps // 10)
    adamw_lr = opts.adamw_lr if opts.adamw_lr is not None else kwargs["lr"]
    # the compiled kernels take longer to build on a CPU (~90 s on 2 cores) than they save over a
    # few hundred steps of a small adapter: the demo runs the same math eagerly unless asked
    kwargs = {**kwargs, "fused": opts.fused}
    runs = [("hina", label, kwargs["lr"], lambda groups: cls(groups, **kwargs)),
            ("adamw", "torch.optim.AdamW", adamw_lr,
             lambda groups: torch.optim.AdamW(groups, lr=adamw_lr, weight_decay=0.01))]
    results: dict[str, adapter_task.RunResult] = {}
    out.mkdir(parents=True, exist_ok=True)
    for key, run_label, lr, make in runs:
        bar = denoiser.progress_bar(opts.steps, f"{key:5s} {run_label}", opts.progress)

        def progress(step: int, loss: float, bar=bar) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        results[key], network = adapter_task.run_once(base, opts.algo, opts.seed, make, lr, data, opts.steps,
                                                      opts.batch, run_label, eval_every, device, progress)
        bar.close()
        dim, alpha, network_args = adapter_task.NETWORKS[opts.algo]
        network.save_weights(str(out / f"adapter_{key}.safetensors"), torch.float32,
                             {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
                              "ss_network_alpha": str(alpha), "ss_network_args": json.dumps(network_args),
                              "hina_kohya_demo_optimizer": run_label})
        del network
    report = _report(opts, label, kwargs, adamw_lr, meta, results)
    (out / "diagnostics_hina.json").write_text(
        json.dumps(finite_or_none(results["hina"].diagnostics), indent=2, sort_keys=True))
    (out / "report.md").write_text(markdown(report))
    report["written"] = [n for n in OUTPUTS if n != "loss_curve.png" or _plot(results, out / n)]
    (out / "report.json").write_text(json.dumps(finite_or_none(report), indent=2))
    return report


def _report(opts: DemoOptions, label: str, kwargs: dict, adamw_lr: float, meta: dict,
            results: dict[str, adapter_task.RunResult]) -> dict:
    target = results["adamw"].final
    runs = {}
    for key, r in results.items():
        runs[key] = {
            "optimizer": r.label,
            "curve": r.curve,
            "final_heldout": r.final,
            "diverged_at": r.diverged_at,
            "adapter_init_sha256": r.init_digest,
            "steps_to_adamw_final": r.steps_to(target),
            "train_step_ms_median": r.median_ms("step_s"),
            "optimizer_step_ms_median": r.median_ms("opt_step_s"),
            "first_step_ms": 1000 * r.opt_step_s[0] if r.opt_step_s else float("nan"),
            "optimizer_state_bytes": r.state_bytes,
            "adapter_params": r.params,
            "base_concepts_heldout_before": r.base_heldout_before,
            "base_concepts_heldout_after": r.base_heldout_after,
        }
    return {
        "options": asdict(opts),
        "hina_arguments": {k: v for k, v in kwargs.items()},
        "adamw_arguments": {"lr": adamw_lr, "weight_decay": 0.01},
        "task": {"base": "demo denoiser (diffusers UNet2DConditionModel, 32x32 RGB)",
                 "base_pretraining": {k: meta.get(k) for k in ("steps", "batch", "lr", "seed", "final_train_loss")},
                 "new_concept": "ring", "adapter": opts.algo, "train_images": opts.n_train,
                 "heldout_images": opts.n_heldout},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": opts.device},
        "runs": runs,
    }


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None:
        return "not reached"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    """The side-by-side table (also printed by the CLI)."""
    h, a = report["runs"]["hina"], report["runs"]["adamw"]
    rows = [("optimizer", h["optimizer"], a["optimizer"])]
    for (step, hv), (_, av) in zip(h["curve"], a["curve"]):  # aligned by step (adapter_task.train)
        if step == 0 or step == h["curve"][-1][0] or step % max(1, report["options"]["steps"] // 4) == 0:
            rows.append((f"held-out loss, step {step}", _fmt(hv), _fmt(av)))
    reach = ("AdamW diverged", "AdamW diverged") if a["diverged_at"] is not None else (
        _fmt(h["steps_to_adamw_final"]), _fmt(a["steps_to_adamw_final"]))
    rows += [
        ("diverged at step", _fmt(h["diverged_at"]) if h["diverged_at"] else "no",
         _fmt(a["diverged_at"]) if a["diverged_at"] else "no"),
        (f"steps to AdamW's final held-out loss (checked every {max(1, report['options']['steps'] // 10)})", *reach),
        ("base concepts held-out loss, before -> after", f"{h['base_concepts_heldout_before']:.4f} -> "
         f"{h['base_concepts_heldout_after']:.4f}", f"{a['base_concepts_heldout_before']:.4f} -> "
         f"{a['base_concepts_heldout_after']:.4f}"),
        ("train step, median ms", f"{h['train_step_ms_median']:.1f}", f"{a['train_step_ms_median']:.1f}"),
        ("optimizer.step, median ms", f"{h['optimizer_step_ms_median']:.2f}", f"{a['optimizer_step_ms_median']:.2f}"),
        ("first optimizer.step, ms", f"{h['first_step_ms']:.0f}", f"{a['first_step_ms']:.0f}"),
        ("optimizer state, KiB", f"{h['optimizer_state_bytes'] / 1024:.1f}", f"{a['optimizer_state_bytes'] / 1024:.1f}"),
        ("adapter parameters", str(h["adapter_params"]), str(a["adapter_params"])),
    ]
    lines = ["| | Hina | AdamW |", "|---|---|---|"] + [f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows]
    o = report["options"]
    head = (f"# hina-kohya demo\n\nLyCORIS {o['algo']} adapter on the demo denoiser, new concept "
            f"'{report['task']['new_concept']}', {o['steps']} steps, batch {o['batch']}, seed {o['seed']}, "
            f"device {o['device']}, Hina kernels {'fused (compiled)' if o['fused'] else 'eager'}. "
            f"Hina arguments: `{report['hina_arguments']}`; AdamW: "
            f"`{report['adamw_arguments']}`.\n\n")
    return head + "\n".join(lines) + "\n"


def _plot(results: dict[str, adapter_task.RunResult], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, r in results.items():
        ax.plot([s for s, _ in r.curve], [v for _, v in r.curve], marker="o", label=r.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out denoising loss (new concept)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
