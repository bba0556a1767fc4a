"""Presets (sd-scripts --config_file TOML shipped in the wheel), check-args and doctor."""

import pytest
import torch

from hina_kohya import presets, registry
from hina_kohya.check import check_config, check_optimizer
from hina_kohya.cli import main
from hina_kohya.doctor import names_report, report
from helpers import TinyLoRANet, train

EXPECTED = {"adaptive-hina-general", "adaptive-hina-large-model", "adaptive-hina-sd-lora", "adaptive-hina-low-memory",
            "hina-sd-lora", "hina-llm", "hina-lokr", "lokr-sd", "lokr-llm", "lokr-experimental", "automagic-lora",
            "automagic-full-finetune", "automagic-image", "automagic-language", "automagic-8bit", "automagic-coptim",
            "automagic-coptim-8bit"}


def test_every_recommended_configuration_has_a_preset():
    assert set(presets.list_presets()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_follow_the_sd_scripts_config_rules(name):
    text = presets.preset_text(name)
    assert text.startswith("# ") and presets.description(name)  # says what it is for
    values = presets.read_config(text)
    assert values["optimizer_type"].startswith("hina_kohya.")  # the dotted path works in every script
    assert not values["optimizer_type"].lower().endswith("8bit")
    assert registry.resolve(values["optimizer_type"]) is not None
    assert isinstance(values["learning_rate"], float) and isinstance(values["max_grad_norm"], float)
    assert all(isinstance(a, str) for a in values["optimizer_args"])
    for arg in values.get("network_args", []):
        assert isinstance(arg, str) and not arg.endswith("=False")  # LyCORIS reads 'False' as True
        assert arg not in ("preset=full", "preset=full-lin")  # breaks SD1.x with lycoris-lora 4.1.3
    if "network_module" in values:
        assert values["network_module"].startswith("hina_kohya.networks.")
    assert ":\\" not in text and "/home/" not in text and "pretrained_model_name_or_path =" not in text
    assert check_config(text) == ([], [f"optimizer_type {values['optimizer_type']!r} -> "
                                       f"{presets.preset_class(name).__module__}.{presets.preset_class(name).__name__}"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_builds_and_trains(name):
    m = TinyLoRANet(0)
    named = m.named_trainable()
    opt = presets.create_from_preset(name, [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}],
                                     fused=False)
    assert type(opt) is presets.preset_class(name)
    kwargs = presets.load_preset(name)
    in_groups = [k for k in kwargs if k in opt.defaults]
    assert set(kwargs) - set(in_groups) <= {"state_precision"}  # the engine option, checked below
    assert opt.state_precision == kwargs.get("state_precision", "fp32")
    assert all(opt.param_groups[0][k] == kwargs[k] for k in in_groups)  # the preset's lr, decay, ... reach the group
    losses = train(m, opt, 12)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_preset_state_precision_replaces_8bit_class_names():
    assert presets.load_preset("automagic-8bit")["state_precision"] == "8bit"
    assert presets.load_preset("adaptive-hina-low-memory")["state_precision"] == "8bit"
    opt = presets.create_from_preset("automagic-coptim-8bit", TinyLoRANet(0).groups(), fused=False, min_8bit_size=16)
    assert opt.state_precision == "8bit"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(KeyError, match="Did you mean lokr-sd.*Available: adaptive-hina-general"):
        presets.load_preset("lokr_sd2")


def test_config_tables_merge_like_sd_scripts():
    values = presets.read_config('top = 1\n[a]\nx = 1\ny = "a"\n[b]\nx = 2\n')
    assert values == {"top": 1, "x": 2, "y": "a"}


def test_cli_presets_list_show_export(tmp_path, capsys):
    assert main(["presets", "list"]) == 0
    assert "lokr-sd\n    LoKr on Stable Diffusion" in capsys.readouterr().out
    assert main(["presets", "show", "lokr-sd"]) == 0
    assert capsys.readouterr().out == presets.preset_text("lokr-sd")
    out = tmp_path / "mine.toml"
    assert main(["presets", "export", "lokr-sd", "--output", str(out)]) == 0
    assert out.read_text() == presets.preset_text("lokr-sd")
    out.write_text("# my edits\n")
    assert main(["presets", "export", "hina-llm", "--output", str(out)]) == 2  # never overwrites silently
    assert out.read_text() == "# my edits\n" and "--force" in capsys.readouterr().err
    assert main(["presets", "export", "hina-llm", "--output", str(out), "--force"]) == 0
    assert out.read_text() == presets.preset_text("hina-llm")
    assert main(["presets", "export", "hina-llm", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "hina-llm.toml").read_text() == presets.preset_text("hina-llm")
    assert main(["presets", "show", "nope"]) == 2
    assert "Available:" in capsys.readouterr().err


def test_check_args_reports_every_problem_with_a_fix():
    problems, notes = check_optimizer("hinaadamw", ["use_sdp=False", "betas=0.9", "spd_lambda=-1", "use_cautious=true",
                                                    "weight_decay=0", "lr=1", "a=b=c", "tam_beta=0.5", "tam_beta=0.6"],
                                      learning_rate=-1.0)
    text = "\n".join(problems)
    for fix in ("Did you mean 'use_spd'", "tuple of 2 numbers", "spd_lambda must be", "use_cautious=True (capitalised)",
                "--learning_rate", "single '='", "given twice", "lr=-1.0 is out of range"):
        assert fix in text, fix
    assert len(problems) == 8 and "HinaAdamW" in notes[0]
    assert check_optimizer("HinaAdamW", ["betas=0.9,0.99", "weight_decay=0"], 1e-4) == \
        ([], ["optimizer_type 'HinaAdamW' -> hina_kohya.optim.hina_adamw.HinaAdamW"])
    problems, _ = check_optimizer("HinaAdamV", [])
    assert "Did you mean HinaAdamW" in problems[0]
    problems, notes = check_optimizer("hina_kohya.Automagic_CameAMP8bit", [])
    assert problems == [] and "state_precision='8bit'" in notes[0] and "hina_kohya.Automagic_CameAMP " in notes[0]
    for upstream in ("AdamW", "SGD", "Adam", "torch.optim.RMSprop"):
        problems, notes = check_optimizer(upstream, ["betas=0.9,0.99"])
        assert problems == [] and "not a hina_kohya optimizer" in notes[0], upstream
    problems, _ = check_optimizer(5, [])
    assert "optimizer_type must be a string" in problems[0]


def test_check_config_types(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[o]\noptimizer_type = "hina_kohya.HinaAdamW"\nlearning_rate = "1e-4"\noptimizer_args = "use_spd=False"\n'
                   '[n]\nnetwork_args = ["algo=lokr", "hina_wd_spilt=true"]\n')
    assert main(["check-args", "--config_file", str(tmp_path / "bad")]) == 1  # .toml appended as sd-scripts does
    out = capsys.readouterr().out
    assert "optimizer_args must be an array of strings" in out and "learning_rate = '1e-4' must be a number" in out
    assert "Did you mean 'hina_wd_split'" in out
    good = tmp_path / "good.toml"
    good.write_text(presets.preset_text("lokr-sd"))
    assert main(["check-args", "--config_file", str(good)]) == 0
    assert "OK:" in capsys.readouterr().out
    (tmp_path / "run.cfg.toml").write_text(presets.preset_text("hina-llm"))
    assert main(["check-args", "--config_file", str(tmp_path / "run.cfg")]) == 0  # sd-scripts appends .toml
    assert main(["check-args", "--config_file", str(tmp_path / "missing.toml")]) == 2
    assert main(["check-args"]) == 2
    assert check_config("not = [toml")[0][0].startswith("not valid TOML")


def test_doctor(tmp_path, capsys):
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "train_util.py").write_text("def get_optimizer(args, params): pass\n")
    rows = dict(report(str(tmp_path), "lycoris.kohya"))
    assert rows["torch"].startswith(torch.__version__) and "8-bit state backend cpu:" in rows["bitsandbytes"]
    assert rows["sd-scripts patched"].startswith("no") and "use --network_module hina_kohya.networks.lycoris" in rows["names"]
    assert "not an sd-scripts checkout" in dict(report(str(tmp_path / "library")))["sd-scripts"]
    pytest.importorskip("lycoris")
    assert names_report("hina_kohya.networks.lycoris")[1].endswith("no-decay groups are split")
    assert "cannot be imported here" in names_report("hina_kohya.networks.lora_sd3")[1]
    assert main(["doctor", "--network-module", "networks.lora"]) == 0
    assert "hina_kohya.networks.lora" in capsys.readouterr().out
