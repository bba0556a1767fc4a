"""The regression tasks (``bench converge --task reg-*``): the teacher is reachable, the layouts are
the ones named, and the tasks run through the benchmark with their own step counts."""

import copy
import json

import pytest
import torch

pytest.importorskip("lycoris")

from hina_kohya.bench import converge, regression_task as rt  # noqa: E402
from hina_kohya.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return rt.load_base()


def _leaves(network) -> dict[str, tuple]:
    out = {}
    for name, p in network.named_parameters():
        out.setdefault(name.split(".", 1)[1], tuple(p.shape))
    return out


@pytest.mark.parametrize("algo, leaves, zero", [
    ("lora", {"lora_down.weight", "lora_up.weight"}, "lora_up.weight"),
    ("lokr", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, "lokr_w2_b"),
    ("lokr-full", {"lokr_w1", "lokr_w2"}, "lokr_w2"),
])
def test_each_task_adapts_every_block_layer_in_its_layout(base, algo, leaves, zero):
    model = copy.deepcopy(base)
    network = rt.make_network(model, algo, seed=0)
    names = [n for n, _ in network.named_parameters()]
    assert {n.split(".", 1)[1] for n in names} == leaves
    assert len({n.split(".", 1)[0] for n in names}) == 2 * rt.BLOCKS  # fc1 and fc2 of every block, not the head
    for name, p in network.named_parameters():
        assert (p.abs().sum() == 0) == name.endswith(zero), name  # the student starts as the base


def test_building_an_adapter_leaves_lycoris_class_settings_as_they_were(base):
    from lycoris.wrapper import LycorisNetwork

    before = {k: getattr(LycorisNetwork, k) for k in rt._PRESET_ATTRS if hasattr(LycorisNetwork, k)}
    rt.make_network(copy.deepcopy(base), "lokr", seed=0)
    assert {k: getattr(LycorisNetwork, k) for k in before} == before


@pytest.mark.parametrize("algo", list(rt.NETWORKS))
def test_the_optimum_is_reachable_and_the_loss_starts_at_one(base, algo):
    data = rt.make_data(base, algo)
    teacher, teacher_net = rt.make_teacher(base, algo)
    student = copy.deepcopy(base)
    net = rt.make_network(student, algo, seed=3)
    with torch.no_grad():
        start = float((student(data.heldout.x) - data.heldout.y).square().mean()) / data.scale
        for (name, p), (tname, tp) in zip(net.named_parameters(), teacher_net.named_parameters()):
            assert name == tname
            p.copy_(tp)
        end = float((student(data.heldout.x) - data.heldout.y).square().mean()) / data.scale
    assert start == pytest.approx(1.0, rel=0.05)  # held-out and the scale's set are the same inputs
    assert end < 1e-10  # the student can represent the teacher exactly


def test_adamw_fits_the_teacher_closely(base):
    data = rt.make_data(base, "lokr-full")
    res, _ = rt.run_once(base, "lokr-full", 0, lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.01), 1e-2,
                         data, 300, 64, "adamw", 100, torch.device("cpu"), validation=True)
    assert res.curve[0][1] == pytest.approx(1.0, rel=0.05)
    assert res.final < 1e-2 and res.validation < 1e-2  # two orders of magnitude in 300 steps


def test_tasks_run_their_own_step_counts_unless_steps_is_given():
    assert converge.task_steps("reg-lokr", None) == 1000
    assert converge.task_steps("adapter-lora", None) == 300
    assert converge.task_steps("adapter-lora-long", None) == 1000
    assert converge.task_steps("reg-lokr", 7) == 7


def test_regression_tasks_through_the_benchmark(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "converge", "--no-progress", "--task", "reg-lokr", "--task", "reg-lora", "--optimizer",
                 "adamw", "--optimizer", "hina_adamw", "--lr", "1e-2", "--seeds", "1", "--steps", "20",
                 "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "### reg-lokr (20 steps" in text and "### reg-lora (20 steps" in text
    summary = json.loads((out / "converge.json").read_text())
    for task in ("reg-lokr", "reg-lora"):
        t = summary["tasks"][task]
        assert t["steps"] == 20
        for row in t["rows"].values():
            assert row["mean_curve"][0][1] == pytest.approx(1.0, rel=0.05)
            assert row["heldout_mean"] < row["mean_curve"][0][1]  # learning
            assert row["base_loss_change"] is None  # no base concept in a teacher-student task
