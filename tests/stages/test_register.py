import sys
from pathlib import Path

import pytest

from stages.io import read_json
from stages.registry import decide
from tests.conftest import registry_client, repo_cfg, run, set_param

CANDIDATE = {"accuracy": 0.80, "macro_f1": 0.79}
NO_THRESHOLDS = {"min_accuracy": 0.0, "min_macro_f1": 0.0, "min_gain_over_baseline": 0.0, "min_gain_over_champion": 0.0}


def gate(**thresholds: float) -> object:
    return repo_cfg("register", **(NO_THRESHOLDS | thresholds))


def test_gate_promotes_only_a_candidate_that_beats_everything() -> None:
    cfg = gate(min_accuracy=0.7, min_macro_f1=0.7)
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion_accuracy=None, cfg=cfg).promote
    assert decide(CANDIDATE, baseline_accuracy=0.75, champion_accuracy=0.78, cfg=cfg).promote


def test_a_blend_cannot_carry_a_transferred_model_that_lost_to_the_baseline() -> None:
    decision = decide(CANDIDATE, baseline_accuracy=0.78, champion_accuracy=None, cfg=gate(), transfer_accuracy=0.77)
    assert not decision.promote  # the blended candidate (0.80) beats the baseline, the transfer alone (0.77) does not
    assert "FAIL: gain over baseline (before the n-gram blend) -0.0100" in decision.reasons[-1]


@pytest.mark.parametrize(("baseline", "champion", "cfg", "failed"), [
    (0.85, None, gate(), "gain over baseline"),
    (0.70, 0.80, gate(), "gain over champion"),  # a tie does not dethrone the champion
    (0.70, None, gate(min_accuracy=0.9), "register.min_accuracy"),
    (0.70, 0.70, gate(min_gain_over_champion=0.2), "register.min_gain_over_champion"),
])
def test_gate_rejects_and_says_why(baseline: float, champion: float | None, cfg: object, failed: str) -> None:
    decision = decide(CANDIDATE, baseline, champion, cfg)
    assert not decision.promote
    assert any(r.startswith("FAIL") and failed in r for r in decision.reasons)


def test_registry_aliases_follow_the_gate(fresh_registry: Path) -> None:
    root = fresh_registry
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    register = [sys.executable, "-m", "stages.register"]
    run(register, root)
    first = read_json(root / "reports/registry.json")
    name = first["model_name"]
    assert first["decision"] == "promoted" and first["previous_champion"] is None
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    set_param(root, "register", "min_gain_over_champion", 0.5)  # the same model cannot beat itself by 0.5
    run(register, root)
    second = read_json(root / "reports/registry.json")
    assert second["decision"] == "rejected" and second["champion_accuracy"] is not None
    # the champion, loaded through MLflow's pyfunc (blend included), scores what evaluate scored
    assert second["champion_accuracy"] == first["candidate_accuracy"]
    assert any("gain over baseline (before the n-gram blend)" in r for r in second["reasons"])
    assert any(r.startswith("FAIL: gain over champion") for r in second["reasons"])
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    assert client.get_model_version(name, "2").tags["gate.decision"] == "rejected"

    set_param(root, "register", "min_gain_over_champion", -0.5)
    run(register, root)
    third = read_json(root / "reports/registry.json")
    assert third["decision"] == "promoted" and third["previous_champion"] == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"
    version = client.get_model_version(name, "3")
    assert version.tags["gate.previous_champion"] == "1"
    assert len(version.tags["git_commit"]) >= 40 and version.tags["dvc.raw"] and version.tags["dvc.features"]
    run_data = client.get_run(third["run_id"]).data
    assert run_data.metrics["test.candidate_accuracy"] == pytest.approx(third["candidate_accuracy"], abs=1e-4)
    training = read_json(root / "metrics/training.json")
    assert run_data.metrics["train.probe_val_accuracy"] == pytest.approx(training["probe_val_accuracy"])
    assert run_data.params["fine_tune.strategy"] == "linear_probe"


def test_a_champion_that_no_longer_loads_is_a_clear_error(fresh_registry: Path) -> None:
    root = fresh_registry
    register = [sys.executable, "-m", "stages.register"]
    run(register, root)
    saved = list((root / "mlruns").rglob("ngram/ngram.json"))  # the champion's copy in MLflow's artifact store
    assert len(saved) == 1
    saved[0].write_text("{}")  # as if saved by code that wrote another format
    result = run(register, root, check=False)
    assert result.returncode == 2
    assert "champion transfer-classifier@champion (version 1) does not load" in result.stderr
    assert "set_registered_model_alias" in result.stderr
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='transfer-classifier'")] == ["1"]  # nothing stray
