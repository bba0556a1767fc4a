"""Re-create the demo's pretrained base denoiser (hina_kohya/bench/data/demo_denoiser.safetensors).

    python scripts/pretrain_demo_denoiser.py [--steps N] [--output PATH]

Trains diffusers' UNet2DConditionModel at toy size (hina_kohya.bench.denoiser.UNET_CONFIG) on the
deterministic shapes of hina_kohya.bench.shapes.BASE_CONCEPTS -- never on the demo's new concept --
with AdamW, and writes fp16 weights plus the conditioning tables. Everything is drawn from --seed;
on the same torch build the file comes out the same.
"""

import argparse
import sys
from pathlib import Path

from hina_kohya.bench import denoiser


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=denoiser.WEIGHTS)
    args = ap.parse_args()
    info = denoiser.pretrain(args.output, args.steps, args.batch, args.lr, args.seed)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB); {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
