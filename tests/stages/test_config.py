from pathlib import Path

import pytest
import yaml

from stages.config import load_params
from stages.errors import PipelineError
from tests.conftest import ROOT


def _params_with(tmp_path: Path, section: str, key: str, value: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repo_params_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.fine_tune.strategy in {"linear_probe", "finetune"}
    assert params.paths.raw.suffix == ".parquet"


@pytest.mark.parametrize(("section", "key", "value", "named"), [
    ("fine_tune", "strategy", "magic", "fine_tune.strategy"),
    ("preprocess", "test_size", 1.5, "preprocess.test_size"),
    ("extract_features", "precision", "fp8", "extract_features.precision"),
    ("register", "min_accuracy", 2, "register.min_accuracy"),
    ("backbone", "bogus_knob", 1, "backbone.bogus_knob"),
    ("adapt", "labels_per_class", 0, "adapt.labels_per_class"),
    ("data_efficiency", "strategy", "magic", "data_efficiency.strategy"),
    ("fine_tune", "blend", {"weights": [0.0, 1.5]}, "fine_tune.blend.weights.1"),
])
def test_bad_param_names_the_key(tmp_path: Path, section: str, key: str, value: object, named: str) -> None:
    with pytest.raises(PipelineError, match=named.replace(".", r"\.")) as error:
        load_params(_params_with(tmp_path, section, key, value))
    shown = value["weights"][1] if isinstance(value, dict) else value  # a section: the message shows the bad item
    assert repr(shown) in str(error.value) or key == "bogus_knob"


def test_missing_params_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_params_that_are_not_yaml_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text().replace("  seed: 0", "  seed: [0", 1))
    with pytest.raises(PipelineError, match=rf"(?s){path} is not valid YAML: .*line \d+"):
        load_params(path)


def test_rows_held_back_as_unlabelled_text_need_self_training(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="adapt: .*unlabeled_fraction > 0 .* only self_training_steps > 0 uses"):
        load_params(_params_with(tmp_path, "adapt", "unlabeled_fraction", 0.5))
    # the target's own unlabelled rows (data.empty_labels: unlabeled) are a pool without holding labelled rows back
    assert load_params(_params_with(tmp_path, "adapt", "self_training_steps", 10)).adapt.self_training_steps == 10


@pytest.mark.parametrize("section", ["data_efficiency", "adapt"])
def test_a_repeated_seed_is_refused(tmp_path: Path, section: str) -> None:
    with pytest.raises(PipelineError, match=rf"{section}\.seeds.*seeds \[0\] are repeated"):
        load_params(_params_with(tmp_path, section, "seeds", [0, 0, 1]))
