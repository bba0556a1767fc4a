"""``hina-kohya demo``: the shipped pretrained denoiser, its data, the adapter task and the report."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from hina_kohya.bench import adapter_task, demo, denoiser, shapes  # noqa: E402
from hina_kohya.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return denoiser.load_pretrained()


def test_shapes_are_deterministic_in_range_and_distinct():
    a, na, ca = shapes.sample(shapes.CONCEPTS, 12, 32, seed=3)
    b, nb, cb = shapes.sample(shapes.CONCEPTS, 12, 32, seed=3)
    c, _, _ = shapes.sample(shapes.CONCEPTS, 12, 32, seed=4)
    assert torch.equal(a, b) and na == nb and ca == cb
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert shapes.NEW_CONCEPT not in shapes.BASE_CONCEPTS
    g = torch.Generator().manual_seed(0)
    ring, disc = shapes.render(["ring", "disc"], ["red", "red"], 32, g)
    # same centre and radius: the ring is the disc's outline, so it covers strictly less
    assert (ring > -0.5).sum() < (disc > -0.5).sum()


def test_shapes_reject_unknown_names():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="unknown concept 'star'"):
        shapes.render(["star"], ["red"], 16, g)
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        shapes.render(["disc"], ["teal"], 16, g)


def test_the_task_sets_share_no_image(base):
    _, tables, _ = base
    data = adapter_task.make_data(tables, n_train=16, n_heldout=16, seed=0)
    sets = [data.train_x, data.heldout.x0, data.validation.x0, data.base_heldout.x0]
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            assert not any(torch.equal(x, y) for x in a for y in b)


def test_different_seeds_start_from_different_adapters(base):
    unet = denoiser.load_pretrained()[0]
    a = adapter_task.digest(adapter_task.make_network(unet, "lokr", 0))
    unet = denoiser.load_pretrained()[0]
    assert a == adapter_task.digest(adapter_task.make_network(unet, "lokr", 0))
    unet = denoiser.load_pretrained()[0]
    assert a != adapter_task.digest(adapter_task.make_network(unet, "lokr", 1))


class _Exploding(torch.optim.SGD):
    """SGD that writes NaN into the adapter at its third step."""

    def step(self, closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        super().step(closure)
        if self.calls == 3:
            with torch.no_grad():
                for g in self.param_groups:
                    for p in g["params"]:
                        p.fill_(float("nan"))


def test_a_diverged_run_stops_and_keeps_its_curve_aligned_by_step(base):
    unet, tables, _ = base
    unet = denoiser.load_pretrained()[0]
    data = adapter_task.make_data(tables, n_train=4, n_heldout=8, seed=0)
    network = adapter_task.make_network(unet, "lora", 0)
    opt = _Exploding(adapter_task.named_groups(network, 1e-3), lr=1e-3)
    r = adapter_task.train(unet, network, opt, data, steps=10, batch=2, seed=0, label="x", eval_every=2,
                           device=torch.device("cpu"))
    assert r.diverged_at == 4  # the NaN written at step 3 makes step 4's loss NaN
    assert [s for s, _ in r.curve] == [0, 2, 4, 6, 8, 10]
    assert math.isfinite(r.curve[1][1]) and all(v == float("inf") for _, v in r.curve[2:])
    assert len(r.train_loss) == 4  # it stopped
    assert r.steps_to(float("inf")) is None and r.steps_to(r.curve[0][1]) == 0


def test_the_shipped_denoiser_is_pretrained_and_has_not_seen_the_new_concept(base):
    unet, tables, meta = base
    assert json.loads(meta["concepts"]) == list(shapes.BASE_CONCEPTS)
    data = adapter_task.make_data(tables, n_train=4, n_heldout=96, seed=1)
    sched = denoiser.scheduler()
    fresh = denoiser.build_unet(seed=5).eval()
    trained_base = adapter_task.heldout_loss(unet, sched, data.base_heldout)
    untrained_base = adapter_task.heldout_loss(fresh, sched, data.base_heldout)
    trained_new = adapter_task.heldout_loss(unet, sched, data.heldout)
    assert trained_base < 0.5 * untrained_base  # genuinely pretrained
    assert trained_new > trained_base  # the new concept is new to it: room for the adapter


def test_pretraining_script_output_loads(tmp_path):
    path = tmp_path / "w.safetensors"
    info = denoiser.pretrain(path, steps=2, batch=2, progress=False)
    unet, tables, meta = denoiser.load_pretrained(path)
    assert meta["steps"] == "2" == info["steps"]
    assert set(tables) == {"concept", "color"} and tables["concept"].shape[0] == len(shapes.CONCEPTS)
    assert not any(p.requires_grad for p in unet.parameters())


def test_load_pretrained_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain_demo_denoiser.py"):
        denoiser.load_pretrained(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"unet.x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"unet_config": "{}"})
    with pytest.raises(ValueError, match="another denoiser configuration"):
        denoiser.load_pretrained(tmp_path / "other.safetensors")


def test_quick_demo_writes_every_output_and_a_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--output", str(out), "--steps", "6"]) == 0
    printed = capsys.readouterr().out
    assert "| held-out loss, step 0 |" in printed and "steps to AdamW's final held-out loss" in printed
    for name in ("report.json", "report.md", "loss_curve.png", "adapter_hina.safetensors",
                 "adapter_adamw.safetensors", "diagnostics_hina.json"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    hina, adamw = report["runs"]["hina"], report["runs"]["adamw"]
    assert hina["optimizer"].startswith("lokr-sd (HinaAdamW)") and adamw["optimizer"] == "torch.optim.AdamW"
    assert [s for s, _ in hina["curve"]] == [s for s, _ in adamw["curve"]] and hina["curve"][-1][0] == 6
    # one seed: the same adapter initialisation (not only the same step-0 loss: every LyCORIS
    # adapter starts as a zero change) and the same held-out problems for both runs
    assert hina["adapter_init_sha256"] == adamw["adapter_init_sha256"] and len(hina["adapter_init_sha256"]) == 64
    assert hina["curve"][0][1] == adamw["curve"][0][1]
    assert hina["diverged_at"] is None and "loss_curve.png" in report["written"]
    for run in (hina, adamw):
        assert all(math.isfinite(v) for _, v in run["curve"])
        assert run["optimizer_state_bytes"] > 0 and run["adapter_params"] > 0
    assert hina["curve"][-1][1] != hina["curve"][0][1]  # it trained
    diagnostics = json.loads((out / "diagnostics_hina.json").read_text())
    assert diagnostics and all(math.isfinite(v) for v in diagnostics.values())

    # the adapter loads back into LyCORIS (sd-scripts' key format) and reproduces the trained weights
    from lycoris.kohya import create_network_from_weights
    from safetensors.torch import load_file

    unet = denoiser.load_pretrained()[0]
    network, weights = create_network_from_weights(1.0, str(out / "adapter_hina.safetensors"), None, [], unet)
    saved = load_file(str(out / "adapter_hina.safetensors"))
    assert any(k.endswith("lokr_w1") for k in saved) and all(k.startswith("lora_unet_") for k in saved)
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    missing, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected and not missing and len(network.unet_loras) == len({k.split(".")[0] for k in saved})
    loaded = network.state_dict()
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], v) for k, v in saved.items())

    # a second run refuses to overwrite the report without --force
    assert main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--preset", "lokr-sdd"], "Did you mean lokr-sd"),
    (["--optimizer", "hinadamw"], "Did you mean"),
    (["--lr", "-1"], "--lr -1.0: must be a positive finite number"),
    (["--adamw-lr", "nan"], "--adamw-lr nan"),
])
def test_demo_bad_options_name_the_value_and_the_fix(tmp_path, capsys, argv, message):
    assert main(["demo", "--quick", "--no-progress", "--output", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


def test_demo_preset_and_optimizer_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--preset", "lokr-sd", "--optimizer", "HinaAdamW"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(demo.DemoError, match="choose one"):
        demo.run(demo.DemoOptions(preset="lokr-sd", optimizer="HinaAdamW"))


def test_demo_output_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["demo", "--quick", "--no-progress", "--output", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_demo_with_a_registered_optimizer_and_another_algo(tmp_path):
    report = demo.run(demo.DemoOptions(optimizer="automagic_cameamp", algo="loha", steps=3, n_train=8, n_heldout=16,
                                       batch=4, output=str(tmp_path / "o"), progress=False))
    assert report["runs"]["hina"]["optimizer"] == "Automagic_CameAMP"
    assert report["options"]["algo"] == "loha"
    assert all(math.isfinite(v) for _, v in report["runs"]["hina"]["curve"])
