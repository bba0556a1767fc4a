"""How optimizer state is stored: fp32, bf16, or blockwise 8-bit. Transforms never see this.

``state_precision``:

* ``"fp32"``: state in the compute dtype (fp32; fp64 for fp64 parameters).
* ``"bf16"``: 2 bytes per element; written back with stochastic rounding, so slow EMAs still
  decay in expectation (plain round-to-nearest would freeze ``v * 0.999`` in bf16).
* ``"8bit"``: blockwise dynamic quantization (Dettmers et al. 2022, "8-bit Optimizers via
  Block-wise Quantization", arXiv 2110.02861): per block of 256 values one fp32 absmax, and one
  byte per value indexing a 256-entry dynamic map (signed map for signed states, unsigned map for
  non-negative ones such as second moments). About 1.016 bytes per element per state.
  Tensors under ``min_quant_numel`` elements (4096 by default) stay in the compute dtype.

The 8-bit maps are built here (``dynamic_map``) and passed to bitsandbytes explicitly, so the codes
mean the same with the bitsandbytes kernels and with the pure-torch fallback: a checkpoint written
on one loads on the other. bitsandbytes is used when it imports and handles the device; otherwise
the pure-torch store is used, with one warning.

Layout in ``optimizer.state[p]`` for an 8-bit state ``key``: ``key`` holds uint8 codes with the
parameter's shape and ``key + ".absmax"`` the fp32 block maxima (shape ``[ceil(numel / 256)]``).
"""

from __future__ import annotations

import logging
import math
import warnings
import zlib
from typing import Any, Optional

import torch
from torch import Tensor

from .chain import StateSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "8bit")
BLOCK = 256
ABSMAX_SUFFIX = ".absmax"


def dynamic_map(signed: bool) -> Tensor:
    """The 256-entry dynamic (tree) quantization map, sorted ascending, on the CPU.

    Values are ``±10**-d * f``: for decade ``d = 6 .. 0`` the fraction ``f`` takes the midpoints of
    a uniform grid on ``[0.1, 1]`` whose number of intervals doubles with each decade towards 1
    (``2**k`` for the signed map, mirrored to negative values, ``2**(k+1)`` for the unsigned map,
    ``k = 0 .. 6``), plus 0 and 1: 256 values either way. Small magnitudes get relative precision,
    large ones get many levels. This equals bitsandbytes' ``create_dynamic_map`` (tested).
    """
    parts: list[Tensor] = []
    for k in range(7):
        intervals = 2 ** k if signed else 2 ** (k + 1)
        grid = torch.linspace(0.1, 1.0, intervals + 1, dtype=torch.float32)
        mids = ((grid[:-1] + grid[1:]) / 2.0) * (10.0 ** (k - 6))
        parts += [mids, -mids] if signed else [mids]
    parts.append(torch.tensor([0.0, 1.0]))
    table = torch.cat(parts)
    assert table.numel() == 256
    return torch.sort(table).values


class _Codebook:
    """Per-device caches of the two maps and of their midpoints (for the pure-torch search)."""

    def __init__(self) -> None:
        self._maps: dict[tuple[bool, torch.device], Tensor] = {}
        self._mids: dict[tuple[bool, torch.device], Tensor] = {}

    def map(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed).to(device)
        return self._maps[key]

    def mids(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, device)
        if key not in self._mids:
            m = self.map(signed, device)
            self._mids[key] = (m[1:] + m[:-1]) / 2
        return self._mids[key]


_CODEBOOK = _Codebook()


def _bnb_functional():
    """bitsandbytes.functional, or None when it cannot be imported."""
    try:
        import bitsandbytes.functional as F  # noqa: N812

        return F
    except Exception:  # pragma: no cover - depends on the environment
        return None


class Quantizer:
    """Blockwise 8-bit encode/decode with bitsandbytes, falling back to pure torch."""

    def __init__(self, backend: str = "auto") -> None:
        if backend not in ("auto", "bitsandbytes", "torch"):
            raise ValueError(f"quant_backend={backend!r}: use 'auto', 'bitsandbytes' or 'torch'")
        self.requested = backend
        self._bnb = None if backend == "torch" else _bnb_functional()
        if backend == "bitsandbytes" and self._bnb is None:
            raise ImportError("quant backend 'bitsandbytes' requested but bitsandbytes does not import")
        self._bnb_ok: dict[str, bool] = {}
        self._warned = False

    def backend_for(self, device: torch.device) -> str:
        if self._bnb is None:
            self._warn_once("bitsandbytes is not installed")
            return "torch"
        ok = self._bnb_ok.get(device.type)
        if ok is None:
            ok = self._probe(device)
            self._bnb_ok[device.type] = ok
        return "bitsandbytes" if ok else "torch"

    def _probe(self, device: torch.device) -> bool:
        """Does bitsandbytes run on this device? Runs once per device type, inside the first
        step, so it must not read values back (that would be a host sync): an unsupported device
        raises at launch. The kernels' results are checked by the test suite instead."""
        try:
            x = torch.linspace(-1, 1, 2 * BLOCK, device=device)
            codes, absmax = self._encode_bnb(x, True)
            self._decode_bnb(codes, absmax, True)
        except Exception as exc:  # unsupported device or broken build
            self._warn_once(f"bitsandbytes cannot quantize on {device.type} ({type(exc).__name__}: {exc})")
            return False
        return True

    def _warn_once(self, why: str) -> None:
        if not self._warned and self.requested != "torch":
            warnings.warn(f"hina_kohya 8-bit state: {why}; using the pure-torch blockwise store", stacklevel=4)
        self._warned = True

    # -- bitsandbytes ------------------------------------------------------------------------
    def _encode_bnb(self, x: Tensor, signed: bool, codes: Optional[Tensor] = None,
                    absmax: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        code = _CODEBOOK.map(signed, x.device)
        q, st = self._bnb.quantize_blockwise(x.contiguous(), code=code, absmax=absmax, out=codes, blocksize=BLOCK)
        return q, st.absmax

    def _decode_bnb(self, codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
        code = _CODEBOOK.map(signed, codes.device)
        return self._bnb.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK)

    # -- pure torch --------------------------------------------------------------------------
    @staticmethod
    def _encode_torch(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1).float()
        n = flat.numel()
        nblocks = max(1, math.ceil(n / BLOCK))
        padded = torch.nn.functional.pad(flat, (0, nblocks * BLOCK - n)).view(nblocks, BLOCK)
        absmax = padded.abs().amax(dim=1)
        normed = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        codes = torch.bucketize(normed, _CODEBOOK.mids(signed, x.device))
        return codes.view(-1)[:n].to(torch.uint8).view(x.shape), absmax

    @staticmethod
    def _decode_torch(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
        table = _CODEBOOK.map(signed, codes.device)
        n = codes.numel()
        vals = table[codes.reshape(-1).long()]
        nblocks = absmax.numel()
        vals = torch.nn.functional.pad(vals, (0, nblocks * BLOCK - n)).view(nblocks, BLOCK)
        return (vals * absmax.unsqueeze(1)).view(-1)[:n].view(codes.shape)

    # -- public ------------------------------------------------------------------------------
    def encode(self, x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
        if self.backend_for(x.device) == "bitsandbytes":
            return self._encode_bnb(x.float(), signed)
        return self._encode_torch(x, signed)

    def encode_into(self, x: Tensor, signed: bool, codes: Tensor, absmax: Tensor) -> None:
        if self.backend_for(x.device) == "bitsandbytes":
            self._encode_bnb(x.float(), signed, codes=codes, absmax=absmax)
            return
        c, a = self._encode_torch(x, signed)
        codes.copy_(c)
        absmax.copy_(a)

    def decode(self, codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
        if self.backend_for(codes.device) == "bitsandbytes":
            return self._decode_bnb(codes, absmax, signed).view(codes.shape)
        return self._decode_torch(codes, absmax, signed)

    def decode_into(self, codes: Tensor, absmax: Tensor, signed: bool, out: Tensor) -> None:
        """Decode into ``out`` (fp32, contiguous, ``codes.numel()`` elements). bitsandbytes' CPU
        backend has no ``out=`` variant, so the decoded tensor is copied: one tensor's worth of
        temporary memory at a time."""
        out.view(codes.shape).copy_(self.decode(codes, absmax, signed))


class Encoded:
    """An 8-bit state of this step, not decoded yet (``StateStore.read(..., lazy=True)``).

    The fused path decodes it one kernel call at a time into a reusable buffer (``decode_into``)
    and encodes the result back into the same codes and block maxima (``encode_from``), so a
    step never holds a whole 8-bit state in fp32 (which would make the step's peak memory
    larger than with fp32 state). ``decode()`` gives a fresh tensor for the other paths.
    """

    __slots__ = ("quantizer", "codes", "absmax", "signed", "dtype")

    def __init__(self, quantizer: Quantizer, codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype) -> None:
        self.quantizer, self.codes, self.absmax, self.signed, self.dtype = quantizer, codes, absmax, signed, dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def numel(self) -> int:
        return self.codes.numel()

    def decode(self) -> Tensor:
        return self.quantizer.decode(self.codes, self.absmax, self.signed).to(self.dtype)

    def decode_into(self, out: Tensor) -> None:
        """``out``: a contiguous buffer of ``numel()`` elements in the compute dtype (fp32)."""
        self.quantizer.decode_into(self.codes, self.absmax, self.signed, out)

    def encode_from(self, value: Tensor) -> None:
        self.quantizer.encode_into(value.view(self.codes.shape), self.signed, self.codes, self.absmax)


def stored_tensor(view: Any) -> Any:
    """The tensor kept in the optimizer state behind a view ``read`` returned (the codes of an
    ``Encoded`` state, else the view itself): what stays the same object from step to step."""
    return view.codes if isinstance(view, Encoded) else view


def _seed(base: int, step: int, index: int, key: str) -> int:
    """A deterministic 63-bit seed (Python's str hash is salted per process, crc32 is not)."""
    mixed = (base * 1_000_003 + step) * 1_000_033 + index
    return (mixed * 2_654_435_761 + zlib.crc32(key.encode())) % (2 ** 63 - 1)


class StateStore:
    """Creates, reads and writes the state tensors of one optimizer in its storage format."""

    def __init__(self, precision: str = "fp32", min_quant_numel: int = 4096, seed: int = 0,
                 quant_backend: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"state_precision={precision!r} is not supported: use one of {PRECISIONS}")
        self.precision = precision
        self.min_quant_numel = int(min_quant_numel)
        self.seed = int(seed)
        self.quantizer = Quantizer(quant_backend)
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- format --------------------------------------------------------------------------
    def format_of(self, spec: StateSpec, numel: int, compute_dtype: torch.dtype) -> str:
        """"plain" (compute dtype), "fp16", "bf16" or "8bit" for this state of a tensor of ``numel``."""
        if spec.fixed_format == "fp16" and compute_dtype != torch.float64:
            return "fp16"
        if spec.fixed_format is not None or not spec.quantizable or self.precision == "fp32" or compute_dtype == torch.float64:
            return "plain"
        if self.precision == "bf16":
            return "bf16"
        return "8bit" if numel >= self.min_quant_numel else "plain"

    def _shape(self, spec: StateSpec, p: Tensor) -> tuple[int, ...]:
        return tuple(spec.shape(p)) if spec.shape is not None else tuple(p.shape)

    # -- create --------------------------------------------------------------------------
    def create(self, state: dict, spec: StateSpec, p: Tensor, compute_dtype: torch.dtype) -> None:
        shape = self._shape(spec, p)
        if spec.init == "param":
            value = p.detach().to(compute_dtype, copy=True).reshape(shape)
        elif spec.init == "ones":
            value = torch.ones(shape, dtype=compute_dtype, device=p.device)
        elif isinstance(spec.init, (int, float)) and not isinstance(spec.init, bool):
            value = torch.full(shape, float(spec.init), dtype=compute_dtype, device=p.device)
        else:
            value = torch.zeros(shape, dtype=compute_dtype, device=p.device)
        self._put(state, spec, value, compute_dtype, step=0, index=0)

    def _put(self, state: dict, spec: StateSpec, value: Tensor, compute_dtype: torch.dtype,
             step: int, index: int) -> None:
        fmt = self.format_of(spec, value.numel(), compute_dtype)
        state.pop(spec.key + ABSMAX_SUFFIX, None)
        if fmt == "plain":
            state[spec.key] = value.to(compute_dtype)
        elif fmt == "fp16":
            state[spec.key] = value.to(torch.float16)
        elif fmt == "bf16":
            state[spec.key] = self.round_bf16(value.float(), _seed(self.seed, step, index, spec.key))
        else:
            codes, absmax = self.quantizer.encode(value, spec.signed)
            state[spec.key] = codes
            state[spec.key + ABSMAX_SUFFIX] = absmax

    # -- read / write each step ----------------------------------------------------------
    def read(self, state: dict, spec: StateSpec, compute_dtype: torch.dtype, keep_fp16: bool = False,
             lazy: bool = False) -> Any:
        """A compute-dtype tensor holding the state; for "plain" it is the state tensor itself, and
        with ``keep_fp16`` an fp16 state too (for kernels that cast on load and store). With
        ``lazy``, an 8-bit state comes back as an ``Encoded`` handle, decoded by the caller when
        and where it needs it."""
        stored = state[spec.key]
        absmax = state.get(spec.key + ABSMAX_SUFFIX)
        if absmax is not None:
            if lazy and compute_dtype == torch.float32:
                return Encoded(self.quantizer, stored, absmax, spec.signed, compute_dtype)
            return self.quantizer.decode(stored, absmax, spec.signed)
        if stored.dtype == compute_dtype or (keep_fp16 and stored.dtype == torch.float16):
            return stored
        return stored.to(compute_dtype)

    def write(self, state: dict, spec: StateSpec, value: Tensor, step: int, index: int) -> None:
        """Store ``value`` (the tensor returned by ``read``, updated in place) back. An
        ``Encoded`` handle was written back by ``encode_from`` where it was used."""
        stored = state[spec.key]
        if value is stored or isinstance(value, Encoded):
            return
        absmax = state.get(spec.key + ABSMAX_SUFFIX)
        if absmax is not None:
            self.quantizer.encode_into(value, spec.signed, stored, absmax)
        elif stored.dtype == torch.bfloat16 and value.dtype != torch.bfloat16:
            stored.copy_(self.round_bf16(value, _seed(self.seed, step, index, spec.key)))
        else:
            stored.copy_(value)

    # -- resume --------------------------------------------------------------------------
    def normalize(self, state: dict, spec: StateSpec, p: Tensor, compute_dtype: torch.dtype) -> None:
        """After a load: bring a stored state to this optimizer's format, device and dtype.

        Trainers (torch's own ``load_state_dict``, accelerate) cast every floating state to the
        parameter's dtype, which turns 8-bit codes into floats; codes are small integers, exact
        in any float format, so they are cast back losslessly. A checkpoint written with another
        ``state_precision`` is converted.
        """
        if spec.key not in state:
            return
        stored = state[spec.key].to(p.device)
        absmax = state.get(spec.key + ABSMAX_SUFFIX)
        if absmax is not None:
            codes = stored.round().clamp(0, 255).to(torch.uint8) if stored.dtype != torch.uint8 else stored
            value = self.quantizer.decode(codes, absmax.to(p.device, torch.float32), spec.signed)
            fmt = self.format_of(spec, value.numel(), compute_dtype)
            if fmt == "8bit":
                state[spec.key] = codes
                state[spec.key + ABSMAX_SUFFIX] = absmax.to(p.device, torch.float32)
                return
            self._put(state, spec, value, compute_dtype, 0, 0)
            return
        fmt = self.format_of(spec, stored.numel(), compute_dtype)
        if fmt == "plain":
            state[spec.key] = stored.to(compute_dtype)
        elif fmt == "fp16":
            state[spec.key] = stored.to(torch.float16)
        elif fmt == "bf16":
            state[spec.key] = stored if stored.dtype == torch.bfloat16 else stored.to(torch.bfloat16)
        else:
            self._put(state, spec, stored.to(compute_dtype), compute_dtype, 0, 0)

    # -- rounding ------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._generators[device] = gen
        return gen

    def round_bf16(self, x: Tensor, seed: int) -> Tensor:
        from .precision import stochastic_round_bf16

        gen = self.generator(x.device)
        gen.manual_seed(seed)
        return stochastic_round_bf16(x, gen)

    @staticmethod
    def nbytes(state: dict) -> int:
        """Bytes of every tensor in one parameter's state (what a checkpoint holds)."""
        return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
