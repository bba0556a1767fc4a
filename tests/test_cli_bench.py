"""The hina-kohya command and the step benchmark (smoke: outputs exist and are sane)."""

import json
import math

import pytest
import torch

from hina_kohya.bench import paramsets, step
from hina_kohya.cli import main


def test_list_shows_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "HinaAdamW" in out and "HinaAdamWOptimizer8bit" in out and "hina_kohya.HinaAdamW" in out


def test_bench_step_quick_writes_finite_results(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert main(["bench", "step", "--quick", "--optimizer", "hina_adamw_plain", "--optimizer",
                 "hina_adamw_plain_8bit", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["hina_adamw_plain", "hina_adamw_plain_8bit"]
    for r in rows:
        assert not r["error"] and math.isfinite(r["ratio_median"]) and r["ratio_median"] > 0
        assert r["host_syncs_per_step"] == 0
    assert rows[0]["state_bytes_per_element"] == 8.0
    # the least a step moves: params read + written, grads read, state (8 B/elem) read + written
    n = sum(p.numel() for p in paramsets.build("tiny")[0])
    assert rows[0]["min_traffic_bytes"] == (2 * 4 + 4 + 2 * 8) * n
    assert 0 < rows[0]["achieved_gbps"] and 0 < rows[0]["copy_gbps"]
    assert "| HinaAdamW, techniques off, fp32 state | tiny |" in capsys.readouterr().out
    assert all(r["step_peak_mib"] >= 0 or math.isnan(r["step_peak_mib"]) for r in rows)


def test_step_peak_counts_what_a_step_allocates_and_frees():
    """The peak column: a step that allocates and frees 64 MiB shows ~64 MiB; one that only
    writes existing tensors shows ~0 (what is held before the step is not counted)."""
    held = torch.zeros(16 * 2 ** 20)  # 64 MiB allocated before the measured step
    alloc = step.step_peak_mib(lambda: torch.ones(16 * 2 ** 20).sum(), torch.device("cpu"))
    if math.isnan(alloc):
        pytest.skip("resident-set peak not available on this platform")
    assert 60 <= alloc <= 80, alloc
    assert step.step_peak_mib(lambda: held.add_(1.0), torch.device("cpu")) < 8


def test_bench_8bit_state_bytes_on_a_real_sized_set():
    res = step.run_one("hina_adamw_plain_8bit", "lokr", rounds=1, warmup=1)
    assert not res.error
    assert res.state_bytes_per_element < 8.0  # the large LoKr factors are quantized


def test_bad_options_get_clear_errors(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "step", "--set", "sd99"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown benchmark candidate 'adam'"):
        main(["bench", "step", "--quick", "--optimizer", "adam"])


def test_sd15_set_matches_the_advertised_layout():
    named = paramsets.shapes("sd15")
    modules = {n.split(".")[0] for n, _ in named}
    assert len(modules) == 242  # 192 attention/FF linears + 50 3x3 convs
    ranks = {shape[0] for n, shape in named if "lora_down" in n}
    assert ranks == {16, 8}
    assert all(len(s) == 4 and s[2:] == (3, 3) for n, s in named if "conv" in n and "lora_down" in n)


def test_bench_chunks_runs_interleaved_and_restores_the_environment(capsys, monkeypatch):
    import os

    monkeypatch.setenv("HINA_KOHYA_FUSED_CHUNK", "2")
    assert main(["bench", "chunks", "--optimizer", "HinaAdamW", "--set", "tiny", "--sizes", "1,2", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "chunk 1:" in out and "chunk 2:" in out and "AdamW foreach" in out
    assert os.environ["HINA_KOHYA_FUSED_CHUNK"] == "2"
    with pytest.raises(SystemExit, match="comma-separated positive integers"):
        main(["bench", "chunks", "--sizes", "0,x"])


@pytest.mark.parametrize("name", ["came", "prodigy", "adv_adamw", "adv_prodigy", "lorarite", "prodigy_plus"])
def test_bench_step_compares_the_external_baselines(name):
    module = {"came": "came_pytorch", "prodigy": "prodigyopt", "adv_adamw": "adv_optm", "adv_prodigy": "adv_optm",
              "lorarite": "pytorch_optimizer", "prodigy_plus": "prodigyplus"}[name]
    pytest.importorskip(module)
    res = step.run_one(name, "tiny", rounds=2, warmup=1)
    assert not res.error, res.error
    assert math.isfinite(res.ratio_median) and res.ratio_median > 0
    if name == "came":  # factored second moment and confidence: less than AdamW's 8 B/elem
        assert 0 < res.state_bytes_per_element < 8.0
    elif name == "prodigy":  # Prodigy keeps more than AdamW (p0, s, m, v)
        assert res.state_bytes_per_element > 8.0
    else:
        assert res.state_bytes_per_element > 0


def test_bench_step_coptim_with_the_loss_uses_it_without_host_syncs():
    params, names = paramsets.build("tiny")
    opt = step.CANDIDATES["automagic_cameamp_coptim_loss"][1](params, names)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.log_dict()["hina/coptim/signal_is_loss"] == 1.0  # not the gradient-norm fallback
    res = step.run_one("automagic_cameamp_coptim_loss", "tiny", rounds=2, warmup=1)
    assert not res.error, res.error
    assert res.host_syncs_per_step == 0
