"""`dvc repro` end to end on the tiny data: all seven stages, no-op rerun, partial rerun, metrics, plots, exp run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stages.io import read_json
from tests.conftest import MLFLOW_URI_VARS, copy_project, project_env, registry_client, run

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
STAGES = ["ingest", "preprocess", "extract_features", "fine_tune", "evaluate", "register", "deploy"]


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def test_first_repro_runs_every_stage(pipeline_project: Path) -> None:
    root = pipeline_project
    lock = (root / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in STAGES)
    assert read_json(root / "reports/deployment.json")["status"] == "ok"
    assert read_json(root / "reports/registry.json")["decision"] == "promoted"
    metrics = read_json(root / "metrics/metrics.json")
    assert set(metrics["domains"]) == {"amazon", "nyt", "tweets"}


def test_metrics_and_plots_show(pipeline_project: Path) -> None:
    shown = json.loads(run([*DVC, "metrics", "show", "--json"], pipeline_project).stdout)
    flat = json.dumps(shown)
    assert "candidate_accuracy" in flat and "transfer_gain" in flat
    assert "probe_val_accuracy" in flat and "metrics/training_speed.json" in flat  # fine_tune's metrics
    shown_plots = json.loads(run([*DVC, "plots", "show", "--json"], pipeline_project).stdout)
    assert "errors" not in shown_plots, shown_plots
    plots = shown_plots["data"]
    assert "amazon / candidate" in json.dumps(plots["per_domain"])      # the templated CSV plots carry data
    assert '"predicted": "positive"' in json.dumps(plots["confusion"])
    assert "confidence" in json.dumps(plots["calibration"])
    run([*DVC, "plots", "show", "-o", "dvc_plots"], pipeline_project)
    assert (pipeline_project / "dvc_plots" / "index.html").stat().st_size > 0


def test_second_repro_runs_nothing(pipeline_project: Path) -> None:
    result = run([*DVC, "repro"], pipeline_project)
    assert ran(result.stdout) == []
    assert "Data and pipelines are up to date" in result.stdout + result.stderr


def test_changing_a_fine_tune_param_reruns_only_downstream(pipeline_project: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"  # `dvc exp run` applies its result to the workspace: keep the shared project as it was
    copy_project(pipeline_project, root)
    before = read_json(root / "reports/registry.json")["version"]
    result = run([*DVC, "exp", "run", "-S", "fine_tune.linear_probe.C=0.5"], root)
    assert ran(result.stdout) == ["fine_tune", "evaluate", "register", "deploy"]
    after = read_json(root / "reports/registry.json")
    assert int(after["version"]) == int(before) + 1
    expected_champion = after["version"] if after["decision"] == "promoted" else after["previous_champion"]
    assert after["champion"] == expected_champion
    run([*DVC, "exp", "show", "--json"], root)


def test_a_temporary_experiment_registers_in_the_projects_registry(pipeline_project: Path, tmp_path: Path) -> None:
    """`dvc exp run --temp` (as a queued one) runs the stages in a copy below .dvc/tmp/exps, which DVC deletes:
    without MLFLOW_TRACKING_URI the run and the version still land in the project's registry."""
    root = copy_project(pipeline_project, tmp_path / "copy")
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    before = {v.version for v in client.search_model_versions()}
    env = {k: v for k, v in project_env(root).items() if k not in MLFLOW_URI_VARS}
    result = subprocess.run([*DVC, "exp", "run", "--temp", "-S", "fine_tune.linear_probe.C=0.25"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    added = [v for v in client.search_model_versions() if v.version not in before]
    assert len(added) == 1  # in the project's registry, not in the copy's (use_experiment's artifact root: unit test)
