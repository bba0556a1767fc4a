"""The ``hina-kohya`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    print("hina-kohya demo: not yet available in this release.\n"
          "The demo (train a LyCORIS LoKr adapter on a small pretrained diffusion denoiser, Hina preset vs AdamW) "
          "arrives with the demo/benchmark milestone. What works today:\n"
          "  hina-kohya list                 the registered optimizers\n"
          "  hina-kohya bench step --quick   step time, state memory and host syncs against torch AdamW")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hina-kohya", description="Hina optimizers for kohya sd-scripts and LyCORIS")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small adapter with a Hina preset and with AdamW, side by side")
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
