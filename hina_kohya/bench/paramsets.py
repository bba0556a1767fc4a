"""Parameter sets shaped like real adapters, with LyCORIS / sd-scripts names.

Shapes follow the public SD1.5 / SDXL U-Net layouts (channel widths 320/640/1280, cross-attention
context 768 / 2048, GEGLU feed-forward 4x with doubled projection); only the adapter parameters
are built, so sets are small enough for a CPU benchmark.
"""

from __future__ import annotations

from typing import Iterator

import torch

# (prefix, width, transformer depth) of each Transformer2DModel, in U-Net order
_SD15_ATTN = ([("down_blocks_%d_attentions_%d" % (b, i), w, 1) for b, w in enumerate((320, 640, 1280)) for i in range(2)]
              + [("mid_block_attentions_0", 1280, 1)]
              + [("up_blocks_%d_attentions_%d" % (b, i), w, 1) for b, w in ((1, 1280), (2, 640), (3, 320))
                 for i in range(3)])
_SDXL_ATTN = ([("down_blocks_%d_attentions_%d" % (b, i), w, d) for b, w, d in ((1, 640, 2), (2, 1280, 10))
               for i in range(2)]
              + [("mid_block_attentions_0", 1280, 10)]
              + [("up_blocks_%d_attentions_%d" % (b, i), w, d) for b, w, d in ((0, 1280, 10), (1, 640, 2))
                 for i in range(3)])


def _attention_linears(attn: list, context: int) -> Iterator[tuple[str, int, int]]:
    """(module key, in_features, out_features) of every adapted Linear in the transformer blocks."""
    for prefix, w, depth in attn:
        yield f"lora_unet_{prefix}_proj_in", w, w
        for k in range(depth):
            blk = f"lora_unet_{prefix}_transformer_blocks_{k}"
            for a, ctx in (("attn1", w), ("attn2", context)):
                yield f"{blk}_{a}_to_q", w, w
                yield f"{blk}_{a}_to_k", ctx, w
                yield f"{blk}_{a}_to_v", ctx, w
                yield f"{blk}_{a}_to_out_0", w, w
            yield f"{blk}_ff_net_0_proj", w, 8 * w
            yield f"{blk}_ff_net_2", 4 * w, w
        yield f"lora_unet_{prefix}_proj_out", w, w


def _sd15_convs() -> Iterator[tuple[str, int, int]]:
    """(module key, in_channels, out_channels) of the 3x3 convs LoCon adapts: 22 ResNet blocks
    (two convs each) and 3 down- / 3 up-samplers -- 50 convs."""
    chans = [(320, 320), (320, 320), (320, 640), (640, 640), (640, 1280), (1280, 1280), (1280, 1280), (1280, 1280)]
    for i, (cin, cout) in enumerate(chans):
        for c in (1, 2):
            yield f"lora_unet_down_blocks_{i // 2}_resnets_{i % 2}_conv{c}", cin if c == 1 else cout, cout
    for i in range(2):
        for c in (1, 2):
            yield f"lora_unet_mid_block_resnets_{i}_conv{c}", 1280, 1280
    ups = [(2560, 1280)] * 3 + [(2560, 1280), (2560, 1280), (1920, 1280)] + [(1920, 640), (1280, 640), (960, 640)] \
        + [(960, 320), (640, 320), (640, 320)]
    for i, (cin, cout) in enumerate(ups):
        for c in (1, 2):
            yield f"lora_unet_up_blocks_{i // 3}_resnets_{i % 3}_conv{c}", cin if c == 1 else cout, cout
    for i, ch in enumerate((320, 640, 1280)):
        yield f"lora_unet_down_blocks_{i}_downsamplers_0_conv", ch, ch
    for i, ch in enumerate((1280, 1280, 640)):
        yield f"lora_unet_up_blocks_{i}_upsamplers_0_conv", ch, ch


def _lora(named: list, key: str, d_in: int, d_out: int, rank: int, kernel: int = 0) -> None:
    down = (rank, d_in, kernel, kernel) if kernel else (rank, d_in)
    up = (d_out, rank, 1, 1) if kernel else (d_out, rank)
    named.append((f"{key}.lora_down.weight", down))
    named.append((f"{key}.lora_up.weight", up))


def _factor(n: int, f: int) -> tuple[int, int]:
    """LyCORIS-style factorization n = a * b with a <= f, a as large as possible."""
    for a in range(min(f, n), 0, -1):
        if n % a == 0:
            return a, n // a
    return 1, n


def _lokr(named: list, key: str, d_in: int, d_out: int, rank: int, factor: int, kernel: int = 0) -> None:
    out_l, out_k = _factor(d_out, factor)
    in_m, in_n = _factor(d_in, factor)
    named.append((f"{key}.lokr_w1", (out_l, in_m)))
    if rank < max(out_k, in_n) / 2:
        named.append((f"{key}.lokr_w2_a", (out_k, rank)))
        named.append((f"{key}.lokr_w2_b", (rank, in_n * kernel * kernel if kernel else in_n)))
    else:
        named.append((f"{key}.lokr_w2", (out_k, in_n, kernel, kernel) if kernel else (out_k, in_n)))


def shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter name, shape) of a named set: sd15, sdxl, lokr, or tiny (for smoke tests)."""
    named: list = []
    if name == "sd15":
        for key, i, o in _attention_linears(_SD15_ATTN, 768):
            _lora(named, key, i, o, 16)
        for key, i, o in _sd15_convs():
            _lora(named, key, i, o, 8, kernel=3)
    elif name == "sdxl":
        for key, i, o in _attention_linears(_SDXL_ATTN, 2048):
            _lora(named, key, i, o, 16)
    elif name == "lokr":
        for key, i, o in _attention_linears(_SD15_ATTN, 768):
            _lokr(named, key, i, o, 16, 8)
        for key, i, o in _sd15_convs():
            _lokr(named, key, i, o, 8, 8, kernel=3)
    elif name == "tiny":
        for key, i, o in list(_attention_linears(_SD15_ATTN[:1], 768))[:6]:
            _lora(named, key, i // 8, o // 8, 4)
    else:
        raise ValueError(f"unknown parameter set {name!r}: use sd15, sdxl, lokr or tiny")
    return named


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Parameters (with fixed random gradients) and their names."""
    gen = torch.Generator().manual_seed(seed)
    names, params = [], []
    for n, shape in shapes(name):
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device, dtype)
        names.append(n)
        params.append(p)
    return params, names
