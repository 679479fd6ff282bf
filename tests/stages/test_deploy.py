"""deploy: the real scoring server, a smoke test over HTTP, and the alias rollback when it fails."""

import sys
from pathlib import Path

import pytest
import requests

from stages.deploy import smoke_test
from stages.io import read_json
from stages.service import free_port
from tests.conftest import registry_client, run, set_param


def test_smoke_test_rejects_a_server_that_does_not_answer() -> None:
    with pytest.raises(requests.RequestException):
        smoke_test(f"http://127.0.0.1:{free_port()}", ["a text"])


def test_deploy_record_of_a_good_run(pipeline_project: Path) -> None:
    record = read_json(pipeline_project / "reports/deployment.json")
    assert record["status"] == "ok" and record["model_uri"].endswith("@champion")
    assert len(record["smoke"]["predictions"]) == 2 and record["smoke"]["latency_ms"] > 0


def test_failed_smoke_test_rolls_the_champion_back(fresh_registry: Path) -> None:
    root = fresh_registry
    client = registry_client(f"sqlite:///{root / 'mlflow.db'}")
    run([sys.executable, "-m", "stages.register"], root)
    name = read_json(root / "reports/registry.json")["model_name"]
    set_param(root, "deploy", "startup_timeout_s", 0.001)  # the real server cannot answer in time
    result = run([sys.executable, "-m", "stages.deploy"], root, check=False)
    assert result.returncode == 2 and "smoke test" in result.stderr
    record = read_json(root / "reports/deployment.json")
    assert record["status"] == "rolled_back" and record["champion_after"] is None
    assert "champion" not in client.get_registered_model(name).aliases
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert "deploy.rolled_back" in client.get_model_version(name, "1").tags
