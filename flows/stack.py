"""A production-shaped stack on loopback: Prefect server, MLflow tracking server, the GPU work pool and a worker.

`python -m flows.stack` starts a Prefect server and an `mlflow server` (sqlite + local artifact root) on free
loopback ports, creates the work pool of prefect.yaml and the `gpu` and `registry` concurrency limits, pushes this
checkout's DVC outputs to the DVC remote, deploys the flow with its cron schedule, triggers one run and lets a worker in
the pool execute it from a fresh `git clone` of this repository plus `dvc pull`, exactly as on a GPU host.
It prints the worker's pick-up latency and the run time; `--keep` leaves the servers up afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests
import yaml

from stages.io import offline_env, write_json
from stages.service import background_service, free_port

CONCURRENCY_TAGS = ("gpu", "registry")  # one GPU stage at a time; one register or deploy at a time
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class Deployment:
    flow: str
    name: str
    pool: str

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


def read_deployment(root: Path) -> Deployment:
    """The first deployment of prefect.yaml: its flow name comes from the flow itself."""
    from flows.pipeline import pipeline

    spec = yaml.safe_load((root / "prefect.yaml").read_text())["deployments"][0]
    return Deployment(flow=pipeline.name, name=spec["name"], pool=spec["work_pool"]["name"])


def base_env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return offline_env(dict(os.environ)) | {"PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


@contextmanager
def prefect_server(home: Path, port: int | None = None) -> Iterator[str]:
    """A Prefect server on loopback with its own database under `home`; yields its API URL."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = base_env() | {"PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    api = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background_service("prefect server", cmd, f"{api}/health", timeout_s=120, env=env):
        yield api


@contextmanager
def mlflow_server(store: Path, port: int | None = None) -> Iterator[str]:
    """`mlflow server` on loopback: sqlite backend, local artifact root served over HTTP; yields its URI."""
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")]
    with background_service("mlflow server", cmd, f"{uri}/health", timeout_s=120, env=base_env()):
        yield uri


def cli(args: list[str], root: Path, env: dict[str, str], ok_if: str = "") -> str:
    result = subprocess.run(args, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    if result.returncode != 0 and not (ok_if and ok_if in output):
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{output[-3000:]}")
    return output


def prepare_pool(root: Path, env: dict[str, str], deployment: Deployment) -> None:
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    cli([*prefect, "work-pool", "create", deployment.pool, "--type", "process"], root, env, ok_if="already exists")
    for tag in CONCURRENCY_TAGS:
        cli([*prefect, "concurrency-limit", "create", tag, "1"], root, env)
    cli([*prefect, "deploy", "--all"], root, env)


def trigger(api: str, deployment: Deployment) -> str:
    found = requests.get(f"{api}/deployments/name/{deployment.full_name}", timeout=30)
    found.raise_for_status()
    run = requests.post(f"{api}/deployments/{found.json()['id']}/create_flow_run", json={}, timeout=30)
    run.raise_for_status()
    return str(run.json()["id"])


def run_worker_once(root: Path, env: dict[str, str], deployment: Deployment, timeout_s: float = 1800) -> str:
    """A worker in the pool picks up the scheduled run, executes it, and exits."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", deployment.pool, "--type", "process",
           "--run-once"]
    result = subprocess.run(cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    return result.stdout + result.stderr


def flow_run(api: str, run_id: str) -> dict:
    response = requests.get(f"{api}/flow_runs/{run_id}", timeout=30)
    response.raise_for_status()
    return response.json()


def timings(run: dict) -> dict[str, float]:
    parse = datetime.fromisoformat
    expected, started = parse(run["expected_start_time"]), parse(run["start_time"])
    return {"pickup_latency_s": round((started - expected).total_seconds(), 1),
            "run_seconds": round(run["total_run_time"], 1)}


def worker_env(root: Path, api: str, mlflow_uri: str) -> dict[str, str]:
    return base_env() | {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri,
                         "PIPELINE_GIT_URL": str(root.resolve())}


def run_stack(root: Path, state: Path, keep: bool, out: Path | None = None) -> dict:
    deployment = read_deployment(root)
    with ExitStack() as stack:
        api = stack.enter_context(prefect_server(state / "prefect"))
        mlflow_uri = stack.enter_context(mlflow_server(state / "mlflow"))
        env = worker_env(root, api, mlflow_uri)
        prepare_pool(root, env, deployment)
        cli([sys.executable, "-m", "dvc", "push"], root, env)
        run_id = trigger(api, deployment)
        log = run_worker_once(root, env, deployment)
        run = flow_run(api, run_id)
        if run["state_type"] != "COMPLETED":
            raise RuntimeError(f"flow run {run_id} ended {run['state_type']}; worker log:\n{log[-4000:]}")
        result = {"flow_run_id": run_id, "prefect_api": api, "mlflow_tracking_uri": mlflow_uri} | timings(run)
        print(yaml.safe_dump(result, sort_keys=False))
        if out is not None:
            write_json(result | {"cpu_count": os.cpu_count()}, out)
        if keep:
            print("servers stay up; Ctrl-C stops them")
            while True:
                time.sleep(3600)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project checkout (a git repository)")
    parser.add_argument("--state", type=Path, default=Path(".stack"), help="where the servers keep their data")
    parser.add_argument("--keep", action="store_true", help="leave the servers running after the run")
    parser.add_argument("--out", type=Path, help="also write the run's figures to this JSON file")
    args = parser.parse_args()
    run_stack(args.root.resolve(), args.state.resolve(), args.keep, args.out)


if __name__ == "__main__":
    main()
