"""Property-based fuzzing of what users type: ``--optimizer_args`` items and ``--config_file`` TOML.

Whatever the input, the parser returns values or raises ``OptimizerArgumentError`` (a message
naming the item and the fix), and ``check-args`` returns problems as text: never another
exception, never code run."""

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hina_kohya.args import OptimizerArgumentError, collect_items, split_items  # noqa: E402
from hina_kohya.check import check_config, check_optimizer  # noqa: E402

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values that look like what users write, and junk
VALUES = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["True", "true", "None", "1e-4", "-1", "(0.9, 0.99)", "[0.9,0.99]", "{[]: 1}", "{1, [2]}",
                     "'a'", "inf", "nan", "1e999", "(" * 300 + ")" * 300, "[" * 3000 + "]" * 3000,
                     "__import__('os').system('exit 3')", "lambda: 0", "0x10", "1_000", "b'x'", "...", "\x00"]),
    st.builds(repr, st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans(), st.none(),
                              st.tuples(st.floats(), st.floats()))),
)
KEYS = st.one_of(st.sampled_from(["lr", "betas", "weight_decay", "use_cautious", "warmup_steps", "state_precision",
                                  "alora_ratio", "eps", "max_lr", "came", "weight_decy", "BETAS"]),
                 st.text(max_size=15))
ITEMS = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=30)), max_size=6)


@FAST
@given(ITEMS)
def test_optimizer_args_parse_to_values_or_a_clear_error(items):
    try:
        out = split_items(items)
    except OptimizerArgumentError as exc:
        assert str(exc).startswith("optimizer_args")
    else:
        assert isinstance(out, dict) and all(isinstance(k, str) for k in out)
    values, problems = collect_items(items)
    assert isinstance(values, dict) and all(isinstance(p, OptimizerArgumentError) for p in problems)


@FAST
@given(ITEMS, st.sampled_from(["HinaAdamW", "hina_kohya.AdaptiveHinaAdamW", "Automagic_CameAMP_Improved",
                                "HinaAdamWOptimizer8bit", "AdamW", "no.such.Thing", ""]),
       st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=5)))
def test_check_args_reports_problems_as_text(items, optimizer_type, lr):
    problems, notes = check_optimizer(optimizer_type, items, lr)
    assert all(isinstance(p, str) and p for p in problems) and all(isinstance(n, str) for n in notes)


TOML_VALUES = st.one_of(st.integers(-5, 5).map(str), st.sampled_from(['"x"', "1e-4", "true", "[]", '["lr=1e-4"]',
                                                                       '["betas=(0.9,"]', '"lr=1"', "[1, 2]", "{}"]),
                        st.lists(VALUES, max_size=3).map(lambda vs: "[" + ", ".join(repr(f"k={v}") for v in vs) + "]"))
TOML_KEYS = st.sampled_from(["optimizer_type", "optimizer_args", "learning_rate", "unet_lr", "network_args",
                             "max_grad_norm", "lr_scheduler_args", "network_module", "other"])


@FAST
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(st.sampled_from(["", "[optimizer_arguments]\n", "[network_arguments]\n", "[a.b]\n"]),
                       TOML_KEYS, TOML_VALUES), max_size=6)
    .map(lambda rows: "".join(f"{table}{k} = {v}\n" for table, k, v in rows)),
))
def test_config_files_are_checked_without_crashing(text):
    problems, notes = check_config(text)
    assert all(isinstance(p, str) and p for p in problems) and all(isinstance(n, str) for n in notes)


def test_code_in_an_argument_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    payloads = [f"x=__import__('pathlib').Path({str(marker)!r}).touch()", f"x=open({str(marker)!r}, 'w')",
                "x=[c for c in ().__class__.__base__.__subclasses__()]"]
    for item in payloads:
        with pytest.raises(OptimizerArgumentError, match="not a Python literal"):
            split_items([item])
    problems, _ = check_config(f'optimizer_type = "HinaAdamW"\noptimizer_args = {payloads[:1]!r}\n'.replace("'", '"', 2))
    assert problems and not marker.exists()


@pytest.mark.parametrize("raw", ["{[]: 1}", "{1, [2]}", "[" * 3000 + "]" * 3000])
def test_unhashable_and_absurdly_nested_values_get_the_usual_message(raw):
    with pytest.raises(OptimizerArgumentError, match="'x'.*not a Python literal"):
        split_items([f"x={raw}"])
