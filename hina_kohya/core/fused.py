"""The fused path: one compiled kernel per tensor, generated from the chain's per-tensor math.

``Transform.math`` is the readable single-tensor version of each technique (tensor ops only,
step counter and hyperparameters as 0-d tensors, no Python branch on values). Composed by
``chain.tensor_step`` it is the whole step of one tensor; ``torch.compile`` (inductor: C++ on the
CPU, Triton on GPUs) turns it into a few fused loops -- the reductions in one read of the tensors,
the update, moments and write-back in another -- instead of the ~20 separate memory passes of the
list-wise eager path. No technique is written a second time: the kernel *is* the reference path.

Tensors are passed as matrix aliases ``[dim 0, the rest]`` of their storage (dynamic sizes,
``kernel_view``), so one compiled graph serves every parameter shape. If compilation is
unavailable (no C++ compiler, an unsupported platform) the optimizer falls back to the eager
list-wise path with one warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .chain import Chain, Slot, tensor_step

log = logging.getLogger(__name__)

ENV = "HINA_KOHYA_FUSED"
CHUNK_ENV = "HINA_KOHYA_FUSED_CHUNK"


def fused_default() -> bool:
    """The default of ``fused=None``: on, unless the environment variable says 0/false/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Layout:
    """Where each number sits in the one scalar vector a kernel call receives: the step, the
    per-tensor rate, decay and mask-unit factors, then the group's numeric hyperparameters
    (tuples such as betas unpacked). Built per param group; fixed while the group is."""

    FIXED = ("t", "rate", "decay", "mask_scale")

    def __init__(self, hp: dict) -> None:
        self.entries: list[tuple[str, int]] = []  # (hp key, width) -- width 0 for a scalar
        for k, v in hp.items():
            if isinstance(v, bool) or k in ("params", "param_names", "named"):
                continue
            if isinstance(v, (int, float)):
                self.entries.append((k, 0))
            elif isinstance(v, tuple) and v and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v):
                self.entries.append((k, len(v)))

    def values(self, hp: dict) -> list[float]:
        out: list[float] = []
        for k, width in self.entries:
            out.extend([float(hp[k])] if width == 0 else [float(e) for e in hp[k]])
        return out

    def unpack(self, vec: Tensor) -> tuple[dict, dict]:
        fixed = {name: vec[i] for i, name in enumerate(self.FIXED)}
        hp: dict[str, Any] = {}
        i = len(self.FIXED)
        for k, width in self.entries:
            if width == 0:
                hp[k] = vec[i]
                i += 1
            else:
                hp[k] = tuple(vec[i + j] for j in range(width))
                i += width
        return fixed, hp


_KERNELS: dict[tuple, Callable] = {}

#: inductor settings per device type. On the CPU, intermediates read by two or more later loops
#: are stored instead of recomputed in each (the default is four): the recipes' chains of
#: dependent reductions (CAME's statistics, RMS caps, the finite check) otherwise recompute the
#: whole chain in every loop -- measured 27 -> 15 ms for Automagic_CameAMP on 8 x [16, 12800].
INDUCTOR_OPTIONS: dict[str, dict] = {"cpu": {"realize_reads_threshold": 2}}


def _signature(chain: Chain, layout: Layout, keys: tuple[str, ...]) -> tuple:  # noqa: D401
    """Kernels depend only on the transforms' types and settings, the layout and the state keys;
    optimizers with the same recipe share one compiled kernel (dynamo caches at most a few
    variants per function: one closure per optimizer would exhaust that and fall back to eager)."""
    return tuple(_describe(t) for t in chain.transforms), tuple(layout.entries), keys


def _describe(obj: Any) -> Any:
    """A hashable structural description of a transform and its settings (wrapped transforms,
    lists of strategies included), so that equal recipes map to one kernel."""
    if isinstance(obj, (list, tuple)):
        return tuple(_describe(o) for o in obj)
    if isinstance(obj, dict):
        return tuple(sorted((k, _describe(v)) for k, v in obj.items()))
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return (type(obj).__module__, type(obj).__qualname__, _describe(vars(obj)))
    try:
        hash(obj)
        return obj
    except TypeError:
        return (type(obj).__qualname__, id(obj))


def chunk_size() -> int:
    """Tensors per kernel call (``HINA_KOHYA_FUSED_CHUNK``, default 8). Larger chunks cut the
    per-call overhead (guards, wrappers) and lengthen the one-time compile."""
    try:
        return max(1, int(os.environ.get(CHUNK_ENV, "8")))
    except ValueError:
        return 8


def make_kernel(chain: Chain, layout: Layout, keys: tuple[str, ...], k: int = 1,
                skip_nonfinite: bool = True, extra_keys: tuple[str, ...] = (),
                static: Optional[tuple] = None, device_type: str = "cpu") -> Callable:
    """A compiled step for ``k`` tensors at once. Inputs, one entry per tensor: the parameter's
    ``kernel_view`` (written in place), the gradient's, the states in ``keys`` order, a row of
    numbers (``layout``; the rate column already holds any data-dependent rate factor) in one
    ``[k, n]`` tensor, and the 0-d per-tensor values of ``Bucket.extras`` in ``extra_keys`` order
    (or None). ``static``: the transforms' ``static_keys`` shared by the chunk's tensors (the
    kernel is specialised). ``device_type`` picks the ``INDUCTOR_OPTIONS``."""
    sig = (_signature(chain, layout, keys), k, skip_nonfinite, extra_keys, static, device_type)
    if sig not in _KERNELS:
        _KERNELS[sig] = _compile(list(chain.transforms), layout, keys, len(_KERNELS), skip_nonfinite, extra_keys,
                                 static, device_type)
    return _KERNELS[sig]


def _compile(transforms: list, layout: Layout, keys: tuple[str, ...], serial: int, skip_nonfinite: bool,
             extra_keys: tuple[str, ...] = (), static: Optional[tuple] = None, device_type: str = "cpu") -> Callable:
    def kernel(ps: list, gs: list, states: list, vecs: Tensor,
               extras: Optional[list] = None) -> tuple[Tensor, Tensor]:
        kept, skipped = [], []
        for j in range(len(ps)):  # unrolled by dynamo: one graph for the whole chunk
            fixed, hp = layout.unpack(vecs[j])
            x = Slot(ps[j], gs[j], dict(zip(keys, states[j])), fixed["t"], hp, None, fixed["rate"], fixed["decay"],
                     fixed["mask_scale"])
            if extras is not None:
                x.extra = dict(zip(extra_keys, extras[j]))
            # skip_nonfinite=False compiles the skipping step with a flag that is always true: the
            # graph without the skip trips an inductor CPU bug (torch 2.13, KeyError in outer-loop
            # fusion with a local buffer) for the CAME recipes; the flag cannot be folded away
            never = None if skip_nonfinite else fixed["t"] > 0  # the step counter starts at 1
            ps[j].copy_(tensor_step(transforms, x, True, static, never))
            kept.append(x.scratch.get("cautious_kept", torch.zeros((), dtype=ps[j].dtype, device=ps[j].device)))
            skipped.append(x.scratch["skipped"])
        return torch.stack(kept), torch.stack(skipped)

    # dynamo keeps its compiled variants per *code object*, at most 8 (recompile_limit) before it
    # silently runs the function eagerly; every recipe, chunk size and dtype adds variants, so each
    # kernel gets a code object of its own
    kernel.__code__ = kernel.__code__.replace(co_name=f"hina_kernel_{serial}")
    return torch.compile(kernel, dynamic=True, options=INDUCTOR_OPTIONS.get(device_type))


def shape_class(t: Tensor) -> tuple[bool, ...]:
    """What a compiled kernel specialises on besides the length: inductor picks different loops
    for reductions over more than 4096 elements and dynamo specialises dims of size 1. The
    factored statistics (CAME) reduce over the rows and the columns of the matrix view
    ``[dim 0, the rest]`` (``[1, numel]`` for 1-D tensors), so those count too."""
    n = t.numel()
    rows = t.shape[0] if t.dim() >= 2 else 1
    cols = n // max(rows, 1)
    return n > 4096, rows == 1, cols == 1, rows > 4096, cols > 4096


def chunks(classes: list, sizes: list[int], k: int) -> list[list[int]]:
    """Indices grouped into chunks of ``k`` tensors of one ``shape_class`` (mixing classes would
    multiply compiled variants -- one per combination -- past dynamo's limit of 8 per kernel,
    after which it silently runs eagerly); the remainder of each class goes one tensor per
    call. Within a class, tensors are ordered by size."""
    out: list[list[int]] = []
    for cls in sorted(set(classes), key=repr):  # classes may hold None: order by their text
        idx = sorted((i for i, c in enumerate(classes) if c == cls), key=lambda i: sizes[i])
        full = len(idx) - len(idx) % k
        out += [idx[j:j + k] for j in range(0, full, k)]
        out += [[i] for i in idx[full:]]
    return out


def hp_tensors(hp: dict, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """For the eager per-tensor path: the group's numbers as 0-d tensors (tuples of numbers as
    tuples of tensors), laid out as ``Layout`` lays them out for the kernel."""
    layout = Layout(hp)
    vec = torch.tensor([0.0] * len(Layout.FIXED) + layout.values(hp), dtype=dtype, device=device)
    return layout.unpack(vec)[1]


def kernel_view(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """The alias of a tensor a kernel receives, sharing its storage (in-place writes land in the
    original). Tensors shaped like the parameter ``like`` become its matrix view ``[dim 0, the
    rest]`` (1-D tensors stay 1-D): one compiled graph serves every shape (the sizes are
    symbolic), and per-row / per-column statistics (CAME, row scaling) broadcast along real
    loop dimensions -- on a flat alias every such broadcast costs a division per element and
    stops vectorisation (measured 2-4x slower on CPU). ``view(...).detach()`` is not a view
    object, so dynamo does not guard on (and recompile for) each original shape; detaching also
    stops dynamo from treating an ``nn.Parameter`` as static-shaped. 0-d statistics become
    1-element aliases; other shapes pass through detached."""
    if t is None:
        return None
    if t.dim() == 0:
        # 0-d state as a 1-element alias: torch.compile (2.13) turns 0-d float64 inputs into
        # scalars and drops in-place updates to them
        return t.detach().view(1).detach()
    if t.shape != like.shape:
        return t.detach()
    if not t.is_contiguous():
        raise ValueError("fused kernels need contiguous tensors")
    if t.dim() == 1:  # already its own [1, n] view: a 2-D alias would be ambiguous with its column statistic
        return t.detach().view(-1).detach()
    return t.detach().view(t.shape[0], t.numel() // max(t.shape[0], 1)).detach()
