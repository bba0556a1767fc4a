"""Data-parallel and flattened-parameter training (DESIGN.md §5, INTEGRATION.md §7.3).

* Two processes with ``torch.distributed`` (gloo, CPU) train a DDP-wrapped model on different
  data with every technique on; parameters and optimizer state must stay bit-identical across
  the ranks. The C-Optim recipe gets each rank's *own* loss through ``set_loss``: the optimizer
  averages it over the ranks, or their context rates (and parameters) drift apart.
* DeepSpeed ZeRO 1/2 swaps each group's tensors for one flat fp32 partition after the optimizer
  is built: the name-aware features switch off with one warning, and training goes on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hina_kohya import (AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved,
                        HinaAdamW)
from helpers import TinyLoRANet, batch, every_technique

RECIPES = [HinaAdamW, AdaptiveHinaAdamW, Automagic_CameAMP, Automagic_CameAMP_COptim, Automagic_CameAMP_Improved]
STEPS = 20
WORLD = 2
# (recipe, state precision, parameter dtype): every recipe in fp32, and the 8-bit and bf16 paths
# (quantisation and seeded stochastic rounding) once each
CASES = [(cls, "fp32", torch.float32) for cls in RECIPES] + [
    (Automagic_CameAMP_COptim, "8bit", torch.float32), (HinaAdamW, "fp32", torch.bfloat16)]
SHORT = dict(warmup_steps=6, wd_transition_steps=5, relationship_discovery_interval=4)


def _optimizer(cls, model, precision):
    kw = every_technique(cls, if_accepted={**SHORT, "max_lr": 2e-2})
    return cls(model.groups(lrs=(5e-3, 2e-3)), state_precision=precision, min_8bit_size=1, **kw)


def _state_tensors(opt) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"{idx}.{key}"] = value
    return out


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        for n, (cls, precision, dtype) in enumerate(CASES):
            model = TinyLoRANet(0, dtype=dtype)  # same initial weights on every rank
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = _optimizer(cls, model, precision)
                for step in range(STEPS):
                    x, y = batch(STEPS * rank + step, model.dims, dtype)  # each rank its own data
                    loss = torch.nn.functional.mse_loss(ddp(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # DDP averages the gradients
                    if hasattr(opt, "set_loss"):
                        opt.set_loss(loss)  # this rank's loss only
                    opt.step()
            results[n] = {"params": [p.detach().clone() for p in model.parameters()],
                          "state": _state_tensors(opt), "log": opt.log_dict()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_bit_identical_parameters_and_state(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for n, (cls, precision, dtype) in enumerate(CASES):
        case = f"{cls.__name__}/{precision}/{dtype}"
        a, b = ranks[0][n], ranks[1][n]
        start = list(TinyLoRANet(0, dtype=dtype).parameters())
        for p0, pa, pb in zip(start, a["params"], b["params"]):
            assert not torch.equal(pa, p0.detach()), f"{case}: a parameter did not train"
            assert torch.equal(pa, pb), f"{case}: parameters differ between the ranks"
        assert a["state"].keys() == b["state"].keys() and a["state"], case
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), f"{case}: state {key} differs between the ranks"
        if cls is Automagic_CameAMP_COptim:
            assert a["log"]["hina/coptim/signal_is_loss"] == 1.0
            assert a["log"]["hina/coptim/multiplier"] == b["log"]["hina/coptim/multiplier"]


def _flatten_like_zero(opt) -> list[torch.Tensor]:
    """What DeepSpeed ZeRO 1/2 does after building the optimizer: each group's tensors become
    one flat fp32 partition (here the whole group: one rank)."""
    flats = []
    for g in opt.param_groups:
        flat = torch.cat([p.detach().float().reshape(-1) for p in g["params"]])
        g["params"] = [flat]
        flats.append(flat)
    return flats


def _train_flat(opt, flats, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = [torch.randn(f.shape, generator=gen) for f in flats]
    losses = []
    for _ in range(steps):
        loss = sum(((f - t) ** 2).sum() for f, t in zip(flats, target))
        losses.append(float(loss))
        for f, t in zip(flats, target):
            f.grad = 2 * (f - t)
        opt.step()
    return losses


def _name_aware_notes(caught) -> list[str]:
    return [str(w.message) for w in caught if "name-aware features" in str(w.message)]


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("after_steps", [0, 3], ids=["before-first-step", "after-3-steps"])
def test_zero_flattened_groups_switch_name_aware_features_off_with_one_warning(cls, after_steps):
    model = TinyLoRANet(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _optimizer(cls, model, "fp32")
        if after_steps:
            from helpers import train
            train(model, opt, after_steps)
            assert opt.structure.named  # names in use before the swap
        flats = _flatten_like_zero(opt)
        losses = _train_flat(opt, flats, 12)
    notes = _name_aware_notes(caught)
    assert len(notes) == 1, notes
    assert "2 param group(s)" in notes[0] and "DeepSpeed ZeRO" in notes[0]
    assert not opt.structure.named
    assert all(torch.isfinite(f).all() for f in flats)
    assert losses[-1] < losses[0], losses


def test_a_flattened_group_under_its_single_name_is_recognised_by_its_shape():
    # one named tensor per group: the name count still matches after flattening, the shape does not
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = HinaAdamW([{"params": [w], "param_names": ["lora_unet_x.lora_up.weight"]}], lr=1e-3)
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.structure.named
    flat = w.detach().reshape(-1).clone()
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.randn_like(flat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    notes = _name_aware_notes(caught)
    assert len(notes) == 1 and "shapes [32]" in notes[0], notes
    assert not opt.structure.named

