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
mean the same with the bitsandbytes kernels and with the pure-torch codec: a checkpoint written
with one loads with the other.

Who encodes and decodes (``quant_backend``): ``"auto"`` uses bitsandbytes' kernels on accelerators
and the pure-torch *lookup codec* on the CPU; ``"bitsandbytes"`` uses bitsandbytes everywhere,
``"torch"`` the lookup codec everywhere. Where bitsandbytes does not import or run, the lookup codec
is used, with one warning. The lookup codec (``lookup_encode`` / ``lookup_decode``, compiled with
torch.compile, several states per call) finds each scaled value's nearest map entry from the
float's exponent and top 8 mantissa bits -- one table read and one comparison -- instead of a
search over the map: the nearest-value codes of ``torch.bucketize`` over the map's midpoints,
bit for bit. On the 2-core CPU it encodes at ~1.0 ns per element against bitsandbytes' 4.6 ns
(docs/BENCHMARKS.md). Where it cannot compile, bitsandbytes (or the lookup run eagerly) takes over.

Layout in ``optimizer.state[p]`` for an 8-bit state ``key``: ``key`` holds uint8 codes with the
parameter's shape and ``key + ".absmax"`` the fp32 block maxima (shape ``[ceil(numel / 256)]``).
"""

from __future__ import annotations

import logging
import math
import types
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


#: The encoder's lookup buckets: the magnitudes whose float32 bits agree above bit ``_SHIFT``
#: (same exponent, same top ``23 - _SHIFT`` mantissa bits), from 2**-24 (every smaller magnitude
#: falls in the first bucket; the smallest midpoint between entries of either map is ~1.6e-7 =
#: 2**-22.6) to 1.0. A bucket spans a relative width of 2**-8 = 0.39 %, under the narrowest
#: relative spacing of consecutive midpoints (0.53 %, near the top of the unsigned map), so it
#: holds at most one midpoint (checked when the tables are built).
_SHIFT = 15
_LOOKUP_FLOOR = 2.0 ** -24


def _float_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


_LOOKUP_FIRST = _float_bits(_LOOKUP_FLOOR) >> _SHIFT
_LOOKUP_BUCKETS = (_float_bits(1.0) >> _SHIFT) - _LOOKUP_FIRST + 1


def lookup_tables(signed: bool) -> tuple[Tensor, Tensor]:
    """The encoder's tables over ``2 * _LOOKUP_BUCKETS`` buckets (positive values, then negative):
    ``base`` (int32), the number of map midpoints below the bucket's smallest value ``lo``, and
    ``above`` (fp32), the one midpoint in ``[lo, hi)`` (+inf if none; a midpoint equal to the
    bucket's largest value ``hi`` counts only for values above ``hi``, in the next bucket). For a
    scaled value ``s`` in bucket ``b`` the nearest map entry's code -- the number of midpoints below ``s``, as
    ``torch.bucketize(s, midpoints)`` counts them -- is ``base[b] + (s > above[b])``."""
    table = dynamic_map(signed)
    mids = (table[1:] + table[:-1]) / 2
    u = torch.arange(_LOOKUP_FIRST, _LOOKUP_FIRST + _LOOKUP_BUCKETS, dtype=torch.int64)
    low = (u << _SHIFT).to(torch.int32).view(torch.float32).clone()
    high = (((u + 1) << _SHIFT) - 1).to(torch.int32).view(torch.float32)
    low[0] = 0.0  # the first bucket holds every magnitude below the floor
    bases, aboves = [], []
    for lo, hi in ((low, high), (-high, -low)):  # each bucket's value range [lo, hi]
        below_lo = torch.searchsorted(mids, lo)  # midpoints < lo
        below_hi = torch.searchsorted(mids, hi)  # midpoints < hi; at most one more than below lo (tested)
        inside = mids[below_lo.clamp_max(mids.numel() - 1)]
        aboves.append(torch.where(below_hi > below_lo, inside, torch.full_like(inside, float("inf"))))
        bases.append(below_lo.to(torch.int32))
    return torch.cat(bases), torch.cat(aboves)


def lookup_encode(blocks: Tensor, base: Tensor, above: Tensor, codes: Tensor, absmax: Tensor) -> None:
    """Blockwise encode by table lookup (``lookup_tables``): ``blocks`` ``[n_blocks, BLOCK]`` fp32
    in; its codes (uint8, same shape) and block maxima ``[n_blocks]`` written into ``codes`` and
    ``absmax``. Elementwise after one reduction per block, so torch.compile fuses it into two
    loops with no search."""
    peak = blocks.abs().amax(dim=1)
    scaled = blocks / peak.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    bucket = ((scaled.abs().view(torch.int32) >> _SHIFT) - _LOOKUP_FIRST).clamp(0, _LOOKUP_BUCKETS - 1)
    bucket = bucket + torch.where(scaled < 0, _LOOKUP_BUCKETS, 0)
    codes.copy_((base[bucket] + (scaled > above[bucket]).to(torch.int32)).to(torch.uint8))
    absmax.copy_(peak)


def lookup_decode(codes: Tensor, table: Tensor, absmax: Tensor, out: Tensor) -> None:
    """Blockwise decode: ``codes`` ``[n_blocks, BLOCK]`` uint8 and ``absmax`` ``[n_blocks]`` to
    ``out`` (fp32, same shape, written): ``table[codes] * absmax``, as bitsandbytes computes it."""
    out.copy_(table[codes.long()] * absmax.unsqueeze(1))


def _block_groups(n: int) -> list[tuple[int, int, tuple[int, int]]]:
    """How the codec takes a state of ``n`` values: ``(start, stop, matrix shape)`` of its whole
    blocks as one ``[n // BLOCK, BLOCK]`` matrix and of its last partial block as a
    ``[1, n % BLOCK]`` one (that block's maximum is the row's). Block maxima ``start // BLOCK``
    to ``ceil(stop / BLOCK)`` belong to each."""
    full = n // BLOCK * BLOCK
    return ([(0, full, (-1, BLOCK))] if full > 0 else []) + ([(full, n, (1, -1))] if full < n else [])


def _encode_many(flats: list, base: Tensor, above: Tensor, codes: list, absmax: list) -> None:
    """``lookup_encode`` of several states: ``flats`` 1-D fp32 in; ``codes`` 1-D uint8 and
    ``absmax`` ``[ceil(n / BLOCK)]`` written (``_block_groups``)."""
    for j in range(len(flats)):  # unrolled by dynamo: one compiled call for the list
        for lo, hi, shape in _block_groups(flats[j].shape[0]):
            lookup_encode(flats[j][lo:hi].view(shape), base, above, codes[j][lo:hi].view(shape),
                          absmax[j][lo // BLOCK:(hi + BLOCK - 1) // BLOCK])


def _decode_many(codes: list, table: Tensor, absmax: list, out: list) -> None:
    """``lookup_decode`` of several states, laid out as ``_encode_many``'s."""
    for j in range(len(codes)):
        for lo, hi, shape in _block_groups(codes[j].shape[0]):
            lookup_decode(codes[j][lo:hi].view(shape), table, absmax[j][lo // BLOCK:(hi + BLOCK - 1) // BLOCK],
                          out[j][lo:hi].view(shape))


_COMPILED: dict[tuple, Any] = {}


def _flat(tensors: list[Tensor]) -> list[Tensor]:
    """1-D aliases for the codec. ``view(...).detach()`` is not a view object: dynamo would
    otherwise guard on each alias's base (the kernel buffers' shapes) and recompile per base,
    past its limit of 8 variants."""
    return [t.detach().view(-1).detach() for t in tensors]


def _variant(fn: Any, device: torch.device, args: tuple) -> tuple:
    """What a compiled codec call is specialised on besides the sizes: the function, the device
    type, the number of states and, per state, which of its block groups exist and which have
    one row or one column (dynamo specialises dimensions of size 1). One code object per
    variant: dynamo keeps at most 8 compiled variants per code object and runs eagerly past
    that, which a shared one could reach on a model with many shapes."""
    sizes = tuple(t.shape[0] for t in args[0])
    return (fn, device.type, tuple((n // BLOCK == 0, n // BLOCK == 1, n % BLOCK == 0, n % BLOCK == 1)
                                            for n in sizes))


def _compiled(key: tuple) -> Any:
    """``_encode_many`` / ``_decode_many`` (``key[0]``) compiled for one ``_variant``."""
    if key not in _COMPILED:
        fn = key[0]
        code = fn.__code__.replace(co_name=f"hina{fn.__name__}_{len(_COMPILED)}")
        _COMPILED[key] = torch.compile(types.FunctionType(code, fn.__globals__, code.co_name), dynamic=True)
    return _COMPILED[key]


class _Codebook:
    """Per-device caches of the two maps and of the encoder's lookup tables."""

    def __init__(self) -> None:
        self._maps: dict[tuple[bool, torch.device], Tensor] = {}
        self._lookups: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}

    def lookup(self, signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (signed, device)
        if key not in self._lookups:
            self._lookups[key] = tuple(t.to(device) for t in lookup_tables(signed))  # type: ignore[assignment]
        return self._lookups[key]

    def map(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed).to(device)
        return self._maps[key]


_CODEBOOK = _Codebook()


def _bnb_functional():
    """bitsandbytes.functional, or None when it cannot be imported."""
    try:
        import bitsandbytes.functional as F  # noqa: N812

        return F
    except Exception:  # pragma: no cover - depends on the environment
        return None


class Quantizer:
    """Blockwise 8-bit encode/decode: bitsandbytes' kernels or the lookup codec (module docstring)."""

    def __init__(self, backend: str = "auto") -> None:
        if backend not in ("auto", "bitsandbytes", "torch"):
            raise ValueError(f"quant_backend={backend!r}: use 'auto', 'bitsandbytes' or 'torch'")
        self.requested = backend
        self._bnb = None if backend == "torch" else _bnb_functional()
        if backend == "bitsandbytes" and self._bnb is None:
            raise ImportError("quant backend 'bitsandbytes' requested but bitsandbytes does not import")
        self._bnb_ok: dict[str, bool] = {}
        self._broken: set[tuple] = set()  # compiled codec variants (``_variant``) that failed
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
            warnings.warn(f"hina_kohya 8-bit state: {why}; using the pure-torch lookup codec", stacklevel=4)
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

    # -- the lookup codec (pure torch) -------------------------------------------------------
    def _lookup_here(self, device: torch.device) -> bool:
        """Does this quantizer encode and decode with the lookup codec on ``device``? ``"auto"``:
        on the CPU (faster than bitsandbytes' CPU kernels, module docstring) and where
        bitsandbytes does not run; ``"torch"``: everywhere; ``"bitsandbytes"``: where it runs."""
        if self.requested == "auto" and device.type == "cpu":
            return True
        return self.backend_for(device) != "bitsandbytes"

    def codec_for(self, device: torch.device) -> str:
        """What encodes and decodes 8-bit state on ``device``: "bitsandbytes", "torch lookup"
        (compiled), or, once a compiled variant has failed there, what takes its place."""
        if not self._lookup_here(device):
            return "bitsandbytes"
        if not any(key[1] == device.type for key in self._broken):
            return "torch lookup"
        return "bitsandbytes" if self.backend_for(device) == "bitsandbytes" else "torch lookup, eager"

    def _run_lookup(self, fn: Any, device: torch.device, *args: Any) -> bool:
        """Run ``fn`` (``_encode_many`` / ``_decode_many``) over the states in ``args`` on a
        ``device`` the lookup codec serves (``_lookup_here``; the callers check it before building
        ``args``): compiled, or, where that compiled variant failed (no C++ compiler, an
        unsupported platform, a failed recompile), eagerly -- unless bitsandbytes runs there,
        which then takes over (False). Rerunning after a failure is safe at any time, as the codec
        never writes its inputs. A variant that failed once is not tried again."""
        key = _variant(fn, device, args)
        if key not in self._broken:
            try:
                with torch.no_grad():  # one grad mode: a resume decodes with grad enabled, a step without
                    _compiled(key)(*args)
                return True
            except Exception as exc:
                self._broken.add(key)
                log.info("8-bit state: a compiled codec variant failed on %s (%s: %s); it runs without compiling",
                         device.type, type(exc).__name__, str(exc)[:200])
        if self.backend_for(device) == "bitsandbytes":
            return False
        fn(*args)
        return True

    # -- public ------------------------------------------------------------------------------
    def encode(self, x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
        codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        absmax = torch.zeros(max(1, math.ceil(x.numel() / BLOCK)), dtype=torch.float32, device=x.device)
        self.encode_into(x, signed, codes, absmax)
        return codes, absmax

    def encode_into(self, x: Tensor, signed: bool, codes: Tensor, absmax: Tensor) -> None:
        """Encode ``x`` into ``codes`` (uint8, contiguous, ``x``'s element count) and ``absmax``."""
        self.encode_many([x], signed, [codes], [absmax])

    def encode_many(self, xs: list[Tensor], signed: bool, codes: list[Tensor], absmax: list[Tensor]) -> None:
        """``encode_into`` for several states of one map, in one compiled call where the lookup
        codec applies (a call per state costs more than encoding a LoRA factor)."""
        if not xs:
            return
        device = xs[0].device
        # the lookup codec's arguments (fp32 aliases, tables on the device) only where it serves
        if self._lookup_here(device) and self._run_lookup(
                _encode_many, device, _flat([x.float().contiguous() for x in xs]), *_CODEBOOK.lookup(signed, device),
                _flat(codes), absmax):
            return
        for x, c, a in zip(xs, codes, absmax):
            self._encode_bnb(x.float().reshape(c.shape), signed, codes=c, absmax=a)

    def decode(self, codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
        out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
        self.decode_into(codes, absmax, signed, out)
        return out

    def decode_into(self, codes: Tensor, absmax: Tensor, signed: bool, out: Tensor) -> None:
        """Decode into ``out`` (fp32, contiguous, ``codes.numel()`` elements)."""
        self.decode_many([codes], [absmax], signed, [out])

    def decode_handles(self, pairs: list[tuple["Encoded", Tensor]]) -> None:
        """``decode_many`` of (handle, buffer) pairs of one map (``Encoded``'s codec interface)."""
        self.decode_many([h.codes for h, _ in pairs], [h.absmax for h, _ in pairs], pairs[0][0].signed,
                         [buf for _, buf in pairs])

    def encode_handles(self, pairs: list[tuple["Encoded", Tensor]]) -> None:
        """``encode_many`` of (handle, buffer) pairs of one map."""
        self.encode_many([buf for _, buf in pairs], pairs[0][0].signed, [h.codes for h, _ in pairs],
                         [h.absmax for h, _ in pairs])

    def decode_many(self, codes: list[Tensor], absmax: list[Tensor], signed: bool, out: list[Tensor]) -> None:
        """``decode_into`` for several states of one map, batched as ``encode_many``.
        bitsandbytes' CPU backend has no ``out=`` variant: its decode is copied into ``out``."""
        if not codes:
            return
        device = codes[0].device
        if self._lookup_here(device) and self._run_lookup(_decode_many, device, _flat(codes),
                                                          _CODEBOOK.map(signed, device), absmax, _flat(out)):
            return
        for c, a, o in zip(codes, absmax, out):
            o.view(c.shape).copy_(self._decode_bnb(c, a, signed).view(c.shape))


class BF16Codec:
    """bf16 state as ``Encoded`` handles see it: decoding is an exact widening, encoding rounds
    stochastically with the handle's seed (``StateStore.round_bf16``, so that slow EMAs still move)."""

    def __init__(self, store: "StateStore") -> None:
        self.store = store

    def decode_handles(self, pairs: list[tuple["Encoded", Tensor]]) -> None:
        for h, buf in pairs:
            buf.view(h.shape).copy_(h.codes)

    def encode_handles(self, pairs: list[tuple["Encoded", Tensor]]) -> None:
        for h, buf in pairs:
            h.codes.copy_(self.store.round_bf16(buf.view(h.shape), h.seed))


class Encoded:
    """A state of this step stored below the compute precision (8-bit codes, or bf16), not decoded
    yet (``StateStore.read(..., lazy=True)``).

    The fused path decodes it one kernel call at a time into a reusable buffer (``decode_all``)
    and encodes the result back into the same codes and block maxima (``encode_all``), so a
    step never holds a whole 8-bit or bf16 state in fp32 (which would make the step's peak
    memory larger than with fp32 state). The eager paths decode a few tensors' states at a time
    into fresh tensors (``decode_fresh``) and encode them back when those tensors are done.
    ``quantizer`` is the codec (a ``Quantizer``, or ``BF16Codec`` with the rounding ``seed``); it
    decodes and encodes (handle, buffer) pairs (``decode_handles`` / ``encode_handles``).
    """

    __slots__ = ("quantizer", "codes", "absmax", "signed", "seed")

    def __init__(self, quantizer: Any, codes: Tensor, absmax: Optional[Tensor], signed: bool, seed: int = 0) -> None:
        self.quantizer, self.codes, self.absmax, self.signed, self.seed = quantizer, codes, absmax, signed, seed

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def numel(self) -> int:
        return self.codes.numel()


def _by_map(pairs: list[tuple[Encoded, Tensor]]) -> dict[tuple[int, bool], list[tuple[Encoded, Tensor]]]:
    groups: dict[tuple[int, bool], list[tuple[Encoded, Tensor]]] = {}
    for handle, buf in pairs:
        groups.setdefault((id(handle.quantizer), handle.signed), []).append((handle, buf))
    return groups


def decode_all(pairs: list[tuple[Encoded, Tensor]]) -> None:
    """Decode each handle into its buffer (a contiguous fp32 tensor of its size), the handles of one quantizer
    and map in one batched call (``Quantizer.decode_many``)."""
    for group in _by_map(pairs).values():
        group[0][0].quantizer.decode_handles(group)


def decode_fresh(handles: list[Encoded]) -> list[Tensor]:
    """Each handle decoded into a new fp32 tensor of its shape (only fp32 compute reads lazily).
    One codec call per state: a batched call is compiled per arrangement of its states, and the
    eager paths' slices hold hundreds of states in arrangements that differ from slice to slice."""
    out = [torch.empty(h.shape, dtype=torch.float32, device=h.codes.device) for h in handles]
    for h, o in zip(handles, out):
        decode_all([(h, o)])
    return out


def encode_all(pairs: list[tuple[Encoded, Tensor]]) -> None:
    """Encode each buffer back into its handle's codes and block maxima,
    batched as ``decode_all``."""
    for group in _by_map(pairs).values():
        group[0][0].quantizer.encode_handles(group)


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
        self._bf16 = BF16Codec(self)
        self._generators: dict[torch.device, torch.Generator] = {}

    # -- format --------------------------------------------------------------------------
    def format_of(self, spec: StateSpec, numel: int, compute_dtype: torch.dtype) -> str:
        """"plain" (compute dtype), "fp16", "uint8" (small integers, e.g. packed bits), "bf16" or
        "8bit" for this state of a tensor of ``numel``."""
        if spec.fixed_format == "uint8":
            return "uint8"
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
        elif fmt == "uint8":
            state[spec.key] = value.round().clamp(0, 255).to(torch.uint8)
        elif fmt == "bf16":
            state[spec.key] = self.round_bf16(value.float(), _seed(self.seed, step, index, spec.key))
        else:
            codes, absmax = self.quantizer.encode(value, spec.signed)
            state[spec.key] = codes
            state[spec.key + ABSMAX_SUFFIX] = absmax

    # -- read / write each step ----------------------------------------------------------
    def read(self, state: dict, spec: StateSpec, compute_dtype: torch.dtype, keep_fp16: bool = False,
             lazy: bool = False, step: int = 0, index: int = 0) -> Any:
        """A compute-dtype tensor holding the state; for "plain" it is the state tensor itself, and
        with ``keep_fp16`` an fp16 state too (for kernels that cast on load and store). With
        ``lazy``, an 8-bit or bf16 state comes back as an ``Encoded`` handle, decoded by the caller
        when and where it needs it (``step`` and ``index``: the tensor's, for bf16's rounding seed,
        as ``write`` takes them)."""
        stored = state[spec.key]
        absmax = state.get(spec.key + ABSMAX_SUFFIX)
        if absmax is not None:
            if lazy and compute_dtype == torch.float32:
                return Encoded(self.quantizer, stored, absmax, spec.signed)
            return self.quantizer.decode(stored, absmax, spec.signed)
        if stored.dtype == compute_dtype or (keep_fp16 and stored.dtype == torch.float16):
            return stored
        if lazy and stored.dtype == torch.bfloat16 and compute_dtype == torch.float32:
            return Encoded(self._bf16, stored, None, spec.signed, _seed(self.seed, step, index, spec.key))
        return stored.to(compute_dtype)

    def write(self, state: dict, spec: StateSpec, value: Tensor, step: int, index: int) -> None:
        """Store ``value`` (the tensor returned by ``read``, updated in place) back. An
        ``Encoded`` handle was written back by ``encode_all`` where it was used."""
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
        elif fmt == "uint8":  # a trainer's cast to the parameter dtype undone (the values are integers)
            state[spec.key] = stored.round().clamp(0, 255).to(torch.uint8) if stored.dtype != torch.uint8 else stored
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
