"""The demo's base model: a small pretrained diffusion denoiser, shipped as package data.

The network is diffusers' ``UNet2DConditionModel`` at toy size (32x32 RGB pixels, no VAE), so
its blocks carry the class names LyCORIS targets (``Transformer2DModel``, ``ResnetBlock2D``, ...)
and an adapter trained on it is a real LyCORIS adapter. It predicts the noise ``eps`` of a DDPM
forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239):
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, loss ``mean((eps_theta(x_t, t, c) - eps)^2)``
with the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672; diffusers'
``squaredcos_cap_v2``) over 1000 steps.

Conditioning ``c`` stands in for a text encoder: ``[n, 3, CROSS_DIM]`` tokens -- two for the
concept, one for the colour -- taken from fixed random tables (seeded; stored with the weights).
The new concept of the demo has its own token pair from the start, which the base never saw
during pretraining (like a new trigger word in a LoRA dataset).

The weights (``data/demo_denoiser.safetensors``, fp16) are produced by
``scripts/pretrain_demo_denoiser.py``, which calls ``pretrain`` here; re-running it reproduces them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import shapes

WEIGHTS = Path(__file__).parent / "data" / "demo_denoiser.safetensors"
SIZE = 32
CROSS_DIM = 32
TIMESTEPS = 1000

UNET_CONFIG = dict(
    sample_size=SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    # attention at the 8x8 level and in the middle only: at 16x16 it doubles the step time
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)


def need_diffusers():
    """Import diffusers, or fail with the install command."""
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        raise ImportError("the demo and the adapter benchmarks need diffusers: pip install 'hina-kohya[demo]' "
                          f"(or pip install diffusers) ({exc})") from exc
    return diffusers


def build_unet(seed: int = 0):
    """A freshly initialised denoiser (``UNET_CONFIG``), deterministic in ``seed`` (the global
    random state is left as it was)."""
    diffusers = need_diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return diffusers.UNet2DConditionModel(**UNET_CONFIG)


def token_tables(seed: int = 1234) -> dict[str, Tensor]:
    """The fixed conditioning tables: ``concept`` ``[len(CONCEPTS), 2, CROSS_DIM]`` and ``color``
    ``[len(COLORS), 1, CROSS_DIM]``, standard normal entries, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    concept = torch.randn(len(shapes.CONCEPTS), 2, CROSS_DIM, generator=g)
    color = torch.randn(len(shapes.COLORS), 1, CROSS_DIM, generator=g)
    return {"concept": concept, "color": color}


def conditioning(tables: dict[str, Tensor], concepts: list[str], colors: list[str]) -> Tensor:
    """``[n, 3, CROSS_DIM]``: the concept's two tokens and the colour's token per image."""
    ci = torch.tensor([shapes.CONCEPTS.index(c) for c in concepts])
    ki = torch.tensor([shapes.COLORS.index(c) for c in colors])
    return torch.cat([tables["concept"][ci], tables["color"][ki]], dim=1)


def scheduler():
    return need_diffusers().DDPMScheduler(num_train_timesteps=TIMESTEPS, beta_schedule="squaredcos_cap_v2")


def noise_loss(unet, sched, x0: Tensor, cond: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Mean squared error of the predicted noise (the standard DDPM epsilon objective)."""
    xt = sched.add_noise(x0, noise, t)
    return torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)


def load_pretrained(path: Optional[Path] = None):
    """The shipped base denoiser (frozen, eval mode) and its conditioning tables."""
    from safetensors.torch import load_file, safe_open

    path = Path(path or WEIGHTS)
    if not path.is_file():
        raise FileNotFoundError(f"demo denoiser weights not found at {path}; re-create them with "
                                "python scripts/pretrain_demo_denoiser.py")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("unet_config", "{}")) != json.loads(json.dumps(UNET_CONFIG)):
        raise ValueError(f"{path} was made for another denoiser configuration; re-create it with "
                         "python scripts/pretrain_demo_denoiser.py")
    sd = load_file(str(path))
    tables = {k.split(".", 1)[1]: v.float() for k, v in sd.items() if k.startswith("tokens.")}
    unet = build_unet()
    unet.load_state_dict({k.split(".", 1)[1]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    unet.requires_grad_(False).eval()
    return unet, tables, meta


def pretrain(output: Path, steps: int = 2500, batch: int = 32, lr: float = 2e-3, seed: int = 0,
             progress: bool = True) -> dict:
    """Train the base denoiser on ``shapes.BASE_CONCEPTS`` (fresh images every step, drawn from
    ``seed``) with AdamW and a cosine learning-rate decay; save fp16 weights, the token tables and
    a description to ``output``. Returns the description (also in the file's metadata)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = build_unet(seed)
    tables = token_tables()
    sched = scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))  # noqa: E731
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    bar = progress_bar(steps, "pretraining the demo denoiser", progress)
    for step in range(steps):
        x0, names, colors = shapes.sample(shapes.BASE_CONCEPTS, batch, SIZE, seed=seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, TIMESTEPS, (batch,), generator=g)
        loss = noise_loss(unet, sched, x0, conditioning(tables, names, colors), noise, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched_lr.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    bar.close()
    info = {"unet_config": json.dumps(UNET_CONFIG), "concepts": json.dumps(list(shapes.BASE_CONCEPTS)),
            "steps": str(steps), "batch": str(batch), "lr": str(lr), "seed": str(seed),
            "final_train_loss": f"{sum(losses[-100:]) / len(losses[-100:]):.5f}",
            "torch": torch.__version__, "diffusers": need_diffusers().__version__}
    sd = {f"unet.{k}": v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    sd.update({f"tokens.{k}": v.to(torch.float16).contiguous() for k, v in tables.items()})
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(output), metadata=info)
    return info


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, show: bool):
    """A tqdm progress bar when tqdm is installed and ``show`` is set, else a silent stand-in."""
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=True)
