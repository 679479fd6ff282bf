"""Production shape, all real processes on loopback: an `mlflow server` registry over HTTP, a DVC remote
round trip from a fresh clone, and a Prefect worker in the GPU pool running a deployment from git + dvc pull."""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from flows import stack
from stages.io import read_json
from stages.service import background_service, free_port
from tests.conftest import project_env, registry_client

pytestmark = pytest.mark.e2e
DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
STAGES = ["ingest", "preprocess", "extract_features", "fine_tune", "evaluate", "register", "deploy"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    state = tmp_path_factory.mktemp("servers")
    with stack.prefect_server(state / "prefect") as api, stack.mlflow_server(state / "mlflow") as mlflow_uri:
        yield api, mlflow_uri


def sh(cmd: list[str], root: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def pushed_project(servers: tuple[str, str], pipeline_project: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny project reproduced against the MLflow server, its lock committed, its outputs pushed to a DVC remote.
    It starts from a copy of the pipeline project without its registry or the records of register and deploy: only
    those two stages talk to MLflow, so `dvc repro` reruns exactly them, against the server."""
    api, mlflow_uri = servers
    base = tmp_path_factory.mktemp("stack")
    root = base / "project"
    shutil.copytree(pipeline_project, root, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    for record in ("reports/registry.json", "reports/deployment.json"):
        (root / record).unlink()
    env = project_env(root) | {"MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_API_URL": api}
    sh([*DVC, "remote", "add", "--default", "--force", "local", str(base / "dvc-remote")], root, env)
    output = sh([*DVC, "repro"], root, env)
    assert [s for s in STAGES if f"Running stage '{s}'" in output] == ["register", "deploy"]
    sh([*GIT, "add", "-A"], root, env)
    sh([*GIT, "commit", "-qm", "reproduced"], root, env)
    sh([*DVC, "push"], root, env)
    return root, env


def test_registry_over_http_and_serving_from_it(pushed_project: tuple[Path, dict]) -> None:
    root, env = pushed_project
    record = read_json(root / "reports/registry.json")
    client = registry_client(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(record["model_name"], "champion")
    assert str(champion.version) == record["version"] and champion.tags["dvc.features"]
    assert client.get_run(record["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{record['model_name']}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with background_service("mlflow models serve", cmd, f"http://127.0.0.1:{port}/ping", timeout_s=120, env=env):
        body = {"dataframe_split": {"columns": ["text"], "data": [["a great film"]]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60).json()
        assert answer["predictions"][0]["label"] == "positive"


def test_fresh_clone_plus_dvc_pull_reruns_only_the_registry_side_effects(pushed_project: tuple[Path, dict],
                                                                         tmp_path: Path) -> None:
    """Data, features and model come from the DVC remote; register and deploy act on a registry, so their records
    are not in git: they rerun, and register finds the same model, split and gate already registered."""
    root, env = pushed_project
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models" / "candidate").exists() and not (clone / "reports" / "registry.json").exists()
    sh([*DVC, "pull"], clone, env)
    assert (clone / "models" / "candidate" / "head.safetensors").exists()
    status = sh([*DVC, "status"], clone, env)
    assert [line for line in status.splitlines() if line.endswith(":") and not line.startswith("\t")] == \
        ["register:", "deploy:"]
    client = registry_client(env["MLFLOW_TRACKING_URI"])
    original = read_json(root / "reports/registry.json")
    versions = len(client.search_model_versions(f"name = '{original['model_name']}'"))
    output = sh([*DVC, "repro"], clone, env)
    assert [s for s in ("preprocess", "fine_tune", "register", "deploy") if f"Running stage '{s}'" in output] == \
        ["register", "deploy"]
    again = read_json(clone / "reports/registry.json")
    assert again["reused"] and again["version"] == original["version"] and again["decision"] == original["decision"]
    assert len(client.search_model_versions(f"name = '{original['model_name']}'")) == versions
    assert read_json(clone / "reports/deployment.json")["status"] == "ok"


def test_worker_runs_the_scheduled_deployment_from_git_and_dvc(servers: tuple[str, str],
                                                                 pushed_project: tuple[Path, dict]) -> None:
    api, mlflow_uri = servers
    root, _ = pushed_project
    deployment = stack.read_deployment(root)
    worker_env = stack.worker_env(root, api, mlflow_uri)
    stack.prepare_pool(root, worker_env, deployment)
    found = requests.get(f"{api}/deployments/name/{deployment.full_name}", timeout=30).json()
    assert [s["schedule"]["cron"] for s in found["schedules"]] == ["0 3 * * *"]
    assert found["work_pool_name"] == "gpu-pool" and found["parameters"]["pull_first"] is True
    limits = requests.post(f"{api}/concurrency_limits/filter", json={}, timeout=30).json()
    assert {(c["tag"], c["concurrency_limit"]) for c in limits} >= {("gpu", 1), ("registry", 1)}

    name = read_json(root / "reports/registry.json")["model_name"]
    versions = len(registry_client(mlflow_uri).search_model_versions(f"name = '{name}'"))
    run_id = stack.trigger(api, deployment)
    log = stack.run_worker_once(root, worker_env, deployment)
    run = stack.flow_run(api, run_id)
    assert run["state_type"] == "COMPLETED", log[-5000:]
    # The worker cloned the committed code and pulled the outputs from the DVC remote: only the registry's side
    # effects reran, and register found the model already registered.
    artifacts = requests.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}},
                              timeout=30).json()
    summary = next(a for a in artifacts if a["key"] == "pipeline-summary")["data"]
    assert "Stages reproduced: register, deploy" in summary
    assert len(registry_client(mlflow_uri).search_model_versions(f"name = '{name}'")) == versions  # no duplicate
    tasks = requests.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}, timeout=30).json()
    assert {"dvc-pull", "dvc-push", "ingest", "deploy"} <= {t["name"] for t in tasks}
    assert stack.timings(run)["pickup_latency_s"] >= 0
