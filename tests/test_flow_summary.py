"""The Prefect run summary: the main DAG's figures, and the studies' when the run had them."""

import shutil
from pathlib import Path

from flows.summary import summary_markdown
from stages.config import load_params
from stages.io import write_json
from tests.conftest import ROOT

MAIN = [{"stage": name, "skipped": True} for name in ("evaluate", "register", "deploy")]
STUDIES = [{"stage": "studies/dvc.yaml:data_efficiency", "skipped": False},
           {"stage": "studies/dvc.yaml:adapt", "skipped": True}]


CURVE = {"strategy": "linear_probe", "budgets": {
    "16": {"labels_per_class": 16, "transfer_accuracy": 0.64, "baseline_accuracy": 0.53, "gain": 0.11, "draws": 5},
    "all": {"labels_per_class": 3726, "transfer_accuracy": 0.77, "baseline_accuracy": 0.78, "gain": -0.01, "draws": 1}}}
ADAPTED = {"tweets": {"unadapted_accuracy": 0.64, "adapted_accuracy": 0.87, "gain": 0.23, "baseline_accuracy": 0.6,
                      "negative_transfer": False}}


def _project(tmp_path: Path) -> Path:
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    params = load_params(tmp_path / "params.yaml")
    for path, body in ((params.paths.data_efficiency_metrics, CURVE), (params.paths.adaptation_metrics, ADAPTED)):
        write_json(body, tmp_path / path)
    return tmp_path


def test_the_summary_shows_the_studies_only_when_the_run_had_them(tmp_path: Path) -> None:
    root = _project(tmp_path)
    assert "Data efficiency" not in summary_markdown(root, MAIN)
    summary = summary_markdown(root, MAIN + STUDIES)
    assert "Stages reproduced: studies/dvc.yaml:data_efficiency" in summary
    assert "| all (3726) | 0.7700 | 0.7800 | -0.0100 | 1 |" in summary and "| 16 | 0.6400 |" in summary
    assert "**Domain adaptation**" in summary and "| tweets |" in summary
