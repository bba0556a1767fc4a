"""``python -m hina_kohya.launch <script.py> <args>``: run an sd-scripts training script with the
short optimizer names installed, for scripts that load no network module (fine_tune.py,
sdxl_train.py, flux_train.py, ...). Also ``accelerate launch -m hina_kohya.launch <script.py> ...``.

The script runs as ``__main__`` with its own directory first on ``sys.path``, as ``python
<script.py>`` would run it (INTEGRATION.md §2.2, launcher).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

USAGE = "usage: python -m hina_kohya.launch <sd-scripts training script.py> [its arguments ...]"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = argv[0]
    if not script.endswith(".py") or not os.path.isfile(script):
        print(f"hina_kohya.launch: {script!r} is not a Python script file. {USAGE}", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(script))
    if not os.path.isfile(os.path.join(folder, "library", "train_util.py")):
        print(f"hina_kohya.launch: {script!r} does not sit in an sd-scripts checkout (no library/train_util.py in "
              f"{folder}). Pass a training script from the sd-scripts folder.", file=sys.stderr)
        return 2
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, folder)
    try:
        import library.train_util  # noqa: F401  (sd-scripts' module, found through the script's folder)
    except ImportError as exc:
        print(f"hina_kohya.launch: sd-scripts' library.train_util does not import ({exc}): a dependency of "
              "sd-scripts is missing in this environment; install them (pip install -r requirements.txt in the "
              "sd-scripts folder).", file=sys.stderr)
        return 2
    from .kohya import install

    install()
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
