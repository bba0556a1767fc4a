"""The ``hina-kohya`` command."""

from __future__ import annotations

import argparse
import sys
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hina-kohya", description="Hina optimizers for kohya sd-scripts and LyCORIS")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small adapter with a Hina preset and with AdamW, side by side")
    demo.set_defaults(func=_cmd_demo)

    lst = sub.add_parser("list", help="list the registered optimizers")
    lst.set_defaults(func=_cmd_list)

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
