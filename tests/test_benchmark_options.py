"""The option parsing of `benchmarks.accuracy --grid` and `--set`: what may vary, and clear errors for the rest."""

import shutil
from pathlib import Path

import pytest

from benchmarks.accuracy import override, parse_grid, parse_set
from benchmarks.pipeline import set_params
from stages.config import load_params
from stages.errors import PipelineError
from tests.conftest import REPO_PARAMS, ROOT


def test_grid_values_are_parsed_as_yaml() -> None:
    assert parse_grid("fine_tune.finetune.learning_rate=5.0e-5,0.0001") == (
        "fine_tune.finetune.learning_rate", [5.0e-5, 0.0001])
    assert parse_grid(None) == (None, [None])


def test_override_changes_only_that_key() -> None:
    changed = override(REPO_PARAMS, "fine_tune.finetune.min_steps", 7)
    assert changed.fine_tune.finetune.min_steps == 7
    assert changed.model_copy(update={"fine_tune": REPO_PARAMS.fine_tune}) == REPO_PARAMS


@pytest.mark.parametrize(("spec_or_key", "value", "message"), [
    ("fine_tune.finetune.min_steps", -1, "min_steps=-1: Input should be greater than or equal to 0"),
    ("fine_tune.finetune.no_such_knob", 1, "no key 'fine_tune.finetune.no_such_knob'"),
    ("fine_tune.strategy", "linear_probe", "use --strategies"),
    ("backbone.max_length", 64, "only fine_tune"),
    ("fine_tune.blend.weights", [0.5], "never blend"),
])
def test_bad_grid_keys_are_named(spec_or_key: str, value: object, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        override(REPO_PARAMS, spec_or_key, value)


def test_a_grid_without_values_is_rejected() -> None:
    with pytest.raises(SystemExit, match="expected KEY=V1,V2"):
        parse_grid("fine_tune.finetune.min_steps")


def test_set_takes_one_yaml_value_and_rejects_a_bare_key() -> None:
    assert parse_set("fine_tune.self_training.epochs=1") == ("fine_tune.self_training.epochs", 1)
    assert parse_set("fine_tune.finetune.learning_rate=1.0e-4") == ("fine_tune.finetune.learning_rate", 1.0e-4)
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        parse_set("fine_tune.self_training.epochs")


def test_the_pipeline_benchmark_sets_params_in_its_copy(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    set_params(params_file, ["fine_tune.finetune.epochs=3", "preprocess.n_per_class=64"])
    params = load_params(params_file)
    assert (params.fine_tune.finetune.epochs, params.preprocess.n_per_class) == (3, 64)
    assert params.model_copy(update={"fine_tune": REPO_PARAMS.fine_tune, "preprocess": REPO_PARAMS.preprocess}) \
        == REPO_PARAMS
    with pytest.raises(SystemExit, match="no key 'fine_tune.finetune.epoch'"):
        set_params(params_file, ["fine_tune.finetune.epoch=3"])
    with pytest.raises(PipelineError, match="epochs"):
        set_params(params_file, ["fine_tune.finetune.epochs=0"])
