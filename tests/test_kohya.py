"""The sd-scripts contract (INTEGRATION.md §1-2), with stand-ins of sd-scripts' and accelerate's
modules written here: short names through the installed hook, pass-through, argument parsing,
train/eval, the loss and diagnostics through accelerate, and the launcher."""

import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
import types
from argparse import Namespace

import pytest
import torch

import hina_kohya as hk
from hina_kohya import registry
from hina_kohya.args import OptimizerArgumentError, UnknownOptimizerArgument
from hina_kohya.kohya import SdScriptsArgumentError, accel, install
from hina_kohya.kohya.hooks import MARKER

UPSTREAM = ("upstream", "", "sentinel")


def _upstream_train_eval(optimizer, args):
    return "upstream-train", "upstream-eval"


@pytest.fixture
def train_util(monkeypatch):
    """A stand-in ``library.train_util`` whose functions say they were reached."""
    lib = types.ModuleType("library")
    tu = types.ModuleType("library.train_util")
    tu.get_optimizer = lambda args, trainable_params: UPSTREAM
    tu.get_optimizer_train_eval_fn = _upstream_train_eval
    lib.train_util = tu
    monkeypatch.setitem(sys.modules, "library", lib)
    monkeypatch.setitem(sys.modules, "library.train_util", tu)
    return tu


class FakeAccelerator:
    num_processes = 1

    def __init__(self, trackers=()):
        self.trackers = list(trackers)
        self.backwards = 0
        self.reduced = 0

    def backward(self, loss, **kwargs):
        self.backwards += 1
        loss.backward(**kwargs)

    def log(self, values, step=None, log_kwargs=None):
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def reduce(self, tensor, reduction="sum"):
        self.reduced += 1
        return tensor


@pytest.fixture
def accelerate(monkeypatch):
    """Stand-ins of ``accelerate`` and ``accelerate.tracking`` (fresh classes: the hooks patch them)."""
    mod = types.ModuleType("accelerate")
    tracking = types.ModuleType("accelerate.tracking")

    class GeneralTracker:
        name = "general"

    class TensorBoardTracker(GeneralTracker):
        name = "tensorboard"

        def __init__(self):
            self.logged = []

        def log(self, values, step=None, **kwargs):
            self.logged.append(dict(values))

    class WandBTracker(TensorBoardTracker):
        name = "wandb"

        def log(self, values, step=None, **kwargs):
            self.logged.append(dict(values))

    tracking.GeneralTracker, tracking.TensorBoardTracker, tracking.WandBTracker = (GeneralTracker, TensorBoardTracker,
                                                                                  WandBTracker)
    mod.Accelerator = type("Accelerator", (FakeAccelerator,), {})
    mod.tracking = tracking
    monkeypatch.setitem(sys.modules, "accelerate", mod)
    monkeypatch.setitem(sys.modules, "accelerate.tracking", tracking)
    monkeypatch.setattr(accel, "_LIVE", accel.weakref.WeakSet())
    monkeypatch.setattr(accel, "_cache", {"step": None, "values": {}})
    return mod


def _args(name, *items, **extra):
    base = dict(optimizer_type=name, optimizer_args=list(items), learning_rate=1e-4, use_8bit_adam=False,
                use_lion_optimizer=False, fused_backward_pass=False)
    return Namespace(**{**base, **extra})


def _params():
    torch.manual_seed(0)
    down, up = torch.nn.Parameter(torch.randn(4, 16) * 0.1), torch.nn.Parameter(torch.zeros(16, 4))
    return [{"params": {"down": down, "up": up}.values(), "lr": 1e-4,
             "param_names": ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"]}]


def test_install_wraps_once_and_is_idempotent(train_util):
    original = train_util.get_optimizer
    assert install() is True
    wrapped = train_util.get_optimizer
    assert getattr(wrapped, MARKER) and wrapped.__wrapped__ is original
    assert install() is True
    assert train_util.get_optimizer is wrapped  # not wrapped twice
    assert train_util.get_optimizer_train_eval_fn.__wrapped__ is _upstream_train_eval


def test_install_never_imports_sd_scripts(monkeypatch):
    monkeypatch.delitem(sys.modules, "library.train_util", raising=False)
    assert install() is False
    assert "library.train_util" not in sys.modules


def test_importing_a_wrapper_module_installs_the_hook(train_util):
    pytest.importorskip("lycoris")
    import hina_kohya.networks.lycoris as wrapper

    importlib.reload(wrapper)  # the import side effect runs again against this stand-in
    assert getattr(train_util.get_optimizer, MARKER)


@pytest.mark.parametrize("name,cls", [
    ("HinaAdamW", hk.HinaAdamW), ("hinaadamw", hk.HinaAdamW), ("HINAADAMWOPTIMIZER", hk.HinaAdamW),
    ("AdaptiveHinaAdamW", hk.AdaptiveHinaAdamW), ("HinaAdaptiveAdamW8bit", hk.AdaptiveHinaAdamW8bit),
    ("HinaAdaptiveAdamWMemoryOptimized8bit", hk.AdaptiveHinaAdamW8bit),
    ("HinaAdamWOptimizer8bit", hk.HinaAdamW8bit), ("Automagic_CameAMP", hk.Automagic_CameAMP),
    ("automagic_cameamp8bit", hk.Automagic_CameAMP8bit), ("Automagic_CameAMP_Improved", hk.Automagic_CameAMP_Improved),
    ("Automagic_CameAMP_COptim", hk.Automagic_CameAMP_COptim),
    ("hina_kohya.HinaAdamW", hk.HinaAdamW), ("hina_kohya.optim.Automagic_CameAMP", hk.Automagic_CameAMP),
])
def test_short_names_aliases_and_dotted_paths_build_our_optimizers(train_util, name, cls):
    install()
    qualified, rendered, opt = train_util.get_optimizer(_args(name, "weight_decay=0"), _params())
    assert type(opt) is cls
    assert qualified == f"{cls.__module__}.{cls.__name__}"
    assert rendered == "weight_decay=0.0"  # int 0 coerced to the float argument
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.structure.pairs  # the names reached the optimizer: the LoRA pair is found


def test_the_log_says_whether_names_reached_the_optimizer(train_util, caplog):
    install()
    with caplog.at_level("INFO", logger="hina_kohya.kohya.hooks"):
        train_util.get_optimizer(_args("HinaAdamW"), _params())
    assert "1 group(s), 2 of 2 parameters named" in caplog.text and "no parameter names" not in caplog.text
    caplog.clear()
    unnamed = [{"params": list(_params()[0]["params"]), "lr": 1e-4}]
    with caplog.at_level("INFO", logger="hina_kohya.kohya.hooks"):
        train_util.get_optimizer(_args("HinaAdamW"), unnamed)
    assert "0 of 2 parameters named" in caplog.text and "hina_kohya.networks.lycoris" in caplog.text


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Prodigy", "torch.optim.SGD", "HinaAdaptive",
                                  "some.module.HinaAdamW", "NotAnOptimizer"])
def test_other_names_reach_the_original_unchanged(train_util, name):
    install()
    args = _args(name, "betas=0.9,0.99")
    assert train_util.get_optimizer(args, _params()) == UPSTREAM
    assert train_util.get_optimizer(args=args, trainable_params=[]) == UPSTREAM
    assert args.optimizer_type == name  # never mutated


def test_a_typo_of_our_names_gets_suggestions_on_sd_scripts_error(train_util):
    def upstream(args, trainable_params):  # sd-scripts' generic branch: getattr(torch.optim, name)
        return getattr(torch.optim, args.optimizer_type)

    train_util.get_optimizer = upstream
    install()
    with pytest.raises(AttributeError, match=r"did you mean HinaAdamW") as info:
        train_util.get_optimizer(_args("HinaAdamV"), _params())
    assert "torch.optim" in str(info.value)  # sd-scripts' own message is kept
    with pytest.raises(AttributeError) as info:
        train_util.get_optimizer(_args("Adamm"), _params())
    assert "hina_kohya" not in str(info.value)  # nothing close to ours: untouched
    with pytest.raises(AttributeError) as info:
        train_util.get_optimizer(_args("HinaAdamW8bits"), _params())
    assert "did you mean" in str(info.value) and "HinaAdamW8bit?" in str(info.value)
    assert registry.resolve("hina_kohya.nope.HinaAdamW") is None  # sd-scripts' import would fail too


def test_optimizer_args_are_parsed_like_sd_scripts(train_util):
    install()
    items = ["betas=0.9,0.99", "eps=1e-8", "use_spd=False", "weight_decay=0.01", "alora_ratio=16"]
    _, rendered, opt = train_util.get_optimizer(_args("HinaAdamW", *items), _params())
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-8 and g["use_spd"] is False
    assert g["weight_decay"] == 0.01 and g["alora_ratio"] == 16.0
    assert rendered == "betas=(0.9, 0.99),eps=1e-08,use_spd=False,weight_decay=0.01,alora_ratio=16.0"


@pytest.mark.parametrize("items,error,match", [
    (["use_sdp=False"], UnknownOptimizerArgument, "Did you mean 'use_spd'"),
    (["use_spd=true"], OptimizerArgumentError, "capitalised"),
    (["a=b=c"], OptimizerArgumentError, "single '='"),
    (["weight_decay =0.1"], UnknownOptimizerArgument, "no spaces around"),
    (["betas=0.9"], OptimizerArgumentError, "tuple of 2 numbers"),
    (["lr=1e-3"], SdScriptsArgumentError, "--learning_rate"),
])
def test_bad_optimizer_args_name_the_argument_and_the_fix(train_util, items, error, match):
    install()
    with pytest.raises(error, match=match):
        train_util.get_optimizer(_args("HinaAdamW", *items), _params())


@pytest.mark.parametrize("flag,match", [("use_8bit_adam", "remove --use_8bit_adam"),
                                        ("use_lion_optimizer", "remove --use_lion_optimizer"),
                                        ("fused_backward_pass", "only with optimizer_type Adafactor")])
def test_upstream_argument_conflicts_are_refused(train_util, flag, match):
    install()
    with pytest.raises(SdScriptsArgumentError, match=match) as info:
        train_util.get_optimizer(_args("HinaAdamW", **{flag: True}), _params())
    assert isinstance(info.value, AssertionError)  # what sd-scripts itself raises


def test_train_eval_delegates_unless_the_optimizer_needs_it(train_util, monkeypatch):
    install()
    _, _, opt = train_util.get_optimizer(_args("HinaAdamW"), _params())
    assert train_util.get_optimizer_train_eval_fn(opt, None) == ("upstream-train", "upstream-eval")
    spec = registry.find("HinaAdamW")
    monkeypatch.setitem(registry._BY_NAME, "hinaadamw", dataclasses.replace(spec, train_eval=True))
    calls = []
    monkeypatch.setattr(opt, "train", lambda: calls.append("train"), raising=False)
    monkeypatch.setattr(opt, "eval", lambda: calls.append("eval"), raising=False)
    accelerated = types.SimpleNamespace(optimizer=opt)  # accelerate's wrapper forwards nothing else
    train_fn, eval_fn = train_util.get_optimizer_train_eval_fn(accelerated, None)
    eval_fn()
    train_fn()
    assert calls == ["eval", "train"]
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert train_util.get_optimizer_train_eval_fn(other, None) == ("upstream-train", "upstream-eval")


def _lora_loss(groups, x):
    down, up = groups[0]["params"]
    return ((x @ down.T @ up.T - x.flip(1)) ** 2).mean()


def test_the_loss_reaches_c_optim_through_accelerate_backward(train_util, accelerate):
    install()
    _, _, opt = train_util.get_optimizer(_args("Automagic_CameAMP_COptim", "warmup_steps=2"), _params())
    acc = accelerate.Accelerator()
    groups = opt.param_groups
    torch.manual_seed(1)
    losses = []
    for micro in range(2):  # gradient accumulation: two micro-batches, one step
        loss = _lora_loss(groups, torch.randn(8, 16))
        losses.append(float(loss.detach()))
        acc.backward(loss)
    assert acc.backwards == 2
    assert float(opt._loss / opt._loss_count) == pytest.approx(sum(losses) / 2)
    opt.step()
    assert opt.log_dict()["hina/coptim/signal_is_loss"] == 1.0
    assert opt._loss is None  # consumed by the step


def test_the_hook_leaves_averaging_across_processes_to_the_optimizer(train_util, accelerate):
    # one collective per optimizer step (test_distributed.py), not one per micro-batch here
    install()
    _, _, opt = train_util.get_optimizer(_args("Automagic_CameAMP_COptim"), _params())
    acc = accelerate.Accelerator()
    acc.num_processes = 2
    acc.backward(_lora_loss(opt.param_groups, torch.randn(8, 16)))
    assert acc.reduced == 0 and opt._loss_count == 1


def test_diagnostics_join_the_step_logs_of_every_tracker(train_util, accelerate, monkeypatch):
    monkeypatch.setenv(accel.LOG_EVERY_ENV, "2")
    install()
    _, _, opt = train_util.get_optimizer(_args("HinaAdamW"), _params())
    tb, wandb = accelerate.tracking.TensorBoardTracker(), accelerate.tracking.WandBTracker()
    acc = accelerate.Accelerator([tb, wandb])
    computed = []
    real = accel.diagnostics
    monkeypatch.setattr(accel, "diagnostics", lambda: computed.append(1) or real())
    for step in range(3):
        acc.backward(_lora_loss(opt.param_groups, torch.randn(8, 16)))
        opt.step()
        acc.log({"loss/current": 0.5, "lr/unet": 1e-4}, step=step)  # through Accelerator.log
        tb.log({"loss/current": 0.5, "lr/unet": 1e-4}, step=step)  # as sd-scripts does: the tracker itself
    tb.log({"loss/epoch": 0.4}, step=3)  # not a step log
    for tracker in (tb, wandb):
        assert tracker.logged[0]["lr/unet"] == 1e-4 and tracker.logged[0]["hina/lr/group0"] == pytest.approx(1e-4)
        assert "hina/step_size/group0" in tracker.logged[0] and "hina/nonfinite_skipped" in tracker.logged[0]
    with_hina = [any(k.startswith("hina/") for k in values) for values in tb.logged]
    assert with_hina == [True, True, False, False, True, True, False]  # optimizer steps 1 and 3 (every 2nd)
    assert tb.logged[-1] == {"loss/epoch": 0.4}
    assert len(computed) == 2  # once per due step, shared by both trackers and both calls


def _checkout(tmp_path):
    """A minimal sd-scripts-like folder: library/train_util.py and a training script."""
    (tmp_path / "library").mkdir()
    (tmp_path / "library" / "__init__.py").write_text("")
    (tmp_path / "library" / "train_util.py").write_text(textwrap.dedent("""
        def get_optimizer(args, trainable_params):
            return "upstream", "", None

        def get_optimizer_train_eval_fn(optimizer, args):
            return (lambda: None), (lambda: None)
    """))
    (tmp_path / "fine_tune.py").write_text(textwrap.dedent("""
        import sys
        from argparse import Namespace
        import torch
        from library import train_util

        args = Namespace(optimizer_type=sys.argv[1], optimizer_args=[], learning_rate=1e-3)
        name, _, opt = train_util.get_optimizer(args, [torch.nn.Parameter(torch.zeros(3))])
        print("RESULT", __name__, name, type(opt).__name__)
    """))
    return tmp_path


@pytest.mark.parametrize("name,expected", [("HinaAdamW", "hina_kohya.optim.hina_adamw.HinaAdamW HinaAdamW"),
                                           ("AdamW", "upstream NoneType")])
def test_launcher_installs_the_hook_for_scripts_without_a_network_module(tmp_path, name, expected):
    script = _checkout(tmp_path) / "fine_tune.py"
    out = subprocess.run([sys.executable, "-m", "hina_kohya.launch", str(script), name], capture_output=True,
                         text=True, cwd=os.getcwd(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"RESULT __main__ {expected}" in out.stdout


def test_launcher_names_a_missing_sd_scripts_dependency(tmp_path):
    script = _checkout(tmp_path) / "fine_tune.py"
    (tmp_path / "library" / "train_util.py").write_text("import a_dependency_that_is_not_installed\n")
    out = subprocess.run([sys.executable, "-m", "hina_kohya.launch", str(script), "HinaAdamW"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "pip install -r requirements.txt" in out.stderr and "RESULT" not in out.stdout


def test_launcher_refuses_a_script_outside_a_checkout(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('ran')\n")
    out = subprocess.run([sys.executable, "-m", "hina_kohya.launch", str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "ran" not in out.stdout
    assert "does not sit in an sd-scripts checkout" in out.stderr
    missing = subprocess.run([sys.executable, "-m", "hina_kohya.launch", "nope.txt"], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "is not a Python script file" in missing.stderr
