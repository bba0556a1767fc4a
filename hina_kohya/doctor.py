"""``hina-kohya doctor``: what this environment has, and whether parameter names will reach the
optimizer. Read-only: it imports packages to read their versions and never changes a file."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import subprocess
from pathlib import Path
from typing import Optional

import torch

# network modules whose optimizer groups carry names (ours), and the ones that do not
NAMED = "hina_kohya.networks."
UNNAMED = {"lycoris.kohya": "hina_kohya.networks.lycoris", "networks.lora": "hina_kohya.networks.lora",
           "networks.lora_flux": "hina_kohya.networks.lora_flux", "networks.lora_sd3": "hina_kohya.networks.lora_sd3",
           "networks.lora_lumina": "hina_kohya.networks.lora_lumina",
           "networks.lora_anima": "hina_kohya.networks.lora_anima",
           "networks.lora_hunyuan_image": "hina_kohya.networks.lora_hunyuan_image",
           "networks.dylora": "hina_kohya.networks.dylora"}


def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def bitsandbytes_backend() -> str:
    """What will encode and decode 8-bit state on this machine: bitsandbytes' kernels, or the
    compiled torch lookup codec (the CPU default: faster than bitsandbytes' CPU kernels)."""
    from .core.quant import Quantizer

    q = Quantizer("auto")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return ", ".join(f"{d.type}: {q.codec_for(d)}" for d in devices)


def sd_scripts_report(folder: str) -> list[tuple[str, str]]:
    root = Path(folder)
    tu = root / "library" / "train_util.py"
    if not tu.is_file():
        return [("sd-scripts", f"{folder}: not an sd-scripts checkout (no library/train_util.py); pass the folder "
                               "that holds train_network.py")]
    rows = [("sd-scripts", str(root))]
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--tags"], capture_output=True,
                             text=True, timeout=10)
        rows.append(("sd-scripts revision", rev.stdout.strip() or "unknown (not a git checkout)"))
    except (OSError, subprocess.SubprocessError):
        rows.append(("sd-scripts revision", "unknown (git not available)"))
    text = tu.read_text(encoding="utf-8", errors="replace")
    rows.append(("sd-scripts patched", "yes (hina_kohya lines in library/train_util.py)" if "hina_kohya" in text
                 else "no (fine: the wrapper network modules and the launcher need no patch)"))
    return rows


def names_report(network_module: str) -> tuple[str, str]:
    if network_module.startswith(NAMED):
        try:
            importlib.import_module(network_module)
        except ImportError as exc:
            return "names", f"{network_module}: cannot be imported here ({exc})"
        return "names", f"{network_module}: yes, every group carries param_names and no-decay groups are split"
    better = UNNAMED.get(network_module)
    if better:
        return "names", (f"{network_module}: no, its groups carry no names (LoRA/LoKr-aware features stay off); "
                         f"use --network_module {better}")
    return "names", f"{network_module}: unknown module; names reach the optimizer only if its groups carry param_names"


def report(sd_scripts: Optional[str] = None, network_module: Optional[str] = None) -> list[tuple[str, str]]:
    rows = [("hina-kohya", _version("hina-kohya") or "not installed as a package (running from a source tree)"),
            ("torch", f"{torch.__version__} (CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'})")]
    bnb = _version("bitsandbytes")
    rows.append(("bitsandbytes", f"{bnb}; 8-bit state backend {bitsandbytes_backend()}" if bnb
                 else "not installed: 8-bit state uses the torch lookup codec everywhere, the CPU's default anyway "
                      "(pip install bitsandbytes for its GPU kernels)"))
    for dist, why in (("lycoris-lora", "needed by hina_kohya.networks.lycoris"), ("accelerate", "sd-scripts' trainer"),
                      ("diffusers", "the demo"), ("transformers", "benchmarks")):
        v = _version(dist)
        rows.append((dist, v if v else f"not installed ({why})"))
    if sd_scripts:
        rows.extend(sd_scripts_report(sd_scripts))
    if network_module:
        rows.append(names_report(network_module))
    return rows
