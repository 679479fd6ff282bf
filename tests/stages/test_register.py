import shutil
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.config import RegisterConfig
from stages.io import read_json
from stages.registry import decide
from tests.conftest import run

CANDIDATE = {"accuracy": 0.80, "macro_f1": 0.79}


def test_gate_promotes_only_a_candidate_that_beats_everything() -> None:
    cfg = RegisterConfig(min_accuracy=0.7, min_macro_f1=0.7)
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion_accuracy=None, cfg=cfg).promote
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion_accuracy=0.78, cfg=cfg).promote


@pytest.mark.parametrize(("baseline", "champion", "cfg", "failed"), [
    (0.85, None, RegisterConfig(), "gain over baseline"),
    (0.70, 0.80, RegisterConfig(), "gain over champion"),  # a tie does not dethrone the champion
    (0.70, None, RegisterConfig(min_accuracy=0.9), "register.min_accuracy"),
    (0.70, 0.70, RegisterConfig(min_gain_over_champion=0.2), "register.min_gain_over_champion"),
])
def test_gate_rejects_and_says_why(baseline: float, champion: float | None, cfg: RegisterConfig, failed: str) -> None:
    decision = decide(CANDIDATE, baseline, champion, cfg)
    assert not decision.promote
    assert any(r.startswith("FAIL") and failed in r for r in decision.reasons)


def _set(root: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def fresh_registry(pipeline_project: Path, tmp_path: Path) -> Path:
    """A copy of the pipeline project with an empty MLflow registry of its own."""
    root = tmp_path / "copy"
    shutil.copytree(pipeline_project, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    return root


def test_registry_aliases_follow_the_gate(fresh_registry: Path) -> None:
    root = fresh_registry
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    register = [sys.executable, "-m", "stages.register"]
    run(register, root)
    first = read_json(root / "reports/registry.json")
    name = first["model_name"]
    assert first["decision"] == "promoted" and first["previous_champion"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    run(register, root)  # the same model again: a tie with the champion on the same test set
    second = read_json(root / "reports/registry.json")
    assert second["decision"] == "rejected" and second["champion_accuracy"] == second["candidate_accuracy"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "2").tags["gate.decision"] == "rejected"

    _set(root, "register", "min_gain_over_champion", -0.01)
    run(register, root)
    third = read_json(root / "reports/registry.json")
    assert third["decision"] == "promoted" and third["previous_champion"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    version = client.get_model_version(name, "3")
    assert version.tags["gate.previous_champion"] == "1"
    assert len(version.tags["git_commit"]) >= 40 and version.tags["dvc.raw"] and version.tags["dvc.features"]
    run_data = client.get_run(third["run_id"]).data
    assert run_data.metrics["test.candidate_accuracy"] == pytest.approx(third["candidate_accuracy"], abs=1e-4)
    assert run_data.params["fine_tune.strategy"] == "linear_probe"


def test_failed_smoke_test_rolls_the_champion_back(fresh_registry: Path) -> None:
    root = fresh_registry
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run([sys.executable, "-m", "stages.register"], root)
    name = read_json(root / "reports/registry.json")["model_name"]
    _set(root, "deploy", "startup_timeout_s", 0.001)  # the real server cannot answer in time
    result = run([sys.executable, "-m", "stages.deploy"], root, check=False)
    assert result.returncode == 2 and "smoke test" in result.stderr
    record = read_json(root / "reports/deployment.json")
    assert record["status"] == "rolled_back" and record["champion_after"] is None
    assert "champion" not in client.get_registered_model(name).aliases
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert "deploy.rolled_back" in client.get_model_version(name, "1").tags
