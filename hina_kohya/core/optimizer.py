"""HinaOptimizer: the engine every recipe runs on.

One step, as data flows (DESIGN.md §3):

1. For each param group, take the params whose ``.grad`` is not None. State is created lazily the
   first time a param has a gradient (module dropout and DyLoRA leave grads None).
2. Group them into Buckets by (device, dtype); gradients and state are presented in the compute
   dtype (fp32, or fp64 for fp64 params).
3. Run the group's Chain of Transforms (``foreach`` lists, or the single-tensor reference path).
4. Write-back, the only place parameters change:
   ``p <- p * (1 - lr * wd * decay_scale) - lr * lr_scale * lr_scale_t * lr_mask * update``
   in the compute dtype, then rounded to the parameter dtype (stochastic / Kahan for bf16).
5. Store state back in its format (bf16 / 8-bit) and advance the step counters.

A tensor whose gradient or update is NaN/inf keeps its value and state (its step is skipped and
counted); the per-tensor paths do this inside ``chain.tensor_step``, the list-wise path with a
snapshot (``_snapshot`` / ``_restore_skipped``).

No ``.item()``, ``bool(tensor)`` or Python branch on tensor values runs inside ``step()``: every
per-step scalar is either a Python number derived from step counters and hyperparameters, or a
tensor that stays on the device.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from .. import roles as roles_mod
from ..args import check_hparams
from . import fused as fused_mod
from .chain import Bucket, Chain, Slot, StateSpec, copies, static_keys, tensor_step
from .precision import ROUNDINGS, check_param_dtype, kahan_write
from . import quant
from .quant import Encoded, StateStore, _seed, stored_tensor

log = logging.getLogger(__name__)

#: the engine's own options (``HinaOptimizer.__init__``'s keywords): every recipe accepts them
ENGINE_OPTIONS = ("state_precision", "foreach", "bf16_rounding", "master_weights", "seed", "resume_hparams",
                  "min_8bit_size", "quant_backend", "fused", "skip_nonfinite")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class HinaOptimizer(torch.optim.Optimizer):
    """Base class of all hina_kohya optimizers. Subclasses implement ``build_chain(hp)``.

    Engine options (every recipe accepts them):
      state_precision: "fp32" | "bf16" | "8bit" (see core/quant.py).
      fused:           compile each recipe's per-tensor math into kernels (core/fused.py).
                       None (default): on unless HINA_KOHYA_FUSED=0; falls back to the list-wise
                       path, with one warning, where compilation is unavailable.
      foreach:         for the unfused path: True (default) runs the list-wise path, False the
                       readable single-tensor reference path.
      skip_nonfinite:  True (default): a NaN/inf gradient, update or new state (g**2 past fp32's
                       range) leaves that tensor's value and state untouched (free in the fused
                       kernels; on the list-wise path it costs a snapshot and a check, about three
                       extra memory passes per state and parameter).
      bf16_rounding:   "stochastic" (default) | "kahan" | "nearest" for bf16 parameters.
      master_weights:  keep an fp32 copy of bf16/fp16 params in state (required for fp16).
      seed:            seed of stochastic rounding (deterministic per step and parameter).
      resume_hparams:  "saved" (default): hyperparameters stored in a checkpoint win on load;
                       "new": the values this optimizer was constructed with win. Logged.
      min_8bit_size:   tensors with fewer elements keep fp32 state under "8bit" (default 4096).
      quant_backend:   the 8-bit codec: "auto" (default; the table-lookup codec on the CPU,
                       bitsandbytes' kernels elsewhere), "bitsandbytes" or "torch" everywhere.
    """

    #: hyperparameter validation rules specific to a recipe (name -> (predicate, allowed))
    extra_rules: dict = {}

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, state_precision: str = "fp32",
                 foreach: Optional[bool] = None, bf16_rounding: str = "stochastic", master_weights: bool = False,
                 seed: int = 0, resume_hparams: str = "saved", min_8bit_size: int = 4096,
                 quant_backend: str = "auto", fused: Optional[bool] = None, skip_nonfinite: bool = True) -> None:
        owner = type(self).__name__
        options = dict(state_precision=state_precision, bf16_rounding=bf16_rounding, seed=seed,
                       resume_hparams=resume_hparams, min_8bit_size=min_8bit_size, master_weights=master_weights,
                       fused=fused, skip_nonfinite=skip_nonfinite)
        if foreach is not None:
            options["foreach"] = foreach
        check_hparams(owner, {**defaults, **options}, self.extra_rules)
        if bf16_rounding not in ROUNDINGS:  # pragma: no cover - covered by the rule above
            raise ValueError(bf16_rounding)
        self.foreach = True if foreach is None else bool(foreach)
        self.skip_nonfinite = bool(skip_nonfinite)
        # an explicit foreach=False asks for the reference path: it is not fused
        self.fused = (fused_mod.fused_default() if foreach is None else False) if fused is None else bool(fused)
        # the eager per-tensor path steps same-shaped tensors together unless the reference path
        # (foreach=False) was asked for, or batching failed once (``_run_per_tensor``)
        self._batched = self.foreach
        self._kernels: dict[int, tuple] = {}
        self._plans: dict[int, tuple] = {}  # bucket (its first flat index) -> kept kernel-call plan
        self.bf16_rounding = bf16_rounding
        self.master_weights = bool(master_weights)
        self.resume_hparams = resume_hparams
        self.store = StateStore(state_precision, min_8bit_size, seed, quant_backend)
        self._chains: dict[int, Chain] = {}
        self._structure: Optional[roles_mod.Structure] = None
        self._named_shapes: list[list[tuple]] = []  # per group: its tensors' shapes when first seen
        self._seen_lists: list[list] = []  # per group: the params list the structure saw (its length: _flat_index)
        self._flat_index: list[list[int]] = []
        self._flat_params: list[Tensor] = []
        self._derived: dict[str, Any] = {}  # transform caches derived from the structure
        self.step_count = 0  # calls of step() in this process (per-step caches key on it)
        self._last: dict[int, dict] = {}  # per group: what the last step used, for log_dict()
        self._nonfinite: Optional[Tensor] = None  # tensors whose step was skipped, on the device
        self._notes: set[str] = set()
        self.last_load_report: Optional[dict] = None
        if isinstance(params, (set, frozenset)):
            raise TypeError(f"{owner}: params must be an ordered collection (list, tuple, dict_values), not a set: "
                            "a set's order changes between runs, and checkpoints map state by position")
        super().__init__(params, defaults)

    # -- construction ------------------------------------------------------------------------
    @property
    def state_precision(self) -> str:
        return self.store.precision

    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer params must be an ordered collection (list, tuple, dict_values), not a set")
        for p in list(params):
            if isinstance(p, tuple):  # (name, tensor) pairs, handled by torch
                p = p[1]
            self._check_param(p)
        super().add_param_group(param_group)
        # the group's initial rate, for rules that follow the scheduler (lr masks, LoRA+ checks)
        self.param_groups[-1].setdefault("hina_lr0", self.param_groups[-1]["lr"])
        self.complete_group(self.param_groups[-1])
        hp = {k: v for k, v in self.param_groups[-1].items() if k in self.defaults}
        check_hparams(type(self).__name__, hp, self.extra_rules)
        self._invalidate()

    def complete_group(self, group: dict) -> None:
        """Fill in a new param group's settings that derive from its others (a recipe's hook; the
        lr masks' relative cap, for one), before they are checked."""

    def stored_lr_rates(self, group: dict) -> list[tuple[Tensor, Tensor]]:
        """(param, stored rate) for each of ``group``'s params with lr-mask state: the per-element
        ``lr_mask`` or the per-tensor / per-group ``lr_rate``, both L / max_lr (transforms/lr_mask.py)."""
        out = []
        for p in group["params"]:
            st = self.state.get(p, {})
            stored = st.get("lr_mask", st.get("lr_rate"))
            if stored is not None:
                out.append((p, stored))
        return out

    def _check_param(self, p: Tensor) -> None:
        if not isinstance(p, Tensor):
            raise TypeError(f"{type(self).__name__} can only optimize Tensors, got {type(p).__name__}")
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{type(self).__name__} does not support sparse parameters (layout {p.layout}); "
                            "use dense parameters or torch.optim.SparseAdam")
        if p.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters ({p.dtype}); "
                            "optimize torch.view_as_real(p) instead")
        check_param_dtype(p, self.master_weights)

    def _invalidate(self) -> None:
        self._chains.clear()
        if hasattr(self, "_kernels"):
            self._kernels.clear()
            self._plans.clear()
        self._structure = None
        self._derived = {}

    # -- recipe hooks --------------------------------------------------------------------------
    def build_chain(self, hp: dict) -> Chain:  # pragma: no cover - abstract
        raise NotImplementedError

    def chain_for(self, group_index: int) -> Chain:
        chain = self._chains.get(group_index)
        if chain is None:
            chain = self.build_chain(self.param_groups[group_index])
            self._chains[group_index] = chain
        return chain

    # -- structure (names, roles, pairs) ---------------------------------------------------
    @property
    def structure(self) -> roles_mod.Structure:
        if self._structure is None:
            self._build_structure()
        assert self._structure is not None
        return self._structure

    def _build_structure(self) -> None:
        # shapes under which each group's names were first seen: a later swap of the tensors for
        # one flat partition (DeepSpeed ZeRO 1/2 does it after construction) is then recognised
        for g in self.param_groups[len(self._named_shapes):]:
            self._named_shapes.append([tuple(p.shape) for p in g["params"]])
        st, problems = roles_mod.structure_of(self.param_groups, self._named_shapes)
        if problems:
            self.note_once("name-aware features (roles, LoRA pairs, LoRA+ and LoKr scaling, relationships) are off "
                           f"for {len(problems)} param group(s): " + "; ".join(problems))
        self._structure = st
        self._seen_lists = [g["params"] for g in self.param_groups]
        self._derived = {}
        self._flat_params = [p for g in self.param_groups for p in g["params"]]
        self._flat_index = []
        offset = 0
        for g in self.param_groups:
            n = len(g["params"])
            self._flat_index.append(list(range(offset, offset + n)))
            offset += n

    def _lists_changed(self) -> bool:
        groups = self.param_groups
        return len(groups) != len(self._seen_lists) or any(
            g["params"] is not seen or len(seen) != len(idx)
            for g, seen, idx in zip(groups, self._seen_lists, self._flat_index))

    def note_once(self, message: str) -> None:
        """Warn once per optimizer about a degraded mode (never per step)."""
        if message not in self._notes:
            self._notes.add(message)
            warnings.warn(f"{type(self).__name__}: {message}", stacklevel=3)

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.before_step(loss)
        if self._structure is not None and self._lists_changed():
            self._invalidate()  # params swapped after the first step (e.g. for a flat partition)
        structure = self.structure
        self.step_count += 1
        for gi, group in enumerate(self.param_groups):
            chain = self.chain_for(gi)
            specs = chain.state_specs(group)
            buckets: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor, int]]] = {}
            for p, idx in zip(group["params"], self._flat_index[gi]):
                g = p.grad
                if g is None or p.numel() == 0:  # a zero-size tensor has nothing to update (nor state)
                    continue
                if g.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append((p, idx))
            self._last[gi] = {}
            for (_, dtype), items in buckets.items():
                self._run_bucket(gi, group, chain, specs, items, _compute_dtype(dtype), structure, self._last[gi])
        return loss

    def before_step(self, loss: Any) -> None:
        """Hook for recipes with optimizer-wide work before the groups run (C-Optim's context);
        ``loss`` is the closure's result or None."""

    def _init_state(self, p: Tensor, state: dict, specs: list[StateSpec], cdtype: torch.dtype, role: Any) -> None:
        if "step" not in state:
            check_param_dtype(p, self.master_weights)
            state["step"] = 0
        for spec in specs:
            if spec.key not in state and spec.applies_to(role) and spec.shape_of(p) is not None:
                self.store.create(state, spec, p, cdtype)
        if p.dtype in (torch.bfloat16, torch.float16):
            if self.master_weights and "master_param" not in state:
                state["master_param"] = p.detach().float().clone()
            elif (not self.master_weights and self.bf16_rounding == "kahan" and p.dtype == torch.bfloat16
                  and "kahan_comp" not in state):
                state["kahan_comp"] = torch.zeros_like(p)

    def _run_bucket(self, gi: int, group: dict, chain: Chain, specs: list[StateSpec],
                    items: list[tuple[Tensor, int]], cdtype: torch.dtype, structure: roles_mod.Structure,
                    record: dict) -> None:
        params = [p for p, _ in items]
        indices = [i for _, i in items]
        states = [self.state[p] for p in params]
        roles = [structure.roles[i] for i in indices]
        for p, st, role in zip(params, states, roles):
            self._init_state(p, st, specs, cdtype, role)
        steps = [st["step"] + 1 for st in states]
        grads = [p.grad if p.grad.dtype == cdtype else p.grad.to(cdtype) for p in params]
        fused = self.fused
        # the fused kernels read and write fp16 states as stored (the cast happens in the kernel);
        # 8-bit and bf16 states stay encoded (``Encoded``) until a path decodes the few tensors it
        # is about to step -- one kernel call's, or one slice's on the eager paths -- and encodes
        # them back right after, so a step never holds a whole group's state in fp32 (no
        # transform's prepare reads a quantizable state)
        views = {s.key: [self.store.read(st, s, cdtype, keep_fp16=fused, lazy=True, step=t, index=i)
                         if s.key in st else None for st, t, i in zip(states, steps, indices)] for s in specs}
        b = Bucket(group, params, grads, views, steps, roles, indices, cdtype, opt=self)
        for t in chain.transforms:
            t.prepare(b)
        if fused and self._run_fused(gi, b, states, chain):
            self._record(b, record)
        else:
            if fused:  # compilation failed before anything was updated: redo the views for eager
                self._reread_for_eager(b, range(len(b)))
            if (self.foreach or fused) and all(t.has_foreach for t in chain.transforms):
                for idx in self._slices([p.numel() for p in b.params]):
                    self._run_foreach(b.subset(idx) if len(idx) < len(b) else b, [states[i] for i in idx], chain,
                                      record)
            else:
                self._run_per_tensor(b, states, chain.transforms, None)
                self._record(b, record)
        for s in specs:
            for st, value, t, idx in zip(states, views[s.key], steps, indices):
                if value is not None:
                    self.store.write(st, s, value, t, idx)
        for st, t in zip(states, steps):
            st["step"] = t

    #: the eager paths step a bucket in slices of about this many elements: the list-wise path's
    #: snapshot and temporaries (a few per state and transform) and both paths' decoded 8-bit /
    #: bf16 states then take memory in proportion to one slice, not to the whole bucket (a full
    #: fine-tune's group). 2**24 elements = 64 MiB per fp32 list; rank-16 LoRA sets of SD1.5 fit
    #: in one slice.
    SLICE_ELEMENTS = 1 << 24

    def _slices(self, sizes: list[int]) -> list[list[int]]:
        """Consecutive ranges of positions in ``sizes`` (tensors' element counts) of at most
        ``SLICE_ELEMENTS`` elements each (a larger tensor alone); none for no tensors."""
        out: list[list[int]] = []
        total = 0
        for i, n in enumerate(sizes):
            if not out or total + n > self.SLICE_ELEMENTS:
                out.append([])
                total = 0
            out[-1].append(i)
            total += n
        return out

    def _run_foreach(self, b: Bucket, states: list[dict], chain: Chain, record: dict) -> None:
        """The list-wise path over ``b`` (a slice of a bucket), between the decode and the
        encode of its 8-bit / bf16 states."""
        decoded = self._decode(b, range(len(b)))
        if self.skip_nonfinite:
            self._snapshot(b, states)
        for t in chain.transforms:
            t.foreach(b)
        self._write_back(b, states, chain)
        self._encode(b, decoded)
        self._record(b, record)

    @staticmethod
    def _decode(b: Bucket, indices: Iterable[int]) -> list[tuple[str, int, Encoded]]:
        """Decode the 8-bit / bf16 states of tensors ``indices`` in ``b``'s views; return what
        ``_encode`` needs to store them back and drop the decoded tensors."""
        handles = [(key, i, views[i]) for key, views in b.state.items() for i in indices
                   if isinstance(views[i], Encoded)]
        for (key, i, _), value in zip(handles, quant.decode_fresh([h for _, _, h in handles])):
            b.state[key][i] = value
        return handles

    @staticmethod
    def _encode(b: Bucket, handles: list[tuple[str, int, Encoded]]) -> None:
        for key, i, h in handles:  # one codec call per state, as ``quant.decode_fresh``
            quant.encode_all([(h, b.state[key][i])])
            b.state[key][i] = h

    # -- write-back: the single place parameters change ------------------------------------
    def _write_back(self, b: Bucket, states: list[dict], chain: Chain) -> None:
        lr = b.hp["lr"]
        wd = b.hp.get("weight_decay", 0.0)
        targets = self._targets(b, states)
        if wd != 0:
            # decay follows the per-tensor rate of the update (lr * lr_scale * lr_scale_t); the
            # per-element lr mask shapes the update only
            ds = b.decay_scale or [1.0] * len(b)
            rates = [lr * s * wd * d for s, d in zip(b.lr_scale, ds)]
            if b.lr_scale_t is None:
                torch._foreach_mul_(targets, [1.0 - r for r in rates])
            else:
                factors = torch._foreach_mul(b.lr_scale_t, [-r for r in rates])
                torch._foreach_add_(factors, 1.0)
                torch._foreach_mul_(targets, factors)
        coeff = [-lr * s * b.lr_mask_scale for s in b.lr_scale]
        tensor_scales = [x for x in (b.lr_scale_t, b.update_scale_t) if x is not None]
        if b.has_ratio and b.lr_mask is None and not tensor_scales:
            num, den, scale = b.ratio
            torch._foreach_addcdiv_(targets, num, den, [c * s for c, s in zip(coeff, scale)])
        else:
            upd = b.update_view()
            if b.lr_mask is not None:
                upd = torch._foreach_mul(upd, b.lr_mask)
            if tensor_scales:  # one fused pass per tensor: x += u * (scale_t * c)
                factors = torch._foreach_mul(tensor_scales[0], coeff)
                if len(tensor_scales) == 2:
                    torch._foreach_mul_(factors, tensor_scales[1])
                for x, u, f in zip(targets, upd, factors):
                    x.addcmul_(u, f)
            else:
                for x, u, c in zip(targets, upd, coeff):
                    x.add_(u, alpha=c)
        for t in chain.transforms:
            if t.post_update:
                t.after_update(b, targets)
        self._restore_skipped(b, targets, states)
        self._finish(b, states, targets)

    def _snapshot(self, b: Bucket, states: list[dict]) -> None:
        """List-wise path: keep what a non-finite step must leave untouched (per-tensor paths do
        this inside ``chain.tensor_step``, where it fuses away). List-wise ops throughout: on a
        GPU each per-tensor op here would be one more kernel launch per tensor."""
        b.scratch["finite"] = _all_finite(b.grads)
        b.scratch["old_states"] = {k: copies(views) for k, views in b.state.items()}
        b.scratch["old_params"] = copies([p.detach() if p.dtype == b.compute_dtype else None for p in b.params])
        b.scratch["old_master"] = copies([st.get("master_param") for st in states])

    def _restore_skipped(self, b: Bucket, targets: list[Tensor], states: list[dict]) -> None:
        if "finite" not in b.scratch:
            return
        ok = b.scratch["finite"] & _all_finite(targets)
        for views in b.state.values():  # a finite step can still overflow a state (g**2 past fp32's range)
            if any(v is not None for v in views):
                ok = ok & _all_finite(views)
        oks = ok.unbind()
        for i, (x, ok_i) in enumerate(zip(targets, oks)):
            old = b.scratch["old_params"][i]
            if old is None:
                old = b.scratch["old_master"][i]
            if old is None:  # a working copy of a low-precision parameter: rebuild it as it was
                old = b.params[i].to(b.compute_dtype)
                if "kahan_comp" in states[i]:
                    old = old + states[i]["kahan_comp"].float()
            torch.where(ok_i, x, old, out=x)
            for key, olds in b.scratch["old_states"].items():
                if olds[i] is not None:
                    view = b.state[key][i]
                    torch.where(ok_i, view, olds[i], out=view)
        b.scratch["skipped"] = [(~ok).to(b.compute_dtype)]

    # -- the per-tensor paths: the reference (eager) and the fused kernel (compiled) -----------
    def _run_per_tensor(self, b: Bucket, states: list[dict], transforms: list, fused: Optional[tuple]) -> None:
        """The per-tensor paths: ``chain.tensor_step`` eagerly (the reference), or, with ``fused``
        = (kernel, layout, keys), the same function compiled into one kernel per tensor."""
        targets = self._targets(b, states)
        device = b.params[0].device
        kept: list = [None] * len(b)
        eager = list(range(len(b)))
        if fused is not None:
            eager = self._run_chunks(b, states, targets, fused, kept)
            self._reread_for_eager(b, eager)
        if eager:
            hp = fused_mod.hp_tensors(b.hp, device, b.compute_dtype)
            # every tensor's numbers in one host-to-device copy (four per tensor before: on a GPU,
            # thousands of tiny blocking copies per step); each row's entries are views
            numbers = torch.tensor([self._tensor_numbers(b, i) for i in eager], dtype=b.compute_dtype, device=device)
        # 8-bit / bf16 states are decoded a slice of tensors at a time, as on the list-wise path;
        # within a slice, same-shaped tensors step together (``_step_group``)
        for part in self._slices([b.params[i].numel() for i in eager]):
            decoded = self._decode(b, [eager[j] for j in part])
            for rows, static in self._shape_groups(b, transforms, eager, part):
                ids = [eager[r] for r in rows]
                # rows stacked from views: indexing with a list would copy the index to the device
                if len(ids) > 1 and self._batched and self._step_group(
                        b, ids, torch.stack([numbers[r] for r in rows]), targets, hp, transforms, static, kept):
                    continue
                for row, i in zip(rows, ids):
                    x = self._slot(targets[i], b.grads[i], {k: v[i] for k, v in b.state.items()}, numbers[row],
                                   None if b.lr_scale_t is None else b.lr_scale_t[i], hp, b.roles[i],
                                   {k: v[i] for k, v in b.extras.items()})
                    targets[i].copy_(tensor_step(transforms, x, self.skip_nonfinite, static))
                    kept[i] = x.scratch.get("cautious_kept")
                    b.scratch.setdefault("skipped", []).append(x.scratch["skipped"].reshape(1))
                    del x  # its temporaries go before the next tensor's step
            self._encode(b, decoded)
        if any(getattr(t, "name", "") == "cautious" for t in transforms):
            b.scratch["cautious_kept"] = kept
        self._finish(b, states, targets)

    #: the eager per-tensor path steps same-shaped tensors together (``_step_group``), at most
    #: this many elements per call: its temporaries (a few per op, 4 MiB each in fp32) stay
    #: bounded on a full fine-tune's group of same-shaped weights
    GROUP_ELEMENTS = 1 << 20

    def _shape_groups(self, b: Bucket, transforms: list, eager: list[int],
                      part: list[int]) -> list[tuple[list[int], tuple]]:
        """Positions ``part`` (rows of ``eager``) grouped by what the per-tensor math specialises
        on -- shape, the transforms' static keys (phases), which states exist -- each group with
        its static keys, in groups of at most ``GROUP_ELEMENTS`` elements."""
        groups: dict[tuple, list[int]] = {}
        for row in part:
            i = eager[row]
            key = (tuple(b.params[i].shape), static_keys(transforms, b.steps[i], b.hp),
                   tuple(v[i] is None for v in b.state.values()))
            groups.setdefault(key, []).append(row)
        out = []
        for (shape, static, _), rows in groups.items():
            per = max(1, self.GROUP_ELEMENTS // max(1, math.prod(shape)))
            out += [(rows[j:j + per], static) for j in range(0, len(rows), per)]
        return out

    def _step_group(self, b: Bucket, ids: list[int], numbers: Tensor, targets: list[Tensor], hp: dict,
                    transforms: list, static: tuple, kept: list) -> bool:
        """``tensor_step`` of tensors ``ids`` (one shape) as one batched computation: the math is
        vmapped (``torch.func.vmap``) over stacked copies of their parameters, gradients and
        states ``[len(ids), *shape]``, and the results are copied back. The same operations as
        one tensor at a time in a fraction of the calls (each runs once per group instead of once
        per tensor: on a GPU, kernel launches). ``numbers``: ``[len(ids), 4]``, the tensors' rows
        of ``_tensor_numbers``. False, with one message, where vmap cannot run the math (nothing
        written then)."""
        keys = [k for k, v in b.state.items() if v[ids[0]] is not None]
        extra_keys = list(b.extras)
        stacked = [torch.stack([b.state[k][i] for i in ids]) for k in keys]
        extras = [torch.stack([b.extras[k][i].reshape(()) for i in ids]) for k in extra_keys]
        rate_t = None if b.lr_scale_t is None else torch.stack([b.lr_scale_t[i].reshape(()) for i in ids]).to(numbers)

        def one(p, g, st, nums, ex, rt):
            states = {k: None for k in b.state}  # absent states stay None, as on the per-tensor path
            states.update(zip(keys, st))
            # roles reach the math through the prepare hooks' extras, as in the fused kernels
            x = self._slot(p, g, states, nums, rt, hp, None, dict(zip(extra_keys, ex)))
            new = tensor_step(transforms, x, self.skip_nonfinite, static)
            k = x.scratch.get("cautious_kept")
            return new, x.scratch["skipped"], torch.zeros_like(x.scratch["skipped"]) if k is None else k

        try:
            new, skipped, kept_now = torch.func.vmap(one, in_dims=(0, 0, 0, 0, 0, None if rate_t is None else 0))(
                torch.stack([targets[i] for i in ids]), torch.stack([b.grads[i] for i in ids]), stacked, numbers,
                extras, rate_t)
        except Exception as exc:  # only the stacked copies were written: the caller steps one tensor at a time
            self._batched = False
            self.note_once(f"the batched eager step is unavailable ({type(exc).__name__}: {exc}); stepping one "
                           "tensor at a time (slower)")
            return False
        torch._foreach_copy_([targets[i] for i in ids], list(new.unbind(0)))
        for k, value in zip(keys, stacked):
            torch._foreach_copy_([b.state[k][i] for i in ids], list(value.unbind(0)))
        b.scratch.setdefault("skipped", []).append(skipped.reshape(-1))
        for j, i in enumerate(ids):  # read by the caller only when the chain has Cautious
            kept[i] = kept_now[j]
        return True

    @staticmethod
    def _slot(p: Tensor, g: Tensor, states: dict, numbers: Tensor, rate_t: Optional[Tensor], hp: dict, role: Any,
              extra: dict) -> Slot:
        """One tensor's ``Slot`` for the per-tensor math: ``numbers`` is its row of
        ``_tensor_numbers`` ([4]: step, rate factor, decay multiplier, mask unit); ``rate_t`` its
        data-dependent rate factor (``Bucket.lr_scale_t``) or None."""
        t, lr_scale, decay, mask_scale = numbers.unbind()
        x = Slot(p, g, states, t, hp, role, lr_scale if rate_t is None else lr_scale * rate_t, decay, mask_scale)
        x.extra = extra
        return x

    @staticmethod
    def _tensor_numbers(b: Bucket, i: int) -> tuple[float, float, float, float]:
        """Step, rate factor, decay multiplier and mask unit of tensor ``i`` -- the fixed head of
        ``fused.Layout`` and of the per-tensor Slot."""
        decay = b.decay_scale[i] if b.decay_scale is not None else 1.0
        return float(b.steps[i]), float(b.lr_scale[i]), float(decay), float(b.lr_mask_scale)

    @staticmethod
    def _reread_for_eager(b: Bucket, indices: Iterable[int]) -> None:
        """The views of tensors ``indices`` as the eager paths need them: fp16 states (kept as
        stored for the kernels) cast to the compute dtype (``_run_bucket`` stores them back at
        the end). 8-bit and bf16 states stay encoded: the eager paths decode them as they go."""
        for key, views in b.state.items():
            for j in indices:
                v = views[j]
                if isinstance(v, Tensor) and v.dtype == torch.float16 and b.compute_dtype != torch.float16:
                    views[j] = v.to(b.compute_dtype)

    def _run_chunks(self, b: Bucket, states: list[dict], targets: list[Tensor], fused: tuple,
                    kept: list) -> list[int]:
        """Run the contiguous tensors through the compiled kernels, ``chunk_size()`` tensors per
        call; return the indices left for the eager per-tensor path (non-contiguous parameters;
        a non-contiguous gradient is read through a contiguous copy)."""
        kernels, _, keys = fused
        statics = [static_keys(kernels["chain"].transforms, s, b.hp) for s in b.steps]
        plan, eager, buffers = self._chunk_plan(b, states, targets, keys, statics)
        # the 8-bit / bf16 states' buffers hold memory during the step only (the views into them are
        # kept with the plan; freeing the storage, not the tensors, keeps them valid)
        for buf in buffers:
            buf.untyped_storage().resize_(buf.numel() * buf.element_size())
        try:
            return self._call_kernels(b, targets, fused, kept, plan, eager, statics)
        finally:
            for buf in buffers:
                buf.untyped_storage().resize_(0)

    def _call_kernels(self, b: Bucket, targets: list[Tensor], fused: tuple, kept: list, plan: list,
                      eager: list[int], statics: list[tuple]) -> list[int]:
        """The kernel calls of ``plan``, each between the decode and the encode of its 8-bit / bf16 states."""
        kernels, layout, keys = fused
        hp_values = layout.values(b.hp)
        extra_keys = tuple(b.extras)
        # every call's rows of numbers come from one tensor, in plan order; data-dependent rates
        # (C-Optim's multiplier, importance) multiply its rate column on the device -- one op per
        # bucket rather than one more kernel input (guarded and passed) per tensor
        order = [i for idx, *_ in plan for i in idx]
        if order:
            numbers = torch.tensor([[*self._tensor_numbers(b, i), *hp_values] for i in order],
                                   dtype=b.compute_dtype, device=targets[order[0]].device)
            if b.lr_scale_t is not None:
                numbers[:, fused_mod.Layout.FIXED.index("rate")] *= torch.stack(
                    [b.lr_scale_t[i].detach().reshape(()) for i in order]).to(numbers)
        done = 0
        for idx, flat_params, flat_states, encoded in plan:
            k, static, device = len(idx), statics[idx[0]], targets[idx[0]].device.type
            if (k, extra_keys, static, device) not in kernels:
                kernels[(k, extra_keys, static, device)] = fused_mod.make_kernel(
                    kernels["chain"], layout, keys, k, self.skip_nonfinite, extra_keys, static, device)
            extras = [tuple(b.extras[e][i].detach() for e in extra_keys) for i in idx] if extra_keys else None
            try:
                quant.decode_all([(b.state[key][i], buf) for i, key, buf in encoded])  # this call's 8-bit / bf16 states
                out, skipped = kernels[(k, extra_keys, static, device)](
                    flat_params, [fused_mod.kernel_view(b.grads[i].contiguous(), targets[i]) for i in idx], flat_states,
                    numbers[done:done + k].clone(), extras)  # a fresh tensor: no storage offset to guard on
                done += k  # the call wrote its tensors: from here an error must not lead to an eager retry
                quant.encode_all([(b.state[key][i], buf) for i, key, buf in encoded])
            except Exception as exc:
                exc.hina_tensors_done = done  # type: ignore[attr-defined]
                raise
            b.scratch.setdefault("skipped", []).append(skipped)
            for j, i in enumerate(idx):
                kept[i] = out[j]
        return eager

    def _chunk_plan(self, b: Bucket, states: list[dict], targets: list[Tensor], keys: tuple[str, ...],
                    statics: list[tuple]) -> tuple[list[tuple[list[int], list, list, list]], list[int], list[Tensor]]:
        """The kernel calls of a bucket: per chunk its indices, the kernel views of its parameters
        and states, and its 8-bit / bf16 states as (index, key, buffer) -- the call works on buffers they
        are decoded into before it and encoded from after it --; the indices left for the eager
        path; and the buffers, one per position in a call and encoded key, as large as the largest
        tensor any call puts there (calls run one after another and share them, so a step holds
        at most one call's encoded states decoded). A chunk's tensors share a shape class and their
        transforms' ``static_keys`` (e.g. the phase). When every tensor is persistent (the
        parameters themselves, states stored as they are read) the plan is kept and reused while
        the same tensor objects come back (it holds them, so their ids cannot be reused);
        rebuilding it is ~10 ms per step on the sd15 set. Buckets partition the flat parameter
        indices, so a bucket's first index identifies it."""
        objs = targets + [stored_tensor(v) for k in keys for v in b.state[k]]
        # a trainer may re-point ``p.data`` (a dtype cast, a device move): the storage is checked too
        ids = list(map(id, objs)) + [t.data_ptr() for t in targets] + statics
        cached = self._plans.get(b.indices[0])
        if cached is not None and cached[0] == ids:
            return cached[2], cached[3], cached[4]
        persistent = all(t is p for t, p in zip(targets, b.params)) and all(
            v is None or stored_tensor(v) is st.get(key) for key in keys for v, st in zip(b.state[key], states))
        ok = [i for i in range(len(b)) if targets[i].is_contiguous()]
        calls = fused_mod.chunks([(fused_mod.shape_class(targets[i]), statics[i]) for i in ok],
                                 [targets[i].numel() for i in ok], fused_mod.chunk_size())
        calls = [[ok[j] for j in chunk] for chunk in calls]
        sizes: dict[tuple[int, str], int] = {}
        for idx in calls:
            for j, i in enumerate(idx):
                for key in keys:
                    if isinstance(b.state[key][i], Encoded):
                        sizes[(j, key)] = max(sizes.get((j, key), 0), b.state[key][i].numel())
        buffers = {pos: torch.empty(n, dtype=b.compute_dtype, device=b.params[0].device) for pos, n in sizes.items()}
        plan = []
        for idx in calls:
            encoded = [(i, key, buffers[(j, key)][:b.state[key][i].numel()])
                       for j, i in enumerate(idx) for key in keys if isinstance(b.state[key][i], Encoded)]
            views = {(i, key): buf.view(b.state[key][i].shape) for i, key, buf in encoded}
            plan.append((idx, [fused_mod.kernel_view(targets[i], targets[i]) for i in idx],
                         [tuple(fused_mod.kernel_view(views.get((i, key), b.state[key][i]), targets[i]) for key in keys)
                          for i in idx], encoded))
        in_plan = set(ok)
        eager = [i for i in range(len(b)) if i not in in_plan]
        kept = (plan, eager, list(buffers.values()))
        if persistent:
            self._plans[b.indices[0]] = (ids, objs, *kept)
        return kept

    def _run_fused(self, gi: int, b: Bucket, states: list[dict], chain: Chain) -> bool:
        """Run the bucket through the compiled per-tensor kernel; False if compilation failed."""
        fused = self._kernels.get(gi)
        if fused is None:
            layout, keys = fused_mod.Layout(b.hp), tuple(b.state)
            fused = ({"chain": chain}, layout, keys)  # kernels by (chunk size, extra keys, static keys, device), made on demand
            self._kernels[gi] = fused
        try:
            self._run_per_tensor(b, states, chain.transforms, fused)
        except Exception as exc:  # no compiler, unsupported platform: keep training, eagerly
            if getattr(self, "_fused_checked", False) or getattr(exc, "hina_tensors_done", 0) > 0:
                # some tensors of this step were already updated: an eager retry would update them
                # twice, so stop instead of corrupting the run
                raise
            self.fused = False
            self._plans.clear()
            # the eager path is list-wise for the Hina recipes and batched by shape for the
            # Automagic ones (per-tensor math only): "eager" names both
            self.note_once(f"fused kernels are unavailable ({type(exc).__name__}: {str(exc)[:200]}); using the "
                           "eager path (slower; see docs/BENCHMARKS.md)")
            return False
        self._fused_checked = True
        return True

    def _targets(self, b: Bucket, states: list[dict]) -> list[Tensor]:
        """Compute-dtype tensors to update: the params themselves, or fp32 working copies."""
        out = []
        for p, st in zip(b.params, states):
            if p.dtype == b.compute_dtype:
                out.append(p)
            elif "master_param" in st:
                out.append(st["master_param"])
            elif "kahan_comp" in st:
                out.append(p.float() + st["kahan_comp"].float())
            else:
                out.append(p.to(b.compute_dtype))
        return out

    def _finish(self, b: Bucket, states: list[dict], targets: list[Tensor]) -> None:
        for p, st, x, t, idx in zip(b.params, states, targets, b.steps, b.indices):
            if x is p:
                continue
            if "master_param" in st or self.bf16_rounding == "nearest" or p.dtype != torch.bfloat16:
                p.copy_(x)
            elif "kahan_comp" in st:
                kahan_write(p, x, st["kahan_comp"])
            else:
                p.copy_(self.store.round_bf16(x, _seed(self.store.seed, t, idx, "param")))

    # -- logging -----------------------------------------------------------------------------
    def _record(self, b: Bucket, record: dict) -> None:
        """Keep what log_dict() reports, as Python numbers or device tensors (no sync here)."""
        skipped = b.scratch.get("skipped")
        if skipped:
            count = torch.cat([s.reshape(-1) for s in skipped]).sum()
            self._nonfinite = count if self._nonfinite is None else self._nonfinite + count.to(self._nonfinite.device)
        record.setdefault("elements", 0)
        record["elements"] += sum(p.numel() for p in b.params)
        record.setdefault("rates", []).extend(s * b.lr_mask_scale for s in b.lr_scale)
        record.setdefault("decay", []).extend(b.decay_scale or [1.0] * len(b))
        if b.lr_scale_t is not None:
            record.setdefault("rate_t", []).extend(b.lr_scale_t)
        kept = b.scratch.get("cautious_kept")
        if kept is not None:  # per tensor: kept count + 1, or None / 0 where Cautious did not run on it
            record.setdefault("kept", []).extend(
                (k, p.numel()) for k, p in zip(kept, b.params) if k is not None)

    def log_dict(self) -> dict[str, float]:
        """Plain floats for TensorBoard / W&B, computed now (not every step).

        hina/lr/group{i}: the group's scheduled lr; hina/step_size/group{i}: the mean effective
        per-tensor rate of the last step (lr x LoRA+/LoKr/importance scales; for lr masks, the
        mask's mean rate); hina/wd_multiplier/group{i}: mean dynamic weight-decay multiplier;
        hina/cautious_kept/group{i}: fraction of update elements Cautious kept; hina/lr_mask/*:
        statistics of the per-element rates; hina/nonfinite_skipped: tensor steps skipped because
        their gradient or update was NaN/inf (their value and state left untouched);
        hina/step, hina/state_bytes_per_element.
        """
        out: dict[str, float] = {}
        for gi, g in enumerate(self.param_groups):
            out[f"hina/lr/group{gi}"] = float(g["lr"])
            rec = self._last.get(gi)
            if not rec or not rec.get("rates"):
                continue
            rates = rec["rates"]
            if "rate_t" in rec and len(rec["rate_t"]) == len(rates):
                rates = [r * float(t) for r, t in zip(rates, rec["rate_t"])]
            out[f"hina/step_size/group{gi}"] = float(g["lr"]) * sum(rates) / len(rates)
            out[f"hina/wd_multiplier/group{gi}"] = sum(rec["decay"]) / len(rec["decay"])
            if rec.get("kept"):
                counts = torch.stack([k.float().reshape(()).cpu() for k, _ in rec["kept"]])
                ran = counts > 0  # the fused kernels report 0 for a tensor Cautious skipped (a phase)
                elements = float((ran.double() * torch.tensor([n for _, n in rec["kept"]], dtype=torch.float64)).sum())
                if elements > 0:
                    out[f"hina/cautious_kept/group{gi}"] = float(torch.where(ran, counts - 1, 0).sum()) / elements
        out["hina/nonfinite_skipped"] = float(self._nonfinite) if self._nonfinite is not None else 0.0
        masks = [(m, g) for g in self.param_groups for _, m in self.stored_lr_rates(g)]
        if masks:
            flat = torch.cat([m.float().abs().reshape(-1) * g["max_lr"] for m, g in masks])
            out.update({"hina/lr_mask/mean": float(flat.mean()), "hina/lr_mask/min": float(flat.min()),
                        "hina/lr_mask/max": float(flat.max())})
        steps = [st["step"] for st in self.state.values() if "step" in st]
        out["hina/step"] = float(max(steps)) if steps else 0.0
        out["hina/state_bytes_per_element"] = self.state_bytes_per_element()
        return out

    def state_bytes_per_element(self) -> float:
        """Bytes of optimizer state per element of the parameters that have state."""
        total = elems = 0
        for p, st in self.state.items():
            total += StateStore.nbytes(st)
            elems += p.numel()
        return float(total) / elems if elems else 0.0

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        current_hp = [{k: g[k] for k in self.defaults if k in g} for g in self.param_groups]
        aligned = self._align_by_names(state_dict)
        raw_state = aligned["state"]
        super().load_state_dict(aligned)
        for group, hp in zip(self.param_groups, current_hp):
            for key, value in hp.items():  # a setting newer than the checkpoint: the constructor's value
                group.setdefault(key, value)
        self._invalidate()
        self._build_structure()
        # torch casts every floating state to the param dtype; put back the saved values
        # exactly, then bring each to this optimizer's storage format.
        reshaped: list[str] = []
        for gi, group in enumerate(self.param_groups):
            specs = self.chain_for(gi).state_specs(group)
            saved_ids = aligned["param_groups"][gi]["params"]
            names = group.get("param_names") or [None] * len(group["params"])
            for j, (p, sid) in enumerate(zip(group["params"], saved_ids)):
                saved = raw_state.get(sid)
                if not saved:
                    continue
                st = self.state[p]
                for k, v in saved.items():
                    st[k] = v.to(p.device) if isinstance(v, Tensor) else v
                if not self._state_fits(p, st, specs):
                    self.state.pop(p, None)
                    reshaped.append(names[j] or f"group {gi} param {j}")
                    continue
                for spec in specs:
                    self.store.normalize(st, spec, p, _compute_dtype(p.dtype))
                if "master_param" in st:
                    st["master_param"] = st["master_param"].to(p.device, torch.float32)
                if "kahan_comp" in st:
                    st["kahan_comp"] = st["kahan_comp"].to(p.device, p.dtype)
        if reshaped:
            if self.last_load_report is not None:
                self.last_load_report["reshaped"] = reshaped
            warnings.warn(f"{type(self).__name__}.load_state_dict: {len(reshaped)} parameter(s) changed shape since "
                          f"the checkpoint; their state starts fresh{_few(reshaped)}.", stacklevel=2)
        changed = _changed_hparams(current_hp, aligned["param_groups"])
        if changed:
            kept = "the constructor's values are used" if self.resume_hparams == "new" else \
                "the checkpoint's values are used; pass resume_hparams='new' to use the constructor's"
            warnings.warn(f"{type(self).__name__}.load_state_dict: {len(changed)} hyperparameter(s) differ from the "
                          f"checkpoint ({'; '.join(changed)}); resume_hparams={self.resume_hparams!r}: {kept}.",
                          stacklevel=2)
        if self.resume_hparams == "new":
            for g, hp in zip(self.param_groups, current_hp):
                g.update(hp)
        if raw_state:  # a real resume (accelerate's prepare round-trips an empty state: nothing to say)
            log.info("%s: resume_hparams=%r: hyperparameters from the %s are used", type(self).__name__,
                     self.resume_hparams, "constructor" if self.resume_hparams == "new" else "checkpoint")
        self._invalidate()

    def _state_fits(self, p: Tensor, st: dict, specs: list[StateSpec]) -> bool:
        for spec in specs:
            v = st.get(spec.key)
            expected = tuple(spec.shape(p)) if spec.shape is not None else tuple(p.shape)
            if isinstance(v, Tensor) and tuple(v.shape) != expected:
                return False
        return True

    def _align_by_names(self, state_dict: dict) -> dict:
        """Re-order saved state to the current parameters by name when names allow it."""
        sd = {"state": dict(state_dict["state"]), "param_groups": copy.deepcopy(state_dict["param_groups"])}
        saved_groups = sd["param_groups"]

        def names_of(g: dict, n: int) -> Optional[list[str]]:
            return roles_mod.group_names(g, n)[0]

        saved_names = [names_of(g, len(g["params"])) for g in saved_groups]
        cur_names = [names_of(g, len(g["params"])) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        cur_sizes = [len(g["params"]) for g in self.param_groups]
        have_names = all(n is not None for n in saved_names + cur_names)
        if not have_names:
            if saved_sizes != cur_sizes:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the checkpoint has param groups of sizes {saved_sizes} "
                    f"but this optimizer has {cur_sizes}, and parameter names were not recorded, so the state "
                    "cannot be matched to parameters. Rebuild the network with the same settings as the saved "
                    "run, or pass named parameters (param_names) so state can be remapped by name.")
            self.last_load_report = {"remapped": False, "added": [], "removed": [], "reshaped": []}
            return sd
        if saved_names == cur_names:
            self.last_load_report = {"remapped": False, "added": [], "removed": [], "reshaped": []}
            return sd
        by_name: dict[str, tuple[int, int]] = {}  # name -> (saved flat id, saved group index)
        for sgi, (g, names) in enumerate(zip(saved_groups, saved_names)):
            for sid, name in zip(g["params"], names or []):
                by_name[name] = (sid, sgi)
        new_state: dict[int, dict] = {}
        new_groups = []
        next_id = 0
        added = []
        for gi, (g, names) in enumerate(zip(self.param_groups, cur_names)):
            # hyperparameters follow the parameters: take the saved group holding most of this group's names
            votes = [by_name[n][1] for n in names or [] if n in by_name]
            source = saved_groups[max(set(votes), key=votes.count)] if votes else g
            base = {k: v for k, v in source.items() if k != "params"}
            ids = list(range(next_id, next_id + len(g["params"])))
            next_id += len(ids)
            for new_id, name in zip(ids, names or []):
                hit = by_name.get(name)
                if hit is None:
                    added.append(name)
                elif hit[0] in sd["state"]:
                    new_state[new_id] = sd["state"][hit[0]]
            base["params"] = ids
            base["param_names"] = list(names or [])
            if "named" in g:
                base["named"] = list(g["named"])
            new_groups.append(base)
        cur_set = {n for names in cur_names for n in names or []}
        removed = [n for n in by_name if n not in cur_set]
        self.last_load_report = {"remapped": True, "added": added, "removed": removed, "reshaped": []}
        warnings.warn(
            f"{type(self).__name__}.load_state_dict: parameters differ from the checkpoint; state was matched by "
            f"name. {len(added)} new parameter(s) start fresh{_few(added)}, {len(removed)} saved parameter(s) are "
            f"gone{_few(removed)}.", stacklevel=3)
        return {"state": new_state, "param_groups": new_groups}


def _changed_hparams(constructed: list[dict], saved_groups: list[dict]) -> list[str]:
    """'name: checkpoint X, constructor Y' for each hyperparameter that differs in some group.
    ``lr`` is left out: a scheduler moves it, so the saved value always differs from the first."""
    out: dict[str, str] = {}
    for gi, (now, saved) in enumerate(zip(constructed, saved_groups)):
        for key, value in now.items():
            if key != "lr" and key in saved and key not in out and _differs(saved[key], value):
                out[key] = f"{key}: checkpoint {saved[key]!r}, constructor {value!r}" + (f" (group {gi})" if gi else "")
    return list(out.values())


def _differs(a: Any, b: Any) -> bool:
    """Whether two hyperparameter values differ (a list and a tuple of the same numbers do not)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    try:
        return bool(a != b)
    except (RuntimeError, TypeError, ValueError):  # tensors of several elements: not a setting to compare
        return False


def _all_finite(tensors: list[Optional[Tensor]]) -> Tensor:
    """``[len(tensors)]`` bool: whether each tensor is finite everywhere (True for None; at least
    one must be a tensor), from their largest magnitudes (``foreach_norm(inf)``: NaN and inf
    propagate, never an overflow), in a few list-wise ops whatever the number of tensors."""
    present = [t for t in tensors if t is not None]
    largest = torch.stack(torch._foreach_norm(present, float("inf")))
    if len(present) < len(tensors):
        zero = largest.new_zeros(())
        it = iter(largest.unbind())
        largest = torch.stack([next(it) if t is not None else zero for t in tensors])
    return torch.isfinite(largest)


def _few(names: list[str], k: int = 3) -> str:
    if not names:
        return ""
    more = f", ... (+{len(names) - k})" if len(names) > k else ""
    return " (" + ", ".join(names[:k]) + more + ")"
